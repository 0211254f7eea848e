"""Hydra callbacks of ``gptlab-train`` (set in ``conf/hydra/default.yaml``).

* :class:`ValidateTrainConfig`: the config check, before Hydra creates the run folder, so a refused
  run writes nothing at all.
* :class:`SweepStatus`: after a ``-m`` sweep, a non-zero exit status when any job failed, naming them
  (each failed job keeps running the sweep and leaves a ``FAILED`` file in its folder).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gptlab.cli.validation import refuse_bad_input, refuse_overwriting_checkpoints, validate_train_config

FAILED_FILE = "FAILED"


class ValidateTrainConfig(Callback):
    """Refuses a bad single-run config with one message and exit status 2, before anything is built
    or written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with refuse_bad_input("gptlab-train"):
            validate_train_config(config)
            run_dir = OmegaConf.select(config, "hydra.run.dir")
            if run_dir:
                refuse_overwriting_checkpoints([Path(run_dir) / "checkpoints"], config.get("ckpt_path"))


class SweepStatus(Callback):
    """Ends a sweep with exit status 1 when any of its jobs failed, listing them."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        failed = sorted(sweep.rglob(FAILED_FILE), key=lambda p: str(p))
        if not failed:
            return
        jobs = sum(1 for _ in sweep.rglob("overrides.yaml"))
        lines = [f"gptlab-train: {len(failed)} of {jobs} sweep jobs failed:"]
        for marker in failed:
            job = marker.parent
            overrides = job / ".hydra" / "overrides.yaml"
            args = " ".join(yaml.safe_load(overrides.read_text()) or []) if overrides.is_file() else ""
            reason = marker.read_text().strip().splitlines()[0] if marker.stat().st_size else "?"
            lines.append(f"  {job} ({args}): {reason}")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
        raise SystemExit(1)
