"""Runs you can trust: exact resume from any step checkpoint (mid-epoch included), checkpoints that
survive ``kill -9`` during training and during a save, a guard against non-finite losses, and
Ctrl-C/crash checkpoints only when there is something to keep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from conftest import REPO
from gptlab.callbacks import InterruptCheckpoint, NonFiniteError, NonFiniteGuard, StepCheckpoint
from gptlab.checkpoint_io import TMP_MARK, AtomicCheckpointIO, verify_checkpoint
from gptlab.cli import train as train_cli
from gptlab.weights import safe_torch_load

# gpt2-tiny with dropout on the book's verdict text: 18 training batches of 8 windows per epoch, so
# 24 steps cross an epoch boundary; last.ckpt every 4 steps (kept as step<N>.ckpt too)
RUN = ["model=gpt2-tiny", "model.drop_rate=0.1", "data.batch_size=8", "data.max_length=32", "trainer.max_steps=24",
       "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "task.sample_prompt=null",
       "callbacks.step_checkpoint.every_n_train_steps=4"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "PYTHONUNBUFFERED": "1"}


def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptlab.cli.train", *RUN, f"hydra.run.dir={run_dir}", *overrides],
                            cwd=run_dir.parent, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-5000:]


def kill_when(proc: subprocess.Popen, marker: Path) -> None:
    """``kill -9`` the run once ``marker`` exists (a fault hook created it and is sleeping). A run
    that ends without the hook firing fails the test (no time limit: the run itself ends)."""
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before the fault hook fired:\n{proc.stdout.read()[-5000:]}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def losses(run_dir: Path) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss_step")}


def global_step(path: Path) -> int:
    return int(safe_torch_load(path)["global_step"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, with every step checkpoint kept."""
    run = tmp_path_factory.mktemp("resume") / "reference"
    run.parent.mkdir(exist_ok=True)
    finish(start(run, "callbacks.step_checkpoint.keep_every=true"))
    return run


@pytest.mark.slow
def test_a_resume_from_a_mid_epoch_checkpoint_repeats_the_uninterrupted_run(reference, tmp_path):
    ckpt = reference / "checkpoints" / "step000008.ckpt"  # epoch 0, batch 8 of 18; dropout on
    assert global_step(ckpt) == 8
    resumed = tmp_path / "resumed"
    finish(start(resumed, f"ckpt_path={ckpt}"))
    ref, res = losses(reference), losses(resumed)
    assert sorted(res) == list(range(8, 24))  # steps 9..24 (logged 0-based), none twice
    for step in res:  # the same batches in the same order, the same dropout masks
        assert res[step] == pytest.approx(ref[step], abs=1e-6), step
    assert global_step(resumed / "checkpoints" / "last.ckpt") == 24


@pytest.mark.slow
def test_kill_9_during_training_then_resume_gives_the_same_losses(reference, tmp_path):
    run = tmp_path / "killed"
    proc = start(run, "+callbacks.stall._target_=faults.StallAtStep", "+callbacks.stall.step=14",
                 f"+callbacks.stall.marker={tmp_path / 'stalled'}")
    kill_when(proc, tmp_path / "stalled")
    last = run / "checkpoints" / "last.ckpt"
    assert global_step(last) == 12 and not (run / "checkpoints" / "interrupted.ckpt").exists()
    finish(start(run, f"ckpt_path={last}"))  # into the same folder: resuming is what the folder is for
    ref, res = losses(reference), losses(run)
    for step in range(12, 24):
        assert res[step] == pytest.approx(ref[step], abs=1e-6), step


@pytest.mark.slow
def test_kill_9_during_a_save_leaves_the_previous_last_ckpt_intact(reference, tmp_path):
    run = tmp_path / "killed_saving"
    plugin = f"trainer.plugins=[{{_target_:faults.StallingCheckpointIO,at_step:12,marker:{tmp_path / 'saving'}}}]"
    proc = start(run, plugin)
    kill_when(proc, tmp_path / "saving")
    folder = run / "checkpoints"
    partial = [p for p in folder.iterdir() if TMP_MARK in p.name]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written step-12 file
    verify_checkpoint(folder / "last.ckpt")
    assert global_step(folder / "last.ckpt") == 8  # untouched by the save that was cut short
    finish(start(run, f"ckpt_path={folder / 'last.ckpt'}"))
    assert not any(TMP_MARK in p.name for p in folder.iterdir())  # the orphan was removed by the next save
    ref, res = losses(reference), losses(run)
    for step in range(8, 24):
        assert res[step] == pytest.approx(ref[step], abs=1e-6), step


@pytest.mark.slow
def test_a_resume_that_would_bend_the_lr_schedule_is_refused(reference, tmp_path):
    run = tmp_path / "longer"
    proc = start(run, "trainer.max_steps=40", f"ckpt_path={reference / 'checkpoints' / 'step000008.ckpt'}")
    out, _ = proc.communicate()
    assert proc.returncode == 2, out[-3000:]
    assert "spans 24 optimizer steps, this run's would span 40" in out and "trainer.max_steps" in out


# ----------------------------------------------------------------------------- in-process Lightning
class Linear(L.LightningModule):
    """One parameter vector, gradient ``scale`` per step with SGD at ``lr`` (1 and 0.1: w drops by 0.1
    per step); the loss is NaN at ``nan_at``."""

    def __init__(self, nan_at: int | None = None, fail_at: int | None = None, lr: float = 0.1, scale: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.nan_at, self.fail_at, self.lr, self.scale = nan_at, fail_at, lr, scale

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at:
            raise RuntimeError("boom")
        loss = (self.w * batch).sum()
        return loss * float("nan") if self.global_step == self.nan_at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(10, 3) * self.scale, batch_size=1)


def fit(tmp_path: Path, module: Linear, *callbacks: L.Callback, max_steps: int = 6) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, callbacks=[*callbacks, StepCheckpoint(tmp_path, every_n_train_steps=1),
                                                        InterruptCheckpoint(tmp_path)],
                        plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    return trainer


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    module = Linear(nan_at=3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan and gradient norm nan at step 3 .*last good checkpoint.*task.optimizer.lr"):
        fit(tmp_path, module, NonFiniteGuard("error"))
    assert torch.allclose(module.w.detach(), torch.full((3,), 0.7))  # 3 good updates, not the NaN one
    last = safe_torch_load(tmp_path / "last.ckpt")
    assert last["global_step"] == 3 and torch.allclose(last["state_dict"]["w"], torch.full((3,), 0.7))
    assert not (tmp_path / "interrupted.ckpt").exists()  # a NaN state is not worth resuming


def test_weights_an_update_overflowed_are_never_saved_as_the_last_good_checkpoint(tmp_path):
    """lr 1e30 and gradients of 1e10: the loss and the gradient of step 3 are finite, the update
    makes the weights infinite. The checkpoint of step 3 is refused; step 2's stays."""
    class LrJump(L.Callback):  # the third step runs at lr 1e30
        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            if trainer.global_step == 2:
                trainer.optimizers[0].param_groups[0]["lr"] = 1e30

    module = Linear(scale=1e10)
    with pytest.raises(NonFiniteError, match=rf"non-finite weights at step 3 \(w\): {tmp_path / 'last.ckpt'} was not "
                                             "written, the last good checkpoint was left as it was"):
        fit(tmp_path, module, NonFiniteGuard("error"), LrJump())
    assert not torch.isfinite(module.w).all()  # what would have been saved
    last = safe_torch_load(tmp_path / "last.ckpt")
    assert last["global_step"] == 2 and torch.isfinite(last["state_dict"]["w"]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no interrupted.ckpt, no partial file


def test_skip_drops_the_non_finite_step_and_goes_on(tmp_path):
    module, guard = Linear(nan_at=3), NonFiniteGuard("skip")
    fit(tmp_path, module, guard)
    assert guard.skipped == 1 and torch.isfinite(module.w).all()
    assert torch.allclose(module.w.detach(), torch.full((3,), 0.5))  # 5 of the 6 steps updated


def test_a_crash_after_some_steps_saves_interrupted_ckpt_to_resume_from(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, Linear(fail_at=4))
    assert safe_torch_load(tmp_path / "interrupted.ckpt")["global_step"] == 4


def test_a_crash_before_the_first_step_writes_no_checkpoint(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, Linear(fail_at=0))
    assert list(tmp_path.glob("*.ckpt")) == []


def test_last_ckpt_does_not_wait_for_a_validation_metric(tmp_path):
    fit(tmp_path, Linear(), max_steps=3)  # the module has no validation at all
    assert safe_torch_load(tmp_path / "last.ckpt")["global_step"] == 3


def test_logger_none_trains_without_the_lr_monitor(tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_entry(train_cli.main, "gptlab-train", "model=gpt2-tiny", "data.max_length=16",
                               "trainer.max_steps=2", "logger=none", "task.sample_prompt=null",
                               "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, out[-2000:] + err[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_the_guard_and_clipping_share_one_gradient_norm_per_step(tmp_path, monkeypatch):
    from gptlab.data.pretrain import SlidingWindowDataset
    from gptlab.tasks.pretrain import PretrainTask

    calls = []
    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    clipped = []
    real_clip = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_",
                        lambda params, clip, norm, **k: clipped.append(float(norm)) or real_clip(params, clip, norm, **k))
    torch.manual_seed(0)
    task = PretrainTask(model={"name": "gpt2-tiny", "context_length": 16}, grad_clip=1e-3, sample_prompt=None)
    loader = DataLoader(SlidingWindowDataset(torch.randint(0, 50257, (200,)).tolist(), 16), batch_size=4)
    trainer = L.Trainer(max_steps=3, callbacks=[NonFiniteGuard("error")], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(task, loader)
    assert len(calls) == 3 and len(clipped) == 3  # one norm per optimizer step, not two
    # the norm clipping used is the step's own (before clipping): far above the 1e-3 it clipped to
    assert all(n > 1e-2 for n in clipped)
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(clipped[-1])


class FusedLinear(Linear):
    """``Linear`` with fused AdamW: the guard hands its verdict to the kernel (``found_inf``)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=True)


class LateVerdict:
    """A GPU's verdict copy that has not arrived yet: ready only when waited for."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        pass


def test_with_a_fused_optimizer_the_kernel_skips_the_step_and_a_late_verdict_still_stops_before_the_checkpoint(
        tmp_path, monkeypatch):
    import gptlab.callbacks as cb

    monkeypatch.setattr(cb, "_verdict_to_host", lambda ok: (ok.clone(), LateVerdict()))
    clean = FusedLinear()
    fit(tmp_path / "clean", clean, max_steps=3)
    module = FusedLinear(nan_at=3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan and gradient norm nan at step 3 \(epoch 0, batch 3\)"):
        fit(tmp_path / "run", module, NonFiniteGuard("error"))
    # no host read at step 3: the NaN step reached the kernel, which left weights and moments alone;
    # the checkpoint after it waited for the verdict and was never written
    assert torch.equal(module.w.detach(), clean.w.detach())
    last = safe_torch_load(tmp_path / "run" / "last.ckpt")
    assert last["global_step"] == 3 and torch.equal(last["state_dict"]["w"], clean.w.detach())
    assert last["optimizer_states"][0]["state"][0]["step"].item() == 3


def test_skip_with_a_fused_optimizer_leaves_the_step_count_as_if_the_step_never_was(tmp_path):
    clean = FusedLinear()
    fit(tmp_path / "clean", clean, max_steps=5)
    module, guard = FusedLinear(nan_at=3), NonFiniteGuard("skip")
    trainer = fit(tmp_path / "run", module, guard)
    assert guard.skipped == 1
    assert torch.equal(module.w.detach(), clean.w.detach())  # 6 steps, one skipped = 5 clean ones
    assert trainer.optimizers[0].state[module.w]["step"].item() == 5
