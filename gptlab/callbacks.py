"""Training callbacks: tokens/second and model-FLOPs utilisation (MFU), a compact progress bar, the
run's metrics in its log, and a checkpoint on Ctrl-C or a crash.

Why not Lightning's ``ThroughputMonitor``: it calls ``torch.cuda.synchronize()`` after every batch,
the very host sync gptlab keeps off the training step, and its device table (``get_available_flops``)
has no entry for the plain "NVIDIA H200" name, so no MFU there. ``ThroughputMonitor`` below syncs
once per logging window.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger("gptlab")

# Dense peak TFLOP/s by device-name fragment: (bf16/fp16 tensor cores, tf32). Order matters: the
# first fragment found in torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100").
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 494.0),
    ("GH200", 989.0, 494.0),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.0),   # SXM / HBM3
    ("H800", 989.0, 494.0),
    ("B200", 2250.0, 1100.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
]


def peak_flops(device: torch.device | str, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s of ``device`` for ``precision`` (``bf16``/``16`` or ``32``); None if unknown
    (CPUs, unlisted GPUs)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, half, tf32 in PEAK_TFLOPS:
        if fragment in name:
            return (tf32 if str(precision).startswith("32") else half) * 1e12
    return None


def token_tensors(batch: Any) -> list[torch.Tensor]:
    """The token-id tensors the model reads in a batch: ``input_ids``, or every ``*_input_ids``
    (preference batches: ``chosen_input_ids`` and ``rejected_input_ids``), or a tuple's first item."""
    if isinstance(batch, dict):
        return [v for k, v in batch.items() if k == "input_ids" or k.endswith("_input_ids")]
    return [batch[0]]


class ThroughputMonitor(L.Callback):
    """Logs ``throughput/tokens_per_sec``, ``throughput/step_time_ms`` and (on known GPUs)
    ``throughput/mfu`` every ``log_every_n_steps`` optimizer steps.

    Timing is taken over a window of steps with one device sync per window, so it adds no host
    sync to the step itself. The first ``skip_steps`` (compilation, cuDNN autotuning) are ignored.
    """

    def __init__(self, log_every_n_steps: int = 10, skip_steps: int = 2):
        self.every = log_every_n_steps
        self.skip = skip_steps
        self._t0: float | None = None
        self._tokens = 0
        self._steps = 0
        self._flops_per_token: float | None = None
        self.last: dict[str, float] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None and trainer.global_step >= self.skip:
            self._sync(pl_module)
            self._t0, self._tokens, self._steps = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._t0 is None:
            return
        ids = token_tensors(batch)
        if not ids:  # no token ids in the batch (PPO's prompt batches): nothing to count
            return
        self._tokens += sum(t.numel() for t in ids) * trainer.world_size
        self._steps += 1
        if self._steps < self.every:
            return
        self._sync(pl_module)
        dt = time.perf_counter() - self._t0
        tps = self._tokens / dt
        metrics = {"throughput/tokens_per_sec": tps, "throughput/step_time_ms": 1000 * dt / self._steps}
        if self._flops_per_token is None:
            model = getattr(pl_module, "model", None)
            fpt = getattr(model, "flops_per_token", None)
            self._flops_per_token = float(fpt(ids[0].shape[-1])) if fpt else 0.0
        peak = peak_flops(pl_module.device, str(trainer.precision))
        if peak and self._flops_per_token:
            metrics["throughput/mfu"] = tps * self._flops_per_token / (peak * trainer.world_size)
        self.last = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self._t0, self._tokens, self._steps = time.perf_counter(), 0, 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, compact: the epoch and the optimizer step out of the run's total (runs
    that ``max_steps`` ends show where they stand), and the metrics under short names (``loss``,
    ``val_loss``, ``val_acc``, ...) to 4 significant digits, so the line fits an 80-column terminal.
    It refreshes (reading the logged values: a host sync on GPU) every ``refresh_rate`` steps."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        raw = super().get_metrics(trainer, pl_module)
        raw.pop("v_num", None)
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key.endswith("_epoch") and key[: -len("_epoch")] + "_step" in raw:
                continue  # the step value is the one that moves
            name = key.removesuffix("_step").removeprefix("train/").replace("/", "_")
            out[name] = f"{value:.4g}" if isinstance(value, float) else value
        return out

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._should_update(batch_idx + 1, self.train_progress_bar.total):
            self.train_progress_bar.set_description(self.description(trainer), refresh=False)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.description(trainer))

    @staticmethod
    def description(trainer: L.Trainer) -> str:
        total = trainer.estimated_stepping_batches
        steps = f"/{int(total)}" if math.isfinite(total) else ""
        return f"Epoch {trainer.current_epoch} | step {trainer.global_step}{steps}"


class LogMetrics(L.Callback):
    """Writes the run's metrics to its log (console and ``train.log``): after every validation, and
    the test results, so the log file tells how the run went without TensorBoard."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = self._pick(trainer, ("val/", "train/loss_step", "train/loss"))
        if shown:
            log.info("epoch %d, step %d: %s", trainer.current_epoch, trainer.global_step, shown)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            log.info("test: %s", self._pick(trainer, ("test/",)))

    @staticmethod
    def _pick(trainer: L.Trainer, prefixes: tuple[str, ...]) -> str:
        shown: dict[str, float] = {}
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith(prefixes) and value.numel() == 1 and not key.endswith("_epoch"):
                shown[key.removesuffix("_step")] = float(value)  # train/loss_step wins over train/loss
        return ", ".join(f"{k} {v:.4g}" for k, v in shown.items())


class ExceptionCheckpoint(L.Callback):
    """On Ctrl-C or a crash during ``fit``, saves ``<dirpath>/<filename>.ckpt`` to resume from with
    ``ckpt_path=``. Unlike Lightning's ``OnExceptionCheckpoint`` it never makes ``fit`` resume from
    "last" by itself (a run resumes only when asked), it writes nothing before the first optimizer
    step (there is nothing to resume), and it keeps the file after teardown."""

    def __init__(self, dirpath: str | Path, filename: str = "interrupted"):
        if not filename:
            raise ValueError("ExceptionCheckpoint: filename must not be empty")
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.info("%s at step %d: saved %s (resume with ckpt_path=%s)", type(exception).__name__,
                     trainer.global_step, self.path, self.path)
