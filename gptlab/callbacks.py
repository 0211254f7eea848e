"""Training callbacks: tokens/second and model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

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
