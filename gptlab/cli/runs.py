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

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gptlab.results import find_runs, read_result, summary_table
from gptlab.signals import raise_if_stopped, signal_name

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
    the command (exit status 1) when any job failed. It counts the jobs that start, so a sweep that
    is stopped can say which jobs never started (:meth:`report_stop`), and it stops the sweep between
    two jobs when a stop signal arrived during the last one's final step."""

    def __init__(self, max_rows: int = 50):
        self.max_rows = max_rows
        self._config: DictConfig | None = None
        self._planned: list[list[str]] | None = None
        self._started = 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        log.info("sweep folder: %s", Path(config.hydra.sweep.dir).resolve())
        self._config, self._planned, self._started = config, planned_jobs(config), 0
        _RUNNING.append(self)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started += 1

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        raise_if_stopped()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self in _RUNNING:
            _RUNNING.remove(self)
        folder = Path(config.hydra.sweep.dir).resolve()
        metric = config.get("optimized_metric") or "val/loss"
        print(summary_table(folder, metric, self.max_rows), flush=True)
        failed = [p for p in find_runs(folder) if (read_result(p) or {}).get("status") != "ok"]
        print(f"\nsweep folder: {folder}\n  tensorboard --logdir {folder}\n  gptlab-compare {folder}", flush=True)
        if failed:
            names = ", ".join(str(p.relative_to(folder)) for p in failed)
            print(f"{len(failed)} job(s) did not finish: {names} (see FAILED / train.log in each)", flush=True)
            raise SystemExit(1)

    def report_stop(self, signum: int) -> None:
        """Print the table of the jobs that ran and which jobs never started, for a sweep stopped by
        signal ``signum``."""
        if self in _RUNNING:
            _RUNNING.remove(self)
        config = self._config
        folder = Path(config.hydra.sweep.dir).resolve()
        print(summary_table(folder, config.get("optimized_metric") or "val/loss", self.max_rows), flush=True)
        total = f" of {len(self._planned)}" if self._planned is not None else ""
        line = f"\nsweep stopped by {signal_name(signum)} after {self._started}{total} job(s) started"
        if self._planned is None:
            line += "; the jobs after them never started"
        elif self._planned[self._started:]:
            never = self._planned[self._started:]
            line += f"; {len(never)} never started: " + "; ".join(_varying(self._planned, never))
        print(line, flush=True)
        print(f"sweep folder: {folder}\n  gptlab-compare {folder}", flush=True)


_RUNNING: list[SweepSummary] = []
"""The sweep of this process, between its start and its end."""

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def planned_jobs(config: DictConfig) -> list[list[str]] | None:
    """The overrides of every job of a sweep in launch order, as Hydra's basic sweeper expands them
    (the cross product of ``a=1,2 b=3,4`` and ``hydra.sweeper.params``); None for other sweepers
    (Optuna decides its trials as it goes) or when the overrides cannot be expanded here."""
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_")
    if sweeper != BASIC_SWEEPER:
        return None
    try:
        params = config.hydra.sweeper.get("params") or {}
        arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except Exception:  # noqa: BLE001 - only the message gets less precise
        return None
    return [list(job) for batch in batches for job in batch]


def _varying(jobs: list[list[str]], shown: list[list[str]]) -> list[str]:
    """``shown`` jobs as their overrides whose value differs between ``jobs`` (what tells them apart)."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for item in job:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    return [" ".join(item for item in job if len(values[item.partition("=")[0]]) > 1) or " ".join(job)
            for job in shown]


def report_stopped_sweep(signum: int) -> None:
    """When this process runs a sweep: print what :meth:`SweepSummary.report_stop` prints. Else nothing."""
    for sweep in list(_RUNNING):
        sweep.report_stop(signum)


__all__ = ["announce_start", "announce_end", "written_results", "RESULT_ENTRIES", "SweepSummary", "duration", "planned_jobs", "report_stopped_sweep"]
