"""Where a run's results go, and what the console says about them.

* At the start and the end of every run the log (console and ``train.log``) names the run folder.
* Every run leaves ``metrics.json`` in its folder (:mod:`gptlab.results.record`); the sweep summary
  and ``gptlab-compare`` read it (:mod:`gptlab.results`).
* A sweep (``-m``) names its folder when it starts and ends with a table of its jobs (overrides,
  the optimised metric, status), best first, and the ``tensorboard`` / ``gptlab-compare`` commands
  for it (:class:`SweepSummary`, a Hydra callback). If a job failed, the sweep exits with status 1
  after all jobs ran, naming them.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gptlab.results import find_runs, read_result, summary_table

log = logging.getLogger("gptlab")


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def announce_start(folder: str | Path) -> float:
    """Log the run folder; returns the start time for :func:`announce_end`."""
    log.info("run folder: %s", Path(folder).resolve())
    return time.perf_counter()


def announce_end(folder: str | Path, status: str, metrics: Mapping[str, float], started: float,
                 optimized_metric: str | None = None) -> None:
    """Log how the run ended, its main metrics, and where to look next."""
    folder = Path(folder).resolve()
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/")) and math.isfinite(v)}
    if optimized_metric in metrics and optimized_metric not in shown:
        shown = {optimized_metric: metrics[optimized_metric], **shown}
    summary = ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) or "no validation metrics"
    log.info("run %s after %s: %s", status, duration(time.perf_counter() - started), summary)
    present = written_results(folder)
    view = f"; view: tensorboard --logdir {folder}" if "tensorboard/" in present else ""
    log.info("results in %s (%s)%s", folder, ", ".join(present) or "nothing written", view)


RESULT_ENTRIES = ("checkpoints", "tensorboard", "csv", "responses.json", "train.log", "metrics.json")
"""What a run may leave in its folder, in the order the end-of-run line names them."""


def written_results(folder: Path) -> list[str]:
    """The entries of :data:`RESULT_ENTRIES` the run actually wrote (a folder only when it holds
    something: ``debug=fdr`` writes no checkpoint), folders with a trailing ``/``."""
    present = []
    for name in RESULT_ENTRIES:
        path = folder / name
        if path.is_file():
            present.append(name)
        elif path.is_dir() and any(path.iterdir()):
            present.append(f"{name}/")
    return present


class SweepSummary(Callback):
    """Hydra callback: names the sweep folder, then prints a table of its jobs best first and fails
    the command (exit status 1) when any job failed."""

    def __init__(self, max_rows: int = 50):
        self.max_rows = max_rows

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        log.info("sweep folder: %s", Path(config.hydra.sweep.dir).resolve())

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir).resolve()
        metric = config.get("optimized_metric") or "val/loss"
        print(summary_table(folder, metric, self.max_rows), flush=True)
        failed = [p for p in find_runs(folder) if (read_result(p) or {}).get("status") != "ok"]
        print(f"\nsweep folder: {folder}\n  tensorboard --logdir {folder}\n  gptlab-compare {folder}", flush=True)
        if failed:
            names = ", ".join(str(p.relative_to(folder)) for p in failed)
            print(f"{len(failed)} job(s) did not finish: {names} (see FAILED / train.log in each)", flush=True)
            raise SystemExit(1)


__all__ = ["announce_start", "announce_end", "written_results", "RESULT_ENTRIES", "SweepSummary", "duration"]
