"""``gptlab-train``: compose a run with Hydra, build data, task and trainer, fit (and test).

    gptlab-train                                   # tiny GPT on the bundled short story, CPU
    gptlab-train experiment=ch05_verdict trainer=gpu
    gptlab-train -m task.optimizer.lr=1e-3,3e-4 model.n_layers=2,4
"""

from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd, instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.tokenizer import get_tokenizer

log = logging.getLogger(__name__)


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    """Objects of every ``_target_`` entry in a group like ``callbacks`` or ``logger``."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": value} with TensorBoard-friendly scalar values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)):
        out[prefix[:-1]] = str(list(d))
    else:
        out[prefix[:-1]] = d if isinstance(d, (int, float, str, bool)) else str(d)
    return out


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
        from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
        from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher

        hc = HydraConfig.get()
        saved = Path(hc.runtime.output_dir) / (hc.output_subdir or "") / "config.yaml"
        self._tmp: tempfile.TemporaryDirectory | None = None
        if hc.output_subdir and saved.is_file():
            config_dir = saved.parent.resolve()
        else:  # hydra.output_subdir=null: no .hydra/ to read, so the config goes to a temp folder
            self._tmp = tempfile.TemporaryDirectory(prefix="gptlab-ddp-")
            config_dir = Path(self._tmp.name)
            OmegaConf.save(self.cfg, config_dir / "config.yaml")
        self._modules = (pl_launcher, fabric_launcher)
        self._originals = [m._hydra_subprocess_cmd for m in self._modules]
        for m in self._modules:
            m._hydra_subprocess_cmd = functools.partial(ddp_child_command, config_dir=config_dir)
        self._env = {k: os.environ.get(k) for k in _DDP_ENV}
        self._dist_before = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for m, original in zip(self._modules, self._originals):
            m._hydra_subprocess_cmd = original
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


def build_task(cfg: DictConfig, **extra: Any) -> L.LightningModule:
    """Instantiate ``cfg.task`` with the model, adapter and init settings of the run."""
    adapter = cfg.get("adapter")
    return instantiate(
        cfg.task,
        _convert_="all",  # plain dicts/lists in hparams: checkpoints load with torch.load(weights_only=True)
        model=OmegaConf.to_container(cfg.model, resolve=True),
        adapter=OmegaConf.to_container(adapter, resolve=True) if adapter else None,
        init_from=cfg.get("init_from"),
        compile=cfg.get("compile", False),
        **extra,
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment described by ``cfg``; returns the final metrics (floats).

    Loggers are closed whatever happens (status ``failed`` on an exception, which is re-raised),
    so a failing sweep job leaves complete event files and no open writers behind.
    """
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    tokenizer = get_tokenizer()
    log.info("data: %s", cfg.data._target_)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    log.info("task: %s", cfg.task._target_)
    task = build_task(cfg)
    n_total = task.model.num_params()
    n_train = task.trainable_parameter_count()
    log.info("parameters: %s total, %s trainable (%.2f%%)", f"{n_total:,}", f"{n_train:,}",
             100 * n_train / max(1, n_total))

    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    try:
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        for lg in loggers:
            lg.log_metrics({"params/total": n_total, "params/trainable": n_train}, step=0)
        if HydraConfig.initialized():
            with DDPJobScope(cfg) as scope:
                scope.trainer = trainer
                metrics = fit_and_test(cfg, trainer, task, datamodule)
        else:
            metrics = fit_and_test(cfg, trainer, task, datamodule)
        # TensorBoard HPARAMS: the run's hyperparameters next to its real final metrics
        hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
        hparams["params/trainable"] = n_train
        final = {k: v for k, v in metrics.items()
                 if k.startswith(("val/", "test/", "train/")) and math.isfinite(v)}
        log_hparams(loggers, hparams, final, step=trainer.global_step)
    except BaseException:
        for lg in loggers:
            lg.finalize("failed")
        raise
    for lg in loggers:
        lg.finalize("success")
    log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


def fit_and_test(cfg: DictConfig, trainer: L.Trainer, task: L.LightningModule,
                 datamodule: L.LightningDataModule) -> dict[str, float]:
    """``trainer.fit`` (when ``cfg.train``; after a validation pass when ``cfg.validate_before_fit``
    and not resuming), then ``trainer.test`` on the best checkpoint (when ``cfg.test``); the scalar
    callback metrics after both."""
    if cfg.get("train", True):
        if cfg.get("validate_before_fit") and not cfg.get("ckpt_path"):
            trainer.validate(task, datamodule=datamodule)  # logged at step 0: the book's first evaluation
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        ckpt = "best" if cfg.get("train", True) and trainer.checkpoint_callback and \
            trainer.checkpoint_callback.best_model_path else None
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    return metrics


def log_hparams(loggers: list[Any], hparams: dict[str, Any], final: dict[str, float], step: int) -> None:
    """Hyperparameters to every logger; TensorBoard also gets ``final`` as the session's metrics.

    TensorBoard's HPARAMS tab reads each metric from the scalar series of the same tag, so the final
    values are written as scalars at the last step (not at step 0, where they would bend the curves
    back to the start).
    """
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger) and final:
            lg.log_hyperparams(hparams, metrics=final, step=step)
        else:
            lg.log_hyperparams(hparams)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; returns ``cfg.optimized_metric`` for sweepers."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg)
    except Exception:
        if not multirun:
            raise
        # one failing sweep job must not end the sweep: record why and report a NaN metric
        out = Path(HydraConfig.get().runtime.output_dir)
        (out / "FAILED").write_text(traceback.format_exc())
        log.exception("job %s failed; the sweep goes on (traceback in %s)", HydraConfig.get().job.num,
                      out / "FAILED")
        return float("nan")
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if metric not in metrics:
        log.warning("optimized_metric %r was not logged; available: %s", metric, sorted(metrics))
        return float("nan")  # a sweeper records a failed trial instead of crashing on None
    return metrics[metric]


if __name__ == "__main__":
    main()
