"""``gptlab-judge``: score the responses of an instruction-tuned model with a larger LLM.

    gptlab-judge responses=outputs/ch07_instruct/runs/<time>/responses.json judge.model=llama3
    gptlab-judge responses=... judge.backend=openai judge.url=http://localhost:8000 judge.model=<name>

Per-entry scores go to ``scores.json`` beside the responses (or ``output=``); the average and the
number of entries without a score are printed. Answers are cached, so a re-run sends no request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.cli.entry import handle_help, require_values, user_errors
from gptlab.judge import Judge, JudgeError, load_responses, summarize


def run(cfg: DictConfig) -> dict[str, Any]:
    """Judge ``cfg.responses``; writes the scores file and returns its summary."""
    responses = Path(cfg.responses)
    entries = load_responses(responses, cfg.response_key)
    settings = OmegaConf.to_container(cfg.judge, resolve=True)
    cache = settings.pop("cache", None)
    if cache is None:
        cache = responses.parent / "judge_cache.jsonl"
    judge = Judge(**settings, cache=cache or None)
    print(f"judging {len(entries)} responses from {responses} with {judge.model!r} "
          f"({judge.backend} at {judge.url})", file=sys.stderr)
    scores = judge.score_all(entries, cfg.response_key, progress=cfg.progress)
    summary = summarize(scores)
    output = Path(cfg.output) if cfg.output else responses.parent / "scores.json"
    rows = [{"index": i, **entry, "score": s.score, "judge_answer": s.raw} for i, (entry, s) in enumerate(zip(entries, scores))]
    report = {"responses": str(responses), "judge": {"backend": judge.backend, "model": judge.model, "url": judge.url},
              **summary, "requests_sent": judge.requests_sent, "scores": rows}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    avg = f"{summary['average']:.2f}" if summary["average"] is not None else "n/a"
    print(f"Number of scores: {summary['n_scored']} of {summary['n_entries']} ({summary['n_failed']} failed)")
    print(f"Average score: {avg}")
    print(f"scores written to {output} ({judge.requests_sent} requests sent, the rest from the cache {cache or '(off)'})",
          file=sys.stderr)
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="judge")
def _hydra_main(cfg: DictConfig) -> None:
    require_values(cfg, "judge", "gptlab-judge")
    try:
        with user_errors("gptlab-judge"):
            run(cfg)
    except JudgeError as e:
        print(f"gptlab-judge: error: {e}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Console entry: this tool's ``--help``; everything else through Hydra."""
    handle_help("judge", "gptlab-judge")
    _hydra_main()


if __name__ == "__main__":
    main()
