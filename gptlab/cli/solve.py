"""``gptlab-solve``: answer a problem set and grade the answers: greedy, self-consistency (majority vote
over N samples) or best-of-N (the sample a scorer rates highest), batched through the KV cache.

    gptlab-solve ckpt_path=<run>/checkpoints/last.ckpt output=greedy.jsonl
    gptlab-solve ckpt_path=<run>/checkpoints/last.ckpt method=self_consistency n=16 output=sc16.jsonl
    gptlab-solve ckpt_path=<run>/checkpoints/last.ckpt method=best_of_n n=4 output=bon4.jsonl

Writes one JSON line per problem (prompt, answer, prediction, correct, every sample and its answer)
and a summary (accuracy, method, n, settings) beside it; prints the accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.cli import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict[str, Any]:
    """Solve the problems of ``cfg.split`` of ``cfg.data``; returns the summary written."""
    import torch  # the heavy imports wait until a model is wanted
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from tqdm.auto import tqdm

    from gptlab.cli.validation import validate_solve_config
    from gptlab.inference import load_model
    from gptlab.rewards import RewardModel
    from gptlab.solving import accuracy, solve_problems

    validate_solve_config(cfg)
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="lm", device=cfg.device,
                    precision=cfg.precision)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    style = cfg.prompt_style or lm.prompt_style or data.get("prompt_style") or "alpaca"
    data["prompt_style"] = style
    data["drop_last"] = False  # nothing trains here: a small file's training split need not fill a batch
    dm = instantiate(data, tokenizer=lm.tokenizer, _convert_="all")
    dm.setup()
    dataset = getattr(dm, f"{cfg.split}_set")
    count = min(len(dataset), cfg.max_problems or len(dataset))
    entries, prompts, prompt_ids = dataset.entries[:count], dataset.prompts[:count], dataset.prompt_ids[:count]
    grader = cfg.grader or getattr(dm, "grader", "numeric")
    reward = RewardModel(ckpt_path=cfg.reward_checkpoint).to(lm.device) if cfg.reward_checkpoint else None
    n = 1 if cfg.method == "greedy" else cfg.n
    print(f"solving {count} {cfg.split} problems with {lm.source}: {cfg.method}, n={n} (prompt style {style!r}, "
          f"{cfg.max_new_tokens} new tokens, grader {grader})", file=sys.stderr)
    model = lm.model.eval()
    with lm.autocast(), tqdm(total=count, unit="problem", desc=cfg.method, disable=not cfg.progress) as bar:
        rows = solve_problems(model, entries, prompts, prompt_ids, cfg.method, n, grader, cfg.max_new_tokens,
                              cfg.temperature, cfg.top_k, cfg.top_p, style, cfg.batch_size, cfg.scorer, reward,
                              progress=bar.update, tokenizer=lm.tokenizer)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = {"accuracy": accuracy(rows), "correct": sum(r["correct"] for r in rows), "problems": len(rows),
               "answered": sum(r["prediction"] is not None for r in rows), "method": cfg.method, "n": n,
               "scorer": cfg.scorer if cfg.method == "best_of_n" else None, "grader": grader,
               "temperature": 0.0 if cfg.method == "greedy" else cfg.temperature, "top_p": cfg.top_p,
               "model": str(lm.source), "split": cfg.split, "output": str(out)}
    summary_path = Path(cfg.summary) if cfg.summary else out.with_name(out.name + ".summary.json")
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"accuracy {summary['accuracy']:.3f} ({summary['correct']}/{len(rows)}); {out}, {summary_path}")
    return summary


main = entry_point("solve", run, groups=["data"])

if __name__ == "__main__":
    main()
