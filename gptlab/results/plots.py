"""Plots of runs (PNG, through matplotlib, the ``plot`` extra): a final metric against a
hyperparameter, or every run's curve of a metric against the step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gptlab.results.folders import Run, as_number, hyperparameter
from gptlab.results.tables import varying_keys


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
    xs_all = [as_number(xv) for pts in groups.values() for xv, _ in pts]
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

__all__ = ["plot_vs", "plot_curves"]
