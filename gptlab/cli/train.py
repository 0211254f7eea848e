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


def build_task(cfg: DictConfig, **extra: Any) -> L.LightningModule:
    """Instantiate ``cfg.task`` with the model, adapter and init settings of the run."""
    adapter = cfg.get("adapter")
    return instantiate(
        cfg.task,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        adapter=OmegaConf.to_container(adapter, resolve=True) if adapter else None,
        init_from=cfg.get("init_from"),
        compile=cfg.get("compile", False),
        **extra,
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment described by ``cfg``; returns the final metrics (floats)."""
    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    tokenizer = get_tokenizer()
    log.info("data: %s", cfg.data._target_)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    log.info("task: %s", cfg.task._target_)
    task = build_task(cfg)
    n_total = task.model.num_params()
    n_train = task.trainable_parameter_count()
    log.info("parameters: %s total, %s trainable", f"{n_total:,}", f"{n_train:,}")

    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_metrics({"params/total": n_total, "params/trainable": n_train}, step=0)

    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test"):
        ckpt = "best" if cfg.get("train", True) and trainer.checkpoint_callback and \
            trainer.checkpoint_callback.best_model_path else None
        trainer.test(task, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})

    # TensorBoard HPARAMS: the run's hyperparameters next to its real final metrics
    hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
    hparams["params/trainable"] = n_train
    final = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/", "train/")) and math.isfinite(v)}
    for lg in loggers:
        lg.log_hyperparams(hparams, metrics=final) if final else lg.log_hyperparams(hparams)
        lg.finalize("success")
    log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
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
    if metric and metric not in metrics:
        log.warning("optimized_metric %r was not logged; available: %s", metric, sorted(metrics))
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    main()
