"""``gptlab-compare``: one table (and a plot) of the runs in a sweep folder, best first.

    gptlab-compare outputs/classify/multiruns/2025-01-01_12-00-00
    gptlab-compare outputs/ --metric val/acc --csv > runs.csv
    gptlab-compare SWEEP --plot lr.png --x task.optimizer.lr          # final metric against a hyperparameter
    gptlab-compare SWEEP --plot curves.png --curves         # the metric's curve of every run

A run is any folder with a ``.hydra/`` inside (searched recursively): its overrides come from
``.hydra/overrides.yaml``, its final metrics and status from ``metrics.json`` (every run writes one
when it ends), its curves from the TensorBoard event files and the CSV logger's ``metrics.csv``.
Runs that did not finish are listed last, marked ``failed`` (an error), ``interrupted`` (Ctrl-C)
or ``incomplete`` (no ``metrics.json``: killed, or still running).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from gptlab.cli.results import read_result

MAX_HINTS = ("acc", "f1", "precision", "recall", "auc", "score", "bleu", "rouge", "tokens_per_sec", "mfu")
"""A metric whose name contains one of these is better when higher (``--mode auto``)."""


@dataclass
class Run:
    """One run folder: where it is, what was overridden, how it ended, its final metrics."""

    path: Path
    name: str
    overrides: dict[str, str]
    status: str
    """``ok``, ``failed``, ``interrupted`` or ``incomplete``."""
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def find_runs(root: Path) -> list[Path]:
    """Every folder under ``root`` (``root`` included) that holds a ``.hydra/`` folder, sorted with
    numeric job numbers in numeric order."""
    root = Path(root)
    found = [p.parent for p in root.rglob(".hydra") if p.is_dir()]
    return sorted(found, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts])


def read_overrides(run: Path) -> dict[str, str]:
    """``key -> value`` from ``.hydra/overrides.yaml`` (``+``/``++`` prefixes dropped; hydra.* skipped)."""
    file = run / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(file.read_text()) if file.is_file() else None
    out: dict[str, str] = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra."):
            out[key] = value
    return out


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run's TensorBoard event files: ``tag -> [(step, value), ...]``,
    sorted by step (for equal steps the later write wins). Event files of nested runs are skipped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    nested = {p.parent for p in run.rglob(".hydra") if p.is_dir() and p.parent != run}
    folders = sorted({f.parent for f in run.rglob("events.out.tfevents.*")
                      if not any(n in f.parents for n in nested)})
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
        for tag in acc.Tags().get("scalars", []):
            points = series.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in points or e.wall_time >= points[e.step][0]:
                    points[e.step] = (e.wall_time, float(e.value))
    return {tag: [(s, v) for s, (_, v) in sorted(points.items())] for tag, points in series.items()}


def read_csv_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every series in the CSV logger's ``metrics.csv`` files of the run: ``tag -> [(step, value), ...]``."""
    series: dict[str, dict[int, float]] = {}
    for file in run.rglob("metrics.csv"):
        with file.open(newline="") as f:
            for row in csv.DictReader(f):
                step = _as_number(row.get("step"))
                for tag, value in row.items():
                    v = _as_number(value)
                    if tag in ("step", "epoch") or v is None or step is None:
                        continue
                    series.setdefault(tag, {})[int(step)] = v
    return {tag: sorted(points.items()) for tag, points in series.items()}


def run_status(path: Path, result: dict[str, Any] | None) -> str:
    if result is not None and result.get("status"):
        return str(result["status"])
    return "failed" if (path / "FAILED").exists() else "incomplete"


def load_run(path: Path, root: Path, read_curves: bool = True) -> Run:
    """A run folder: overrides, status and final metrics (``metrics.json``), and, with
    ``read_curves``, every scalar series (TensorBoard and CSV logs)."""
    result = read_result(path)
    curves = {**read_csv_scalars(path), **read_scalars(path)} if read_curves else {}
    metrics = {tag: pts[-1][1] for tag, pts in curves.items() if pts}
    metrics.update({k: v for k, v in ((result or {}).get("metrics") or {}).items() if v is not None})
    name = str(path.relative_to(root)) if path != root else path.name
    return Run(path=path, name=name, overrides=read_overrides(path), status=run_status(path, result),
               metrics=metrics, curves=curves)


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
        number = _as_number(v)
        if number is None or v.strip().lower() in ("nan", "inf", "-inf") or v.isdigit():
            return v
        v = number
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def config_keys(run: Run) -> list[str]:
    """Every leaf key of a run's composed config (``.hydra/config.yaml``), dotted."""
    file = run.path / ".hydra" / "config.yaml"
    if not file.is_file():
        return []
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out.append(prefix[:-1])

    walk(yaml.safe_load(file.read_text()) or {}, "")
    return out


def check_names(runs: list[Run], metric: str, x: str | None, metrics: Sequence[str] | None) -> None:
    """ValueError for a ``--metric``/``--metrics`` no run has, or an ``--x`` no run's config has,
    listing the names that exist."""
    have = sorted({t for r in runs for t in (*r.metrics, *r.curves)})
    for name in [metric, *(metrics or [])]:
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


def _as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def hyperparameter(run: Run, key: str) -> Any:
    """``key`` of a run: its override, else the value in its ``.hydra/config.yaml``."""
    if key in run.overrides:
        return run.overrides[key]
    file = run.path / ".hydra" / "config.yaml"
    if file.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(file), key, default=None)
    return None


def plot_vs(runs: list[Run], x: str, metric: str, out: Path) -> Path:
    """Final ``metric`` against hyperparameter ``x``; one line per combination of the other
    varying overrides. Log x axis when the values are positive and span 4x or more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in varying_keys(runs) if k != x]
    groups: dict[str, list[tuple[Any, float]]] = {}
    for r in runs:
        v = r.metrics.get(metric)
        if r.failed or v is None or not math.isfinite(v):
            continue
        label = ", ".join(f"{k}={r.overrides.get(k, '')}" for k in others) or metric
        groups.setdefault(label, []).append((hyperparameter(r, x), v))
    if not groups:
        raise ValueError(f"no finished run has the metric {metric!r} to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs_all = [_as_number(xv) for pts in groups.values() for xv, _ in pts]
    numeric = all(xv is not None for xv in xs_all)
    for label, pts in sorted(groups.items()):
        if numeric:
            pts = sorted(pts, key=lambda p: float(p[0]))
            ax.plot([float(p[0]) for p in pts], [p[1] for p in pts], marker="o", label=label)
        else:
            ax.plot([str(p[0]) for p in pts], [p[1] for p in pts], marker="o", linestyle="none", label=label)
    if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(groups) > 1 or others:
        ax.legend(fontsize="small")
    return _save(fig, out)


def plot_curves(runs: list[Run], metric: str, out: Path) -> Path:
    """The ``metric`` series of every run against the step, labelled by the varying overrides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varying_keys(runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for r in runs:
        pts = r.curves.get(metric)
        if not pts:
            continue
        label = ", ".join(f"{k}={r.overrides.get(k, '')}" for k in keys) or r.name
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 30 else None,
                label=f"{label} (failed)" if r.failed else label)
        drawn += 1
    if not drawn:
        raise ValueError(f"no run has a {metric!r} series to plot")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, out)


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptlab-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a sweep folder, or any folder containing runs")
    ap.add_argument("--metric", default="val/loss", help="rank runs by this scalar (default: val/loss)")
    ap.add_argument("--mode", default="auto", choices=["auto", "min", "max"],
                    help="best = min or max of --metric; auto: max for acc/f1/..., min otherwise")
    ap.add_argument("--metrics", default=None,
                    help="comma-separated metric columns (default: every val/* and test/* scalar)")
    ap.add_argument("--csv", action="store_true", help="print CSV instead of a markdown table")
    ap.add_argument("--plot", type=Path, default=None, help="save a PNG plot here")
    ap.add_argument("--x", default=None, help="hyperparameter on the plot's x axis, e.g. task.optimizer.lr")
    ap.add_argument("--curves", action="store_true", help="plot the --metric curve of every run instead")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.folder.is_dir():
        print(f"gptlab-compare: no such folder: {args.folder}", file=sys.stderr)
        return 2
    paths = find_runs(args.folder)
    if not paths:
        print(f"gptlab-compare: no runs (folders with .hydra/) under {args.folder}", file=sys.stderr)
        return 1
    runs = [load_run(p, args.folder) for p in paths]
    chosen = args.metrics.split(",") if args.metrics else None
    try:
        check_names(runs, args.metric, args.x, chosen)
    except ValueError as e:
        print(f"gptlab-compare: {e}", file=sys.stderr)
        return 2
    runs = rank_runs(runs, args.metric, args.mode)
    keys = varying_keys(runs)
    metrics = metric_columns(runs, args.metric, chosen)
    header, rows = table_rows(runs, keys, metrics)
    if args.csv:
        sys.stdout.write(to_csv(header, rows))
    else:
        fixed = {k: v for k, v in runs[0].overrides.items() if k not in keys} if len(runs) > 1 else {}
        best = metric_mode(args.metric, args.mode)
        print(f"{len(runs)} run(s) in {args.folder}, best first by {args.metric} ({best})"
              + (f"; same in all: {' '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else ""))
        print(to_markdown(header, rows))
    if args.plot:
        if args.curves or (args.x is None and not keys):
            out = plot_curves(runs, args.metric, args.plot)
        else:
            out = plot_vs(runs, args.x or keys[0], args.metric, args.plot)
        print(f"plot saved to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
