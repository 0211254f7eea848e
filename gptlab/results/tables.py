"""Runs side by side: which metric is better high or low, the runs ranked best first, the overrides
that differ between them, and the table (markdown or CSV) that ``gptlab-compare`` prints and a sweep
ends with."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from gptlab.results.folders import Run, as_number, config_keys, find_runs, load_run

MAX_HINTS = ("acc", "f1", "precision", "recall", "auc", "score", "bleu", "rouge", "tokens_per_sec", "mfu")
"""A metric whose name contains one of these is better when higher (``--mode auto``)."""


def metric_mode(metric: str, mode: str = "auto") -> str:
    """``min`` or ``max``: given, or guessed from the name (accuracy-like = max, loss-like = min)."""
    if mode in ("min", "max"):
        return mode
    if mode != "auto":
        raise ValueError(f"unknown mode {mode!r}; valid choices: ['auto', 'min', 'max']")
    return "max" if any(h in metric.lower() for h in MAX_HINTS) else "min"


def rank_runs(runs: list[Run], metric: str, mode: str) -> list[Run]:
    """Best first by ``metric``; failed runs and runs without the metric last."""
    sign = -1.0 if metric_mode(metric, mode) == "max" else 1.0

    def key(r: Run) -> tuple[int, float]:
        v = r.metrics.get(metric)
        ok = not r.failed and v is not None and math.isfinite(v)
        return (0, sign * v) if ok else (1, 0.0)

    return sorted(runs, key=key)


def varying_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (all keys for a single run)."""
    keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
    if len(runs) < 2:
        return keys
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def metric_columns(runs: list[Run], metric: str, metrics: Sequence[str] | None = None) -> list[str]:
    """``metric`` first, then every ``val/*`` and ``test/*`` scalar (or the ones asked for)."""
    if metrics:
        return list(dict.fromkeys([metric, *metrics]))
    tags = sorted({t for r in runs for t in r.metrics if t.startswith(("val/", "test/"))})
    return [metric] + [t for t in tags if t != metric]


def _fmt(v: Any) -> str:
    """Numbers to 4 significant digits (also numeric strings, e.g. an Optuna-sampled lr)."""
    if v is None:
        return ""
    if isinstance(v, str):
        number = as_number(v)
        if number is None or v.strip().lower() in ("nan", "inf", "-inf") or v.isdigit():
            return v
        v = number
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def check_names(runs: list[Run], metric: str | None, x: str | None, metrics: Sequence[str] | None) -> None:
    """ValueError for a ``--metric``/``--metrics`` no run has, or an ``--x`` no run's config has,
    listing the names that exist (``metric`` None: not checked)."""
    have = sorted({t for r in runs for t in (*r.metrics, *r.curves)})
    for name in [m for m in (metric, *(metrics or [])) if m is not None]:
        if name not in have:
            raise ValueError(f"no run has the metric {name!r}; metrics: {', '.join(have) or '(none)'}")
    if x is not None:
        keys = sorted({k for r in runs for k in (*r.overrides, *config_keys(r))})
        if x not in keys:
            shown = [k for k in keys if not k.startswith(("hydra", "paths.", "callbacks.", "logger."))]
            raise ValueError(f"no run has the hyperparameter {x!r}; keys: {', '.join(shown)}")


def table_rows(runs: list[Run], keys: list[str], metrics: list[str]) -> tuple[list[str], list[list[Any]]]:
    header = ["#", "run", "status", *keys, *metrics]
    rows = [[i + 1, r.name, r.status, *(r.overrides.get(k, "") for k in keys), *(r.metrics.get(m) for m in metrics)]
            for i, r in enumerate(runs)]
    return header, rows


def to_markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i == 0 else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buf.getvalue()


def _status(run: Run, metric: str) -> str:
    """A run's status, saying so when it finished without ``metric`` (``limit_val_batches=0``, a
    task that does not log it): its empty cell is no result, not a failure."""
    if run.status == "ok" and run.metrics.get(metric) is None:
        return f"ok, no {metric}"
    return run.status


def summary_table(folder: Path, metric: str, max_rows: int = 50) -> str:
    """Markdown table of the jobs under ``folder``: overrides, ``metric``, status; best first (what a
    sweep prints when it ends)."""
    runs = [load_run(p, folder, read_curves=False) for p in find_runs(folder)]
    if not runs:
        return f"no jobs found under {folder}"
    ranked = rank_runs(runs, metric, "auto")
    keys = varying_keys(ranked)
    header = ["#", "job", *keys, metric, "status"]
    rows = [[i + 1, r.name, *(r.overrides.get(k, "") for k in keys), r.metrics.get(metric), _status(r, metric)]
            for i, r in enumerate(ranked[:max_rows])]
    best = metric_mode(metric)
    title = f"{len(runs)} job(s), best first by {metric} ({best})"
    more = f"\n... {len(runs) - max_rows} more: gptlab-compare {folder}" if len(runs) > max_rows else ""
    return f"{title}\n{to_markdown(header, rows)}{more}"


__all__ = ["MAX_HINTS", "metric_mode", "rank_runs", "varying_keys", "metric_columns", "check_names", "table_rows",
           "to_markdown", "to_csv", "summary_table"]
