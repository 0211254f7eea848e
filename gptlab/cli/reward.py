"""``gptlab-reward``: score responses with a reward model (``gptlab-train task=reward_model``).

    gptlab-reward ckpt_path=<rm run>/checkpoints/last.ckpt responses=<run>/responses.json
    gptlab-reward ckpt_path=... responses=<dpo run>/responses.json baseline=<sft run>/responses.json
    gptlab-reward init_from=<sft checkpoint> adapter_path=<rm run>/checkpoints/adapter.safetensors responses=...
    gptlab-reward ckpt_path=... prompt="Name a primary color." response="Red, of course!"

A responses file is what ``gptlab-train ... test=true`` writes for SFT and DPO runs (entries with
``instruction``, ``input`` and ``model_response``). Each response is scored as the answer to its
instruction, written in the reward model's prompt style. ``rewards.json`` goes beside the
responses (or ``output=``): the summary (n, mean, std, min, max) and every entry's reward. With
``baseline=`` the two files are matched by instruction and scored side by side: both summaries, the
mean difference, and how often the ``responses`` answer scores higher, equal or lower.
``prompt=`` / ``response=`` are taken verbatim (no Hydra quoting) and print one reward.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from gptlab.cli import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig


def summarize_rewards(scores: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, (population) std, min and max of ``scores`` (None for an empty list)."""
    if not scores:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(scores), "mean": statistics.fmean(scores), "std": statistics.pstdev(scores),
            "min": min(scores), "max": max(scores)}


def compare_rewards(candidate: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Side-by-side statistics of two reward lists over the same instructions."""
    diffs = [c - b for c, b in zip(candidate, baseline)]
    n = len(diffs)
    higher, equal = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs)
    return {"n": n, "mean_difference": statistics.fmean(diffs) if n else None,
            "candidate_higher": higher, "equal": equal, "baseline_higher": n - higher - equal,
            "candidate_higher_rate": higher / n if n else None}


def _fmt(summary: dict[str, Any]) -> str:
    if not summary["n"]:
        return "no entries"
    return (f"mean {summary['mean']:+.4f}, std {summary['std']:.4f}, min {summary['min']:+.4f}, "
            f"max {summary['max']:+.4f} (n={summary['n']})")


def run(cfg: DictConfig, out: TextIO | None = None, prompt: str | None = None,
        response: str | None = None) -> dict[str, Any]:
    """Score ``cfg.responses`` (against ``cfg.baseline`` when set) or one ``prompt``/``response``;
    writes ``rewards.json`` for files and returns the report."""
    from gptlab.cli.validation import validate_reward_config  # the heavy imports wait until a model is wanted
    from gptlab.inference import load_model, score_responses
    from gptlab.judge import load_responses, pair_responses

    validate_reward_config(cfg)
    out = out or sys.stdout
    prompt = prompt if prompt is not None else cfg.get("prompt")
    response = response if response is not None else cfg.get("response")
    if (prompt is None) != (response is None):
        raise ValueError("give both prompt=\"...\" and response=\"...\" (or responses=<file>)")
    if (prompt is None) == (cfg.responses is None):
        raise ValueError("give responses=<responses.json> (optionally baseline=<another one>), or prompt= and response=")
    if cfg.baseline and cfg.responses is None:
        raise ValueError("baseline= compares against responses=<file>; give responses= too")
    rm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="reward", device=cfg.device,
                    precision=cfg.precision, tokenizer=cfg.get("tokenizer"))
    style = cfg.prompt_style or rm.prompt_style or "alpaca"
    key = cfg.response_key

    def score(entries: list[dict[str, Any]]) -> list[float]:
        with rm.autocast():
            return score_responses(rm.model, entries, style, key, cfg.batch_size, cfg.max_length,
                                   tokenizer=rm.tokenizer)

    if prompt is not None:
        [reward] = score([{"instruction": prompt, "input": "", key: response}])
        out.write(f"{reward:.4f}\n")
        out.flush()
        return {"reward": reward}
    responses = Path(cfg.responses)
    report: dict[str, Any] = {"reward_model": rm.source, "prompt_style": style, "responses": str(responses)}
    if cfg.baseline:
        baseline = Path(cfg.baseline)
        triples = pair_responses(load_responses(baseline, key, require_output=False),
                                 load_responses(responses, key, require_output=False), key,
                                 names=(str(baseline), str(responses)))
        entries = [e for e, _, _ in triples]
        cand = score([{**e, key: c} for e, _, c in triples])
        base = score([{**e, key: b} for e, b, _ in triples])
        report.update({"baseline": str(baseline), "summary": summarize_rewards(cand),
                       "baseline_summary": summarize_rewards(base), "comparison": compare_rewards(cand, base),
                       "scores": [{"index": i, "instruction": e["instruction"], "input": e.get("input", ""),
                                   "response": c, "reward": rc, "baseline_response": b, "baseline_reward": rb}
                                  for i, ((e, b, c), rc, rb) in enumerate(zip(triples, cand, base))]})
        cmp = report["comparison"]
        out.write(f"{responses}: {_fmt(report['summary'])}\n{baseline}: {_fmt(report['baseline_summary'])}\n")
        if entries:
            out.write(f"responses - baseline: mean {cmp['mean_difference']:+.4f}; higher for {cmp['candidate_higher']}, "
                      f"equal for {cmp['equal']}, lower for {cmp['baseline_higher']} of {cmp['n']} instructions\n")
    else:
        entries = load_responses(responses, key, require_output=False)
        rewards = score(entries)
        report.update({"summary": summarize_rewards(rewards),
                       "scores": [{"index": i, "instruction": e["instruction"], "input": e.get("input", ""),
                                   "response": e[key], "reward": r} for i, (e, r) in enumerate(zip(entries, rewards))]})
        out.write(f"{responses}: {_fmt(report['summary'])}\n")
    path = Path(cfg.output) if cfg.output else responses.parent / "rewards.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sys.stderr.write(f"rewards written to {path}\n")
    out.flush()
    return report


main = entry_point("reward", run, verbatim=("prompt", "response"))

if __name__ == "__main__":
    main()
