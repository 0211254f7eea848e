"""Loggers that keep what an earlier part of a resumed run wrote.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it finds the file at start-up ("previous log
files in this directory will be deleted"), so a run resumed into its own folder (``ckpt_path=
<run>/checkpoints/last.ckpt``) lost the first part's rows. :class:`CSVLogger` appends to the file
instead, as TensorBoard's event files are kept: a resumed run's ``csv/metrics.csv`` holds every step
of both parts. (A kill between two flushes can leave rows of steps after the checkpoint the run
resumes from; the resumed part logs those steps again, with the same values when the resume is exact.)
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers.csv_logs import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an existing ``metrics.csv``: new rows are appended under its
    header, and when a new column appears the file is rewritten with every old row and the union
    of the columns."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))


class CSVLogger(LightningCSVLogger):
    """Lightning's ``CSVLogger`` writing through :class:`AppendingExperimentWriter` (same arguments)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


__all__ = ["AppendingExperimentWriter", "CSVLogger"]
