"""Hydra callbacks of ``gptlab-train`` (set in ``conf/hydra/default.yaml``).

* :class:`ValidateTrainConfig`: the values still to give (``???``) and the config check, before
  Hydra creates the run folder, so a refused run writes nothing at all.
(The sweep's summary and exit status: :class:`gptlab.cli.runs.SweepSummary`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import require_values, user_errors
from gptlab.cli.validation import refuse_overwriting_checkpoints, validate_train_config


class ValidateTrainConfig(Callback):
    """Refuses a bad single-run config with one message and exit status 2, before anything is built
    or written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        require_values(config, "train", "gptlab-train", dict(OmegaConf.select(config, "hydra.runtime.choices") or {}))
        with user_errors("gptlab-train"):
            validate_train_config(config)
            run_dir = OmegaConf.select(config, "hydra.run.dir")
            if run_dir:
                refuse_overwriting_checkpoints([Path(run_dir) / "checkpoints"], config.get("ckpt_path"))
