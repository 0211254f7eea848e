"""Where a `gptlab-train` step spends its time beyond the bare forward / backward / optimizer step.

    python experiments/peers/profile_step.py              # the peers' training shape (4 x 256, ctx 256, batch 4)
    python experiments/peers/profile_step.py --steps 10 --quick

1. ``gptlab-train``'s own code path (``gptlab.cli.train.train``: Hydra config, default callbacks,
   the TensorBoard logger, ``trainer=cpu``) trains the shape for ``--warmup + 2 * --steps`` steps:
   the first ``--steps`` after the warm-up are timed (wall time per step, start of one training
   batch to the start of the next), the next ``--steps`` run under ``cProfile``.
2. Then the bare loop on the same model, the same batch and the task's own optimizer and
   clipping: ``loss = model.loss(x, y); loss.backward(); clip; opt.step(); opt.zero_grad()``, timed
   and profiled the same way.
3. The profile of the `gptlab-train` steps is cut into what each part costs per step (cumulative
   time of the functions that do it). cProfile slows Python-level code more than the C++ kernels,
   so the parts are shown as milliseconds under the profiler next to the unprofiled step times.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import inspect
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PRESETS, compose_train, export_weights  # noqa: E402


INSTANCE: "StepProfiler | None" = None


class StepProfiler(L.Callback):
    """Times ``steps`` steps after ``warmup``, then profiles the next ``steps``; keeps one batch."""

    def __init__(self, warmup: int, steps: int):
        global INSTANCE
        INSTANCE = self  # Hydra builds it inside gptlab-train's code; main() reads it back here
        self.warmup, self.steps = warmup, steps
        self.task: L.LightningModule | None = None
        self.times: list[float] = []
        self.profile = cProfile.Profile()
        self._t: float | None = None
        self.batch = None

    def on_fit_start(self, trainer, pl_module):
        self.task = pl_module

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        step = trainer.global_step
        if self._t is not None and step <= self.warmup + self.steps:
            self.times.append(now - self._t)
        self._t = now if self.warmup <= step < self.warmup + self.steps else None
        if step == self.warmup + self.steps:
            self.profile.enable()
        if step == self.warmup + 2 * self.steps:
            self.profile.disable()
        if self.batch is None:
            self.batch = {k: v.clone() for k, v in batch.items()}


def category_functions() -> dict[str, list[tuple[str, str, int | None]]]:
    """Category -> functions (file suffix, name, first line or None) whose cumulative time it is."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from gptlab import callbacks as cb

    def method(cls, name):
        fn = getattr(cls, name)
        return (inspect.getsourcefile(fn), fn.__name__, fn.__code__.co_firstlineno)

    return {
        "forward + loss (GPT.loss)": [("gptlab/model/gpt.py", "loss", None)],
        "backward": [("torch/_tensor.py", "backward", None)],
        "AdamW kernel": [("torch/optim/adam.py", "_fused_adam", None), ("torch/optim/adam.py", "_multi_tensor_adam", None),
                         ("torch/optim/adam.py", "_single_tensor_adam", None)],
        "zero_grad": [("torch/optim/optimizer.py", "zero_grad", None)],
        "global gradient norm (get_total_norm)": [("torch/nn/utils/clip_grad.py", "get_total_norm", None)],
        "NonFiniteGuard hooks (the norm above included)": [method(cb.NonFiniteGuard, "on_before_optimizer_step"),
                                                           method(cb.NonFiniteGuard, "on_before_backward")],
        "clipping (clip_grads_with_norm_)": [("torch/nn/utils/clip_grad.py", "clip_grads_with_norm_", None)],
        "ThroughputMonitor": [method(cb.ThroughputMonitor, "on_train_batch_start"),
                              method(cb.ThroughputMonitor, "on_train_batch_end")],
        "progress bar (TQDM, refresh every step on CPU)": [method(cb.ProgressBar, "on_train_batch_end")],
        "LearningRateMonitor": [method(LearningRateMonitor, "on_train_batch_start")],
        "checkpoint callbacks (step checks)": [method(ModelCheckpoint, "on_train_batch_end")],
        "self.log / log_dict in the step": [("lightning/pytorch/core/module.py", "log", None),
                                             ("lightning/pytorch/core/module.py", "log_dict", None)],
        "logger connector + TensorBoard writer": [("logger_connector/logger_connector.py", "update_train_step_metrics", None)],
        "data loader (next batch)": [("lightning/pytorch/loops/fetchers.py", "__next__", None)],
        "LR scheduler step": [("lightning/pytorch/loops/training_epoch_loop.py", "update_lr_schedulers", None)],
    }


def breakdown(profile: cProfile.Profile, steps: int) -> list[tuple[str, float]]:
    """Milliseconds per step of each category (cumulative time of its functions, under cProfile)."""
    stats = pstats.Stats(profile).stats
    out = []
    for name, fns in category_functions().items():
        total = 0.0
        for (file, line, func), (_, _, _, ct, _) in stats.items():
            for suffix, fname, first in fns:
                if func == fname and file.replace(os.sep, "/").endswith(suffix.replace(os.sep, "/")) and \
                        (first is None or first == line):
                    total += ct
        out.append((name, 1000 * total / steps))
    return out


def bare_loop(task, batch, steps: int, warmup: int) -> tuple[list[float], cProfile.Profile]:
    """The same model, batch, optimizer and clipping without Lightning: times, then a profile."""
    from gptlab.optim import build_optimizer

    model = task.model
    opt = build_optimizer(task.hparams.optimizer, task.parameter_groups())
    x, y = batch["input_ids"], batch["labels"]
    clip = task.hparams.grad_clip

    def step():
        loss = model.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    return times, prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the quick preset's tiny shape")
    args = ap.parse_args()
    spec = PRESETS["quick" if args.quick else "cpu"]["train"]
    with tempfile.TemporaryDirectory(prefix="gptlab-profile-") as tmp:
        weights = export_weights(spec["model"], spec["overrides"], Path(tmp) / "weights")
        from gptlab.cli.train import train

        total = args.warmup + 2 * args.steps + 1
        cfg = compose_train([f"model={spec['model']}", "model.drop_rate=0.0", f"init_from={weights}",
                             f"paths.output_dir={tmp}/run", "trainer=cpu", f"trainer.max_steps={total}",
                             "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                             *[f"model.{k}={v}" for k, v in spec["overrides"].items()], "data=random",
                             f"data.batch_size={spec['batch']}", "data.num_workers=0", "task.sample_prompt=null",
                             "+callbacks.profiler._target_=profile_step.StepProfiler",
                             f"+callbacks.profiler.warmup={args.warmup}", f"+callbacks.profiler.steps={args.steps}"])
        train(cfg)
        prof_cb = importlib.import_module("profile_step").INSTANCE
        task = prof_cb.task
        bare_times, bare_prof = bare_loop(task, prof_cb.batch, args.steps, args.warmup)
    parts = breakdown(prof_cb.profile, args.steps)
    bare_parts = dict(breakdown(bare_prof, args.steps))
    lt = statistics.median(prof_cb.times)
    bt = statistics.median(bare_times)
    load = os.getloadavg()
    c = task.model.config
    print(f"{spec['batch']} x {c.context_length} tokens, {c.n_layers} layers x {c.emb_dim}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.1f}\n")
    print("| | per step (median of %d) |" % args.steps)
    print("|---|---:|")
    print(f"| `gptlab-train` step (default callbacks, TensorBoard, trainer=cpu) | {1000 * lt:,.0f} ms |")
    print(f"| bare forward + backward + clip + AdamW step, same batch | {1000 * bt:,.0f} ms |")
    print(f"| difference | {1000 * (lt - bt):,.0f} ms ({(lt - bt) / bt:+.1%}) |\n")
    print("Under cProfile (ms per step; cumulative time of the functions that do each part):\n")
    print("| part | `gptlab-train` step | bare loop |")
    print("|---|---:|---:|")
    for name, ms in parts:
        bare = bare_parts.get(name, 0.0)
        print(f"| {name} | {ms:,.1f} | {bare:,.1f} |" if bare else f"| {name} | {ms:,.1f} | — |")


if __name__ == "__main__":
    main()
