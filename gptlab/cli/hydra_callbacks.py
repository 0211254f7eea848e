"""Hydra callbacks of ``gptlab-train`` (set in ``conf/hydra/default.yaml``).

* :class:`ValidateTrainConfig`: the values still to give (``???``) and the config check, before
  Hydra creates the run folder, so a refused run writes nothing at all; then the run folder's lock
  (:mod:`gptlab.run_lock`), taken before Hydra writes ``.hydra/`` and ``train.log`` into it, so a
  second run into a folder in use touches nothing.
(The sweep's summary and exit status: :class:`gptlab.cli.runs.SweepSummary`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import require_values, user_errors
from gptlab.cli.validation import refuse_overwriting_checkpoints, validate_train_config
from gptlab.run_lock import RunLock, lock_run_folder, release_run_folder



class ValidateTrainConfig(Callback):
    """Refuses a bad single-run config with one message and exit status 2, before anything is built
    or written; then locks the run folder (a sweep: the sweep folder) for this process."""

    def __init__(self) -> None:
        self._lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        require_values(config, "train", "gptlab-train", dict(OmegaConf.select(config, "hydra.runtime.choices") or {}))
        with user_errors("gptlab-train"):
            validate_train_config(config)
            run_dir = OmegaConf.select(config, "hydra.run.dir")
            if run_dir and rank_zero_only.rank == 0:  # DDP processes > 0 run in the folder rank 0 holds
                self._lock = lock_run_folder(run_dir, lambda: refuse_overwriting_checkpoints(
                    [Path(run_dir) / "checkpoints"], config.get("ckpt_path")))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_run_folder(self._lock)
        self._lock = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors("gptlab-train"):
            self._lock = lock_run_folder(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_run_folder(self._lock)
        self._lock = None
