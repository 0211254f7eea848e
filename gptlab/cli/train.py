"""``gptlab-train``: compose a run with Hydra, build data, task and trainer, fit (and test).

    gptlab-train                                   # tiny GPT on the bundled short story, CPU
    gptlab-train experiment=ch05_verdict trainer=gpu
    gptlab-train -m task.optimizer.lr=1e-3,3e-4 model.n_layers=2,4
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.cli import entry_point, full_tracebacks, user_error
from gptlab.errors import InvalidInput, storage_cause
from gptlab.run_lock import release_all_run_folders
from gptlab.signals import StopSignals, exit_status, signal_name

if TYPE_CHECKING:
    import lightning as L
    from omegaconf import DictConfig

log = logging.getLogger("gptlab")
GROUPS = ("model", "data", "task", "adapter", "trainer", "logger", "callbacks", "experiment", "hparams_search",
          "hydra/launcher", "debug")
"""Config groups ``gptlab-train --help`` lists."""


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    """Objects of every ``_target_`` entry in a group like ``callbacks`` or ``logger``."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig

    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


class _DropTips(logging.Filter):
    """Lightning's advertisements ("Tip: try installing litlogger ...") are not about this run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("\U0001f4a1 Tip")


def route_logs() -> None:
    """Lightning's messages and Python warnings into the run's log handlers (console and
    ``train.log``, set up by Hydra), without Lightning's own console handler, its tips, or
    deprecation notices about Lightning's internals that a user cannot act on."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())
    logging.captureWarnings(True)
    ignore_known_warnings()


def ignore_known_warnings() -> None:
    """Warnings about nothing a user of ``gptlab-train`` can change: a deprecation inside Lightning, and
    Lightning's note that a data module with a val split meets a task without a validation stage (PPO
    learns from its own rollouts; the prompts' val split serves other tools)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")


def build_task(cfg: DictConfig, **extra: Any) -> L.LightningModule:
    """Instantiate ``cfg.task`` with the model, adapter and init settings of the run."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    adapter = cfg.get("adapter")
    reward = cfg.task.get("reward")
    if isinstance(reward, DictConfig) and "_target_" in reward and "reward" not in extra:
        # code chosen by the run's own config (task/reward=...), built here: the task node is not
        # instantiated recursively (its optimizer node stays a plain dict) and never stores it
        extra["reward"] = instantiate(reward)
    rewards = cfg.task.get("rewards")
    if isinstance(rewards, DictConfig) and "rewards" not in extra:  # GRPO: name -> reward function
        extra["rewards"] = {name: instantiate(node) for name, node in rewards.items() if node is not None}
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

    Every config value is checked first (:func:`~gptlab.cli.validation.validate_train_config`), the
    run folder is locked for this process (:mod:`gptlab.run_lock`: a second run into it is refused),
    and a fresh run refuses a checkpoint folder that already holds checkpoints. Loggers are closed
    whatever happens (status ``failed`` on an exception, which is re-raised), so a failing sweep job
    leaves complete event files and no open writers behind; the run folder gets ``metrics.json``
    with the status (``ok``/``failed``/``interrupted``) and final metrics.
    """
    from lightning.pytorch.utilities import rank_zero_only  # heavy imports wait until a run starts

    from gptlab.cli.validation import refuse_overwriting_checkpoints, validate_train_config
    from gptlab.run_lock import lock_run_folder, release_run_folder

    validate_train_config(cfg)
    out = Path(cfg.paths.output_dir)
    lock = None
    if rank_zero_only.rank == 0:  # DDP processes start after rank 0 has checked (and may have saved)
        # one run per folder; the lock is already this process's when the Hydra callback took it
        lock = lock_run_folder(out, lambda: refuse_overwriting_checkpoints(checkpoint_folders(cfg),
                                                                           cfg.get("ckpt_path")))
    try:
        return _train(cfg, out)
    finally:
        release_run_folder(lock)


def _train(cfg: DictConfig, out: Path) -> dict[str, float]:
    """:func:`train` once the config is checked and the run folder ``out`` is this process's."""
    import lightning as L  # the heavy imports wait until a run starts: --help stays instant
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf import OmegaConf

    from gptlab.cli.ddp import DDPJobScope
    from gptlab.cli.hparams import log_hparams, select_hparams
    from gptlab.cli.runs import announce_end, announce_start
    from gptlab.results import write_result
    from gptlab.tokenizer import describe, get_tokenizer

    started = announce_start(out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    tokenizer = get_tokenizer(cfg.get("tokenizer"))
    log.info("tokenizer: %s, %s ids", describe(tokenizer), f"{tokenizer.n_vocab:,}")
    log.info("data: %s", cfg.data._target_)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, _convert_="all")
    # read the data first: a bad data file is reported before the model, logger or trainer exist
    if rank_zero_only.rank == 0:
        datamodule.prepare_data()
    datamodule.setup("fit")
    log.info("task: %s", cfg.task._target_)
    task = build_task(cfg, tokenizer=tokenizer)
    n_total = task.total_parameter_count()
    n_train = task.trainable_parameter_count()
    log.info("parameters: %s total, %s trainable (%.2f%%)", f"{n_total:,}", f"{n_train:,}",
             100 * n_train / max(1, n_total))

    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not cfg.trainer.get("enable_progress_bar", True):  # the bar's own switch wins over callbacks.progress_bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_group(cfg.get("logger"))
    if not loggers and any(isinstance(cb, LearningRateMonitor) for cb in callbacks):
        log.info("logger=none: the learning-rate monitor is left out (it needs a logger)")
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    metrics: dict[str, float] = {}
    try:
        trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
        announce_effective_batch(trainer, datamodule)
        for lg in loggers:
            lg.log_metrics({"params/total": n_total, "params/trainable": n_train}, step=0)
        if HydraConfig.initialized():
            with DDPJobScope(cfg) as scope:
                scope.trainer = trainer
                metrics = fit_and_test(cfg, trainer, task, datamodule)
        else:
            metrics = fit_and_test(cfg, trainer, task, datamodule)
        # TensorBoard HPARAMS: the run's hyperparameters next to its real final metrics
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        hparams = select_hparams(OmegaConf.to_container(cfg, resolve=True), choices)
        hparams["params/trainable"] = n_train
        final = {k: v for k, v in metrics.items()
                 if k.startswith(("val/", "test/", "train/")) and math.isfinite(v)}
        log_hparams(loggers, hparams, final, step=trainer.global_step)
    except BaseException as e:
        for lg in loggers:
            lg.finalize("failed")
        status = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"
        if rank_zero_only.rank == 0:  # DDP: the other ranks run in the same folder
            try:
                write_result(out, status, metrics, cfg.get("optimized_metric"), time.perf_counter() - started,
                             error=f"{type(e).__name__}: {e}")
            except OSError as w:  # a full or read-only disk must not hide the error that ended the run
                log.error("could not write %s: %s", out / "metrics.json", storage_cause(w))
            log.info("run %s; folder: %s", status, out.resolve())
        raise
    for lg in loggers:
        lg.finalize("success")
    if rank_zero_only.rank == 0:
        write_result(out, "ok", metrics, cfg.get("optimized_metric"), time.perf_counter() - started)
        announce_end(out, "finished", metrics, started, cfg.get("optimized_metric"))
    return metrics


def announce_effective_batch(trainer: L.Trainer, datamodule: L.LightningDataModule) -> int:
    """Log and return the effective batch: examples per optimizer step over all processes
    (per-device batch x devices x nodes x accumulated batches). Raises the data module's
    ConfigError when ``data.global_batch_size`` does not split over them."""
    accumulate = trainer.accumulate_grad_batches
    per_device = datamodule.per_device_batch_size(trainer.world_size, accumulate)
    effective = per_device * trainer.world_size * accumulate
    log.info("effective batch: %d = %d per device x %d device(s) x %d node(s) x %d accumulated batch(es) per "
             "optimizer step", effective, per_device, trainer.num_devices, trainer.num_nodes, accumulate)
    return effective


def checkpoint_folders(cfg: DictConfig) -> list[str]:
    """The folders the run's callbacks write checkpoints to (their ``dirpath``)."""
    from omegaconf import DictConfig

    folders = {str(node.dirpath) for node in (cfg.get("callbacks") or {}).values()
               if isinstance(node, DictConfig) and node.get("dirpath")}
    return sorted(folders)


def fit_and_test(cfg: DictConfig, trainer: L.Trainer, task: L.LightningModule,
                 datamodule: L.LightningDataModule) -> dict[str, float]:
    """``trainer.fit`` (when ``cfg.train``; after a validation pass when ``cfg.validate_before_fit``
    and not resuming), then ``trainer.test`` on the best checkpoint (when ``cfg.test``); the scalar
    callback metrics after both."""
    if cfg.get("train", True):
        if cfg.get("validate_before_fit") and not cfg.get("ckpt_path"):
            trainer.validate(task, datamodule=datamodule, verbose=False)  # at step -1: before the first update
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if needs_final_validation(trainer, task):
            # a run that max_steps ended before its first validation: the final weights are measured,
            # so the run (and a sweep's optimized_metric) has val/* metrics
            trainer.validate(task, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and k != "step"}
    if cfg.get("test"):
        # the best checkpoint by path: "best" makes Lightning warn about every ModelCheckpoint it sees
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = best if cfg.get("train", True) and best else None
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and k != "step"})
    return metrics


def needs_final_validation(trainer: L.Trainer, task: L.LightningModule) -> bool:
    """Whether fitting ended without a single validation although the task validates (it has a
    ``validation_step``) and validation batches are allowed (``limit_val_batches`` is not 0)."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    validated = any(k.startswith("val/") for k in trainer.callback_metrics)
    allowed = trainer.limit_val_batches != 0 and not trainer.fast_dev_run
    # no validation data (GRPO on generated problems with data.num_val=0): nothing to validate on
    has_data = sum(trainer.num_val_batches or [0]) > 0
    return (not validated and allowed and has_data and trainer.global_step > 0
            and is_overridden("validation_step", task))


def run_job(cfg: DictConfig) -> float | None:
    """One Hydra job of ``gptlab-train``: :func:`train`, then ``cfg.optimized_metric`` for sweepers.

    A single run that fails on input a user can fix exits with one line (status 2 for refused input,
    1 otherwise) and leaves only its log; a failing sweep job records why (``FAILED``) and reports a
    NaN metric, so the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gptlab.callbacks import NonFiniteError
    from gptlab.checkpoint_io import CheckpointWriteError

    route_logs()
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = train(cfg)
    except Exception as e:
        out = Path(HydraConfig.get().runtime.output_dir)
        err = user_error(e) or (e if isinstance(e, (NonFiniteError, CheckpointWriteError)) else None)
        if multirun or not isinstance(err, InvalidInput):  # a refused single run leaves only its log
            try:
                (out / "FAILED").write_text(traceback.format_exc())
            except OSError as w:  # a full or read-only disk must not hide the error that ended the run
                log.error("could not write %s: %s", out / "FAILED", storage_cause(w))
        if not multirun:
            if err is None or (full_tracebacks() and not isinstance(err, InvalidInput)):
                raise
            sys.stderr.write(f"gptlab-train: error: {err}\n")
            raise SystemExit(2 if isinstance(err, InvalidInput) else 1) from None
        # one failing sweep job must not end the sweep: record why and report a NaN metric
        log.error("job %s failed (%s); the sweep goes on (traceback in %s)", HydraConfig.get().job.num,
                  err or f"{type(e).__name__}: {e}", out / "FAILED")
        return float("nan")
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if metric not in metrics:
        log.warning("optimized_metric %r was not logged; available: %s", metric, sorted(metrics))
        return float("nan")  # a sweeper records a failed trial instead of crashing on None
    return metrics[metric]


_entry = entry_point("train", run_job, groups=GROUPS)


def main() -> None:
    """Console entry: ``gptlab-train --help`` written from conf/train.yaml; everything else through
    Hydra. A run or sweep stopped by SIGTERM/SIGINT exits with 128 + the signal (:mod:`gptlab.signals`)."""
    with StopSignals() as stop:
        try:
            _entry()
        except BaseException:
            if stop.received is None:
                raise
            from gptlab.cli.runs import report_stopped_sweep  # Hydra's: only once a sweep has run

            # a stopped run is not a success: 128 + the signal, as shells report it (143: SIGTERM)
            report_stopped_sweep(stop.received)
            sys.stderr.write(f"gptlab-train: stopped by {signal_name(stop.received)} "
                             f"(exit status {exit_status(stop.received)})\n")
            raise SystemExit(exit_status(stop.received)) from None
        finally:
            release_all_run_folders()  # the lock files of a run that ended in an error too

if __name__ == "__main__":
    main()
