"""``gptlab-judge``: score the responses of an instruction-tuned model with a larger LLM, or
compare two models' responses pairwise (chapter 8.7: evaluating aligned models).

    gptlab-judge responses=outputs/ch07_instruct/runs/<time>/responses.json judge.model=llama3
    gptlab-judge responses=... judge.backend=openai judge.url=http://localhost:8000 judge.model=<name>
    gptlab-judge responses=<dpo run>/responses.json baseline=<sft run>/responses.json   # pairwise

Per-entry scores go to ``scores.json`` beside the responses (or ``output=``); the average and the
number of entries without a score are printed. Pairwise: every instruction is judged with the two
responses in both orders; ``pairwise.json`` gets the per-entry picks and the win/tie/loss counts and
rates of ``responses`` against ``baseline``. Answers are cached, so a re-run sends no request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.cli import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from gptlab.judge import Judge


def make_judge(cfg: DictConfig, responses: Path) -> tuple[Judge, Path | None]:
    """The judge client of ``cfg.judge`` and its cache file (default: beside the responses)."""
    from omegaconf import OmegaConf

    from gptlab.judge import Judge

    settings = OmegaConf.to_container(cfg.judge, resolve=True)
    cache = settings.pop("cache", None)
    if cache is None:
        cache = responses.parent / "judge_cache.jsonl"
    return Judge(**settings, cache=cache or None), cache or None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Judge ``cfg.responses`` (against ``cfg.baseline`` when set); writes the report and returns it."""
    from gptlab.cli.validation import validate_judge_config  # the heavy imports wait until they are needed
    from gptlab.judge import load_responses, summarize

    validate_judge_config(cfg)
    if cfg.get("baseline"):
        return run_pairwise(cfg)
    responses = Path(cfg.responses)
    entries = load_responses(responses, cfg.response_key)
    judge, cache = make_judge(cfg, responses)
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


def run_pairwise(cfg: DictConfig) -> dict[str, Any]:
    """Compare ``cfg.responses`` (the candidate) with ``cfg.baseline`` instruction by instruction;
    writes ``pairwise.json`` (or ``cfg.output``) and returns the report."""
    from gptlab.judge import load_responses, pair_responses, summarize_pairwise

    responses, baseline = Path(cfg.responses), Path(cfg.baseline)
    triples = pair_responses(load_responses(baseline, cfg.response_key, require_output=False),
                             load_responses(responses, cfg.response_key, require_output=False),
                             cfg.response_key, names=(str(baseline), str(responses)))
    judge, cache = make_judge(cfg, responses)
    print(f"comparing {len(triples)} responses from {responses} with {baseline} using {judge.model!r} "
          f"({judge.backend} at {judge.url}), both orders", file=sys.stderr)
    verdicts = judge.compare_all(triples, progress=cfg.progress)
    summary = summarize_pairwise(verdicts)
    rows = [{"index": i, "instruction": e["instruction"], "input": e.get("input", ""), "baseline_response": b,
             "candidate_response": c, "outcome": v.outcome, "pick_baseline_first": v.first,
             "pick_candidate_first": v.second, "judge_answers": v.raw}
            for i, ((e, b, c), v) in enumerate(zip(triples, verdicts))]
    report = {"candidate": str(responses), "baseline": str(baseline),
              "judge": {"backend": judge.backend, "model": judge.model, "url": judge.url},
              **summary, "requests_sent": judge.requests_sent, "comparisons": rows}
    output = Path(cfg.output) if cfg.output else responses.parent / "pairwise.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    n = summary["n_judged"]

    def pct(key: str) -> str:
        return f"{100 * summary[key]:.1f}%" if summary[key] is not None else "n/a"

    print(f"{responses} vs {baseline}: win {summary['win']} ({pct('win_rate')}), tie {summary['tie']} "
          f"({pct('tie_rate')}), loss {summary['loss']} ({pct('loss_rate')}) of {n} judged "
          f"({summary['n_failed']} failed); both orders agreed on {pct('consistency')}")
    print(f"comparisons written to {output} ({judge.requests_sent} requests sent, the rest from the cache "
          f"{cache or '(off)'})", file=sys.stderr)
    return report


main = entry_point("judge", run)

if __name__ == "__main__":
    main()
