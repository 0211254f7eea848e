"""``gptlab-train``: compose a run with Hydra, build data, task and trainer, fit (and test).

    gptlab-train                                   # tiny GPT on the bundled short story, CPU
    gptlab-train experiment=ch05_verdict trainer=gpu
    gptlab-train -m task.lr=1e-3,3e-4 model.n_layers=2,4
"""

from __future__ import annotations

import logging
import math
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.cli.ddp import DDPJobScope
from gptlab.cli.hparams import flatten, log_hparams
from gptlab.tokenizer import get_tokenizer

log = logging.getLogger(__name__)


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    """Objects of every ``_target_`` entry in a group like ``callbacks`` or ``logger``."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


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
    if not cfg.trainer.get("enable_progress_bar", True):  # the bar's own switch wins over callbacks.progress_bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
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
    """``trainer.fit`` (when ``cfg.train``), then ``trainer.test`` on the best checkpoint (when
    ``cfg.test``); the scalar callback metrics after both."""
    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        ckpt = "best" if cfg.get("train", True) and trainer.checkpoint_callback and \
            trainer.checkpoint_callback.best_model_path else None
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    return metrics


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
