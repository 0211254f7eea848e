"""Training callbacks: tokens/second and model-FLOPs utilisation (MFU); checkpoints that do not
wait for a metric, exact resumption, and a guard against non-finite losses and gradients; a compact
progress bar and the run's metrics in its log.

Why not Lightning's ``ThroughputMonitor``: it calls ``torch.cuda.synchronize()`` after every batch,
the very host sync gptlab keeps off the training step, and its device table (``get_available_flops``)
has no entry for the plain "NVIDIA H200" name, so no MFU there. ``ThroughputMonitor`` below syncs
once per logging window.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gptlab.checks import ConfigRules, boolean, choice, integer, require
from gptlab.errors import CheckpointWriteError, NonFiniteError
from gptlab.lightning_internals import restore_loader_position, save_now

log = logging.getLogger(__name__)

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


class ThroughputMonitor(ConfigRules, L.Callback):
    """Logs ``throughput/tokens_per_sec``, ``throughput/step_time_ms`` and (on known GPUs)
    ``throughput/mfu`` every ``log_every_n_steps`` optimizer steps.

    Timing is taken over a window of steps with one device sync per window, so it adds no host
    sync to the step itself. The first ``skip_steps`` (compilation, cuDNN autotuning) are ignored.
    """

    RULES = {"log_every_n_steps": integer(ge=1), "skip_steps": integer(ge=0)}

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


# ----------------------------------------------------------------------------- checkpoints
class StepCheckpoint(ConfigRules, ModelCheckpoint):
    """``last.ckpt``, the full training state to resume from, every ``every_n_train_steps`` optimizer
    steps and when training ends, whatever metrics exist (it monitors nothing, so it never waits for
    a first validation). ``keep_every=true`` also keeps each of them as ``step<N>.ckpt``.

    Names never fork: ``last.ckpt`` (and ``step<N>.ckpt``) are replaced, never written beside as
    ``last-v1.ckpt`` (Lightning's version counter, which a resume into a moved folder used to
    trigger, leaving ``last.ckpt`` at the old step for the next resume to go back to).
    """

    RULES = {"every_n_train_steps": integer(ge=1), "keep_every": boolean()}

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, keep_every: bool = False,
                 filename: str = "step{step:06d}"):
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_last=True,
                         save_top_k=-1 if keep_every else 0, every_n_train_steps=every_n_train_steps,
                         auto_insert_metric_name=False, enable_version_counter=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the final state too, when the run does not end on a multiple of every_n_train_steps
        save_now(self, trainer)


class InterruptCheckpoint(L.Callback):
    """Saves ``<dirpath>/<filename>.ckpt`` (full state) when fitting stops on Ctrl-C or an error, so
    the run can resume from where it stopped.

    Nothing is saved when no optimizer step was completed in this run (there is nothing new to keep),
    when the error was a non-finite loss or gradient (the state is not worth resuming), or when a
    checkpoint could not be written (the disk is full). Unlike Lightning's ``OnExceptionCheckpoint``
    it does not make ``trainer.fit(ckpt_path=None)`` look for a previous "last" checkpoint: a run
    resumes only when ``ckpt_path`` says so.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted"):
        self.dirpath, self.filename = Path(dirpath), filename
        self._start_step: int | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (NonFiniteError, CheckpointWriteError)) or trainer.fast_dev_run:
            return
        if self._start_step is None or trainer.global_step <= self._start_step:
            rank_zero_info(f"{type(exception).__name__} before the first training step of this run: "
                           f"no {self.path.name} written")
            return
        try:
            trainer.save_checkpoint(self.path)
        except Exception as e:  # noqa: BLE001 - never hide the error that stopped the run
            log.error("could not save %s: %s", self.path, e)
            return
        rank_zero_info(f"{type(exception).__name__} at step {trainer.global_step}: saved {self.path}; "
                       f"resume with ckpt_path={self.path}")


# ----------------------------------------------------------------------------- exact resume
def rng_states() -> dict[str, Any]:
    """The states of every random number generator training may draw from (torch CPU and CUDA,
    numpy, Python), in types ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(L.Callback):
    """Makes a resumed run continue exactly like the uninterrupted one (same batches, same dropout
    masks, same per-step losses).

    * Saves the random number generator states in every full checkpoint and restores them when
      training starts from one (Lightning saves none of them).
    * Hands the training loader its saved position. Lightning restores stateful loaders only when the
      train loader is first built after the checkpoint is read; a ``configure_optimizers`` that asks
      for ``trainer.estimated_stepping_batches`` (the LR schedule does) builds it earlier, and the
      saved position is silently dropped (Lightning issue #20550). Here it is applied at the start of
      training and the loader's iterator is rebuilt, as Lightning's own resume path does.
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore_loader_position(trainer)
        if self._rng is not None:
            # last: building loaders and iterators above draws from the global RNG
            set_rng_states(self._rng)
            self._rng = None


# ----------------------------------------------------------------------------- non-finite guard
_GRAD_NORM = "_step_grad_norm"


def step_grad_norm(pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The global L2 norm (a 0-dim tensor on the gradients' device, no host sync) of the gradients
    of ``optimizer``'s parameters, computed once per optimizer step: :class:`NonFiniteGuard`'s check
    and the task's clipping (``GPTTask.configure_gradient_clipping``) share it instead of reading
    every gradient twice. Kept on ``pl_module`` until its next backward (:func:`forget_step_grad_norm`)."""
    norm = pl_module.__dict__.get(_GRAD_NORM)
    if norm is None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False) if grads else torch.zeros(())
        pl_module.__dict__[_GRAD_NORM] = norm
    return norm


def forget_step_grad_norm(pl_module: L.LightningModule) -> None:
    """Drop the norm :func:`step_grad_norm` kept: the gradients are about to change (a backward,
    or a step whose gradients were dropped)."""
    pl_module.__dict__.pop(_GRAD_NORM, None)


ACTIONS = ("error", "skip")


@dataclass
class _PendingCheck:
    """One optimizer step's verdict on its way to the host (see :class:`NonFiniteGuard`)."""

    where: str                 # "step N (epoch E, batch B)"
    ok: torch.Tensor           # bool, on the CPU (pinned when copied from a GPU)
    ready: Any                 # a CUDA event recorded after the copy, or None (already on the CPU)
    losses: list[torch.Tensor]
    norm: torch.Tensor | None


class NonFiniteGuard(ConfigRules, L.Callback):
    """Stops training (``action=error``) or skips the optimizer step (``action=skip``) when the loss
    or the global gradient norm is NaN or infinite.

    The check runs after backward and before the optimizer step, so the weights and the optimizer
    state never take a non-finite update, and no checkpoint is written for the failing step (the last
    good one stays). An update with finite gradients can still overflow the weights (a huge learning
    rate): the checkpoint writer (:func:`gptlab.checkpoint_io.refuse_non_finite_weights`) then
    refuses to save them with the same error. A skipped step drops its gradients; ``max_consecutive_skips`` of them in a row end
    the run with the same error. Under DDP the gradients are already averaged across processes at this
    point, so every process makes the same decision. With fp16 mixed precision the gradient scaler
    already skips steps with infinite gradients, so only the loss is checked.

    No host sync on the step: with a fused optimizer (AdamW/Adam/SGD ``fused=True``, gptlab's
    default) the verdict goes to the optimizer as its ``found_inf`` tensor, so the fused kernel itself
    leaves the weights, moments and step count as they were when the step is not finite, and the
    verdict is copied to the host without waiting; it is read when it has arrived (on a GPU usually
    one step later, on the CPU at once). A checkpoint, the end of training, or a validation waits for
    every verdict first, so none is written after a non-finite step with ``action=error``. Other
    optimizers are checked by reading the verdict at once (a sync on a GPU).
    """

    RULES = {"action": choice(*ACTIONS, name="callbacks.nonfinite_guard.action"),
             "max_consecutive_skips": integer(ge=0)}

    def __init__(self, action: str = "error", max_consecutive_skips: int = 10):
        require("action", action, self.RULES["action"])
        self.action, self.max_consecutive_skips = action, int(max_consecutive_skips)
        self.skipped = 0
        self._consecutive = 0
        self._loss_ok: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []
        self._pending: list[_PendingCheck] = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        forget_step_grad_norm(pl_module)
        ok = torch.isfinite(loss.detach()).all()  # no host sync here: checked once per optimizer step
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        ok = self._loss_ok if self._loss_ok is not None else torch.ones((), dtype=torch.bool)
        norm = None
        fp16 = str(trainer.precision) in ("16-mixed", "16", "16-true")
        if not fp16:
            norm = step_grad_norm(pl_module, optimizer)  # clipping reuses it: one norm per step
            ok = ok.to(norm.device) & torch.isfinite(norm)
        losses, self._loss_ok, self._losses = self._losses, None, []
        where = self._where(trainer)
        if not fp16 and _skips_on_device(optimizer):
            optimizer.found_inf = (~ok).to(torch.float32)  # the fused kernel skips a non-finite update
            host, ready = _verdict_to_host(ok)
            self._pending.append(_PendingCheck(where, host, ready, losses, norm))
            self.check_pending(wait=False)
            return
        optimizer.__dict__.pop("found_inf", None)
        self._pending.append(_PendingCheck(where, ok, None, losses, norm))
        if not self.check_pending(wait=True) and self.action == "skip":
            for p in (p for g in optimizer.param_groups for p in g["params"]):
                p.grad = None  # AdamW leaves parameters without a gradient untouched
            forget_step_grad_norm(pl_module)

    def check_pending(self, wait: bool) -> bool:
        """Read the verdicts that have reached the host (all of them with ``wait``), in step order:
        count skipped steps, or raise :class:`NonFiniteError` naming the first non-finite step.
        Returns whether the last verdict read was finite (True when none was read)."""
        last_ok = True
        while self._pending:
            check = self._pending[0]
            if check.ready is not None:
                if not wait and not check.ready.query():
                    break
                check.ready.synchronize()
            self._pending.pop(0)
            last_ok = bool(check.ok)
            if last_ok:
                self._consecutive = 0
                continue
            what = self._describe(check)
            if self.action == "skip" and self._consecutive < self.max_consecutive_skips:
                self.skipped += 1
                self._consecutive += 1
                rank_zero_warn(f"{what}: optimizer step skipped ({self.skipped} so far)")
                continue
            self._pending.clear()
            hint = (f"{self._consecutive} steps in a row were skipped" if self.action == "skip" else
                    "lower task.optimizer.lr, set task.grad_clip, or skip such steps with callbacks.nonfinite_guard.action=skip")
            raise NonFiniteError(f"{what}; training stopped and the last good checkpoint was left as it was ({hint})")
        return last_ok

    # every verdict is in before a checkpoint is written, training ends, or a validation reports
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check_pending(wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_pending(wait=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_pending(wait=True)

    @staticmethod
    def _where(trainer: L.Trainer) -> str:
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1
        return f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch})"

    @staticmethod
    def _describe(check: _PendingCheck) -> str:
        parts = []
        bad = [loss for loss in check.losses if not bool(torch.isfinite(loss).all())]
        if bad:
            parts.append(f"loss {float(bad[0]):g}")
        if check.norm is not None and not math.isfinite(float(check.norm)):
            parts.append(f"gradient norm {float(check.norm):g}")
        return f"non-finite {' and '.join(parts) or 'values'} at {check.where}"


def _verdict_to_host(ok: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``ok`` to the host without waiting: the copy and a CUDA event that completes
    with it (None on the CPU, where the copy is the value)."""
    if ok.device.type != "cuda":
        return ok.clone(), None
    host, ready = ok.to("cpu", non_blocking=True), torch.cuda.Event()
    ready.record()
    return host, ready


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s kernel skips its update by itself when handed ``found_inf`` (the fused
    Adam/AdamW/SGD kernels, as the gradient scaler uses them), in every parameter group."""
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD))
            and all(g.get("fused") for g in optimizer.param_groups))


# ----------------------------------------------------------------------------- console and log
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
        if shown:  # the step TensorBoard, the CSV and gptlab-compare --curves put these values at
            log.info("epoch %d, step %d: %s", trainer.current_epoch, trainer.global_step - 1, shown)

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
