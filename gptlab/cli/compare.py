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
import sys
from pathlib import Path
from typing import Sequence

from gptlab.results import (check_names, find_runs, load_run, metric_columns, metric_mode, plot_curves, plot_vs,
                            rank_runs, table_rows, to_csv, to_markdown, varying_keys)


DEFAULT_METRIC = "val/loss"
"""What runs are ranked by unless ``--metric`` says otherwise."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gptlab-compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a sweep folder, or any folder containing runs")
    ap.add_argument("--metric", default=None,
                    help="rank runs by this scalar (default: val/loss; runs without it are listed unranked)")
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
    unranked = args.metric is None and not args.plot and not any(
        DEFAULT_METRIC in r.metrics or DEFAULT_METRIC in r.curves for r in runs)
    args.metric = args.metric or DEFAULT_METRIC
    if unranked:  # runs that never validated are still shown (in folder order), not refused
        print(f"gptlab-compare: no run logged {DEFAULT_METRIC} (no validation within their steps, or "
              "limit_val_batches=0); the runs are listed unranked: rank them with --metric", file=sys.stderr)
    try:
        check_names(runs, None if unranked else args.metric, args.x, chosen)
    except ValueError as e:
        print(f"gptlab-compare: {e}", file=sys.stderr)
        return 2
    runs = rank_runs(runs, args.metric, args.mode)
    keys = varying_keys(runs)
    metrics = metric_columns(runs, args.metric, chosen)[1 if unranked else 0:]
    header, rows = table_rows(runs, keys, metrics)
    if args.csv:
        sys.stdout.write(to_csv(header, rows))
    else:
        fixed = {k: v for k, v in runs[0].overrides.items() if k not in keys} if len(runs) > 1 else {}
        best = metric_mode(args.metric, args.mode)
        order = "unranked" if unranked else f"best first by {args.metric} ({best})"
        print(f"{len(runs)} run(s) in {args.folder}, {order}"
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
