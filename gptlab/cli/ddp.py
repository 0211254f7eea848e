"""Lightning's DDP process launcher inside Hydra jobs, sweeps included (see :class:`DDPJobScope`)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig, OmegaConf

from gptlab.lightning_internals import replace_ddp_child_command

# Set by Lightning's DDP launcher for the processes it starts; restored after each job, so the next
# job of a sweep (same process) launches its own processes instead of joining the last job's.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def ddp_child_command(local_rank: int, config_dir: Path) -> tuple[list[str], str]:
    """Command line and cwd of DDP process ``local_rank`` of the current Hydra job, whose composed
    config is ``config_dir/config.yaml``.

    Lightning's own version re-runs ``sys.argv`` with ``hydra.run.dir=<run dir>``: under ``-m`` each
    child then re-launches the whole sweep (a sweeper samples its own trials, a default sweep folder
    gets a new timestamp). Instead the child recomposes exactly this job's config and runs it in the
    job's folder as a single run, without writing a config of its own.
    """
    out = Path(HydraConfig.get().runtime.output_dir).resolve()
    command = [sys.executable, "-m", "gptlab.cli.train", "--config-path", str(config_dir),
               "--config-name", "config", f"hydra.run.dir='{out}'", "hydra.output_subdir=null",
               f"hydra.job.name=train_ddp_process_{local_rank}"]
    return command, get_original_cwd()


class DDPJobScope:
    """Makes Lightning's DDP process launcher work inside Hydra jobs, sweeps included.

    On entry, the launcher builds child commands with :func:`ddp_child_command`. On exit (after the
    job), the children are waited for (killed after ``timeout`` s, or at once when the job failed),
    the process group is destroyed and the launcher's environment variables are restored, so the next
    job in this process starts from scratch. A child that failed fails the job.
    """

    def __init__(self, cfg: DictConfig, timeout: float = 120.0):
        self.cfg, self.timeout = cfg, timeout
        self.trainer: L.Trainer | None = None

    def __enter__(self) -> "DDPJobScope":
        hc = HydraConfig.get()
        saved = Path(hc.runtime.output_dir) / (hc.output_subdir or "") / "config.yaml"
        self._tmp: tempfile.TemporaryDirectory | None = None
        if hc.output_subdir and saved.is_file():
            config_dir = saved.parent.resolve()
        else:  # hydra.output_subdir=null: no .hydra/ to read, so the config goes to a temp folder
            self._tmp = tempfile.TemporaryDirectory(prefix="gptlab-ddp-")
            config_dir = Path(self._tmp.name)
            OmegaConf.save(self.cfg, config_dir / "config.yaml")
        self._restore_launcher = replace_ddp_child_command(functools.partial(ddp_child_command, config_dir=config_dir))
        self._env = {k: os.environ.get(k) for k in _DDP_ENV}
        self._dist_before = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore_launcher()
        procs = list(getattr(getattr(getattr(self.trainer, "strategy", None), "launcher", None), "procs", None) or [])
        if not procs:
            if self._tmp is not None:
                self._tmp.cleanup()
            return
        failed = []
        for rank, proc in enumerate(procs, start=1):
            try:
                proc.wait(timeout=self.timeout if exc is None else 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode:
                failed.append(f"rank {rank}: exit code {proc.returncode}")
        # the launcher's watchdog thread kills this process when a child fails; the children are
        # accounted for now, so it is told there are none left
        self.trainer.strategy.launcher.procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
        if not self._dist_before and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if failed and exc is None:
            raise RuntimeError(f"DDP processes of this job failed ({', '.join(failed)}); see their "
                               f"train_ddp_process_<rank>.log in {HydraConfig.get().runtime.output_dir}")


__all__ = ["DDPJobScope", "ddp_child_command"]
