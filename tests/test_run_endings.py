"""Runs that end badly say so: a stopped run or sweep exits non-zero, two runs never share a folder,
checkpoint names never fork, a resume never half-applies a change, and a full or read-only disk gets
one line naming the folder and the cause. Signals and locks are tested on real processes."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, small_filesystem
from gptlab.run_lock import LOCK_FILE, FolderInUse, RunLock
from gptlab.signals import StopSignals, Stopped, raise_if_stopped
from gptlab.weights import safe_torch_load

# gpt2-tiny on the book's story; enough steps that a signal always arrives mid-training; a checkpoint
# every 2 steps, so the first one tells that training runs
RUN = ["model=gpt2-tiny", "data.batch_size=4", "data.max_length=16", "trainer.max_steps=100000",
       "trainer.max_epochs=-1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
       "task.sample_prompt=null", "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=1",
       "callbacks.step_checkpoint.every_n_train_steps=2"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "PYTHONUNBUFFERED": "1"}
WAIT = 300  # seconds a step may take on a loaded machine before the test gives up (not a timing claim)


def start(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptlab.cli.train", *args], cwd=cwd, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, path: Path) -> None:
    """Poll until ``path`` exists (the run got that far); fail if the process ended first."""
    end = time.monotonic() + WAIT
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {path} appeared:\n"
                                 + proc.stdout.read()[-4000:])
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{path} never appeared:\n" + proc.communicate()[0][-4000:])
        time.sleep(0.1)


def result(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ----------------------------------------------------------------------------- 1. signals
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_saves_interrupted_ckpt_and_exits_128_plus_the_signal(sig, tmp_path):
    run = tmp_path / "run"
    proc = start(*RUN, f"hydra.run.dir={run}", cwd=tmp_path)
    wait_for(proc, run / "checkpoints" / "last.ckpt")
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 128 + sig, out[-4000:]
    assert f"gptlab-train: stopped by {signal.Signals(sig).name} (exit status {128 + sig})" in out
    interrupted = safe_torch_load(run / "checkpoints" / "interrupted.ckpt")
    assert interrupted["global_step"] >= 2
    assert result(run)["status"] == "interrupted"
    assert not (run / LOCK_FILE).exists() or not _locked(run)  # the kernel released the lock


@pytest.mark.slow
def test_a_stopped_sweep_prints_what_ran_and_which_jobs_never_started(tmp_path):
    sweep = tmp_path / "sweep"
    proc = start("-m", *RUN, "task.optimizer.lr=1e-3,2e-3,3e-3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    wait_for(proc, sweep / "0" / "checkpoints" / "last.ckpt")
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 143, out[-4000:]
    assert "1 job(s), best first" in out and "interrupted" in out  # the table of what ran
    assert ("sweep stopped by SIGTERM after 1 of 3 job(s) started; 2 never started: "
            "task.optimizer.lr=0.002; task.optimizer.lr=0.003") in out
    assert result(sweep / "0")["status"] == "interrupted"
    assert not (sweep / "1").exists() and not (sweep / "2").exists()


@pytest.mark.slow
def test_lightnings_slurm_requeue_signal_still_saves_and_requeues(tmp_path):
    """SIGUSR1 under SLURM (auto-requeue): Lightning saves ``hpc_ckpt_1.ckpt`` and calls
    ``scontrol requeue <job id>`` (a stand-in here that records its arguments); training goes on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'requeued'}\n")
    scontrol.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train",
           "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_NODELIST": "localhost"}
    run = tmp_path / "run"
    proc = start(*RUN, f"hydra.run.dir={run}", cwd=tmp_path, env=env)
    wait_for(proc, run / "checkpoints" / "last.ckpt")
    os.kill(proc.pid, signal.SIGUSR1)
    wait_for(proc, tmp_path / "requeued")
    wait_for(proc, run / "hpc_ckpt_1.ckpt")
    assert proc.poll() is None  # the requeue signal does not stop the run
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=WAIT)
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    assert safe_torch_load(run / "hpc_ckpt_1.ckpt")["global_step"] >= 2
    assert proc.returncode == 143, out[-4000:]


def test_sigterm_outside_lightning_stops_at_once_and_one_lightning_saw_too_late_stops_the_next_job():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:  # outside a trainer: SIGTERM raises, with 128 + 15 as exit code
        with pytest.raises(Stopped) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):
                time.sleep(0.01)
        assert e.value.code == 143 and stop.received == signal.SIGTERM
    with StopSignals() as stop:
        ours = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda signum, frame: ours(signum, frame))  # a trainer's handler, then ours
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # delivered: recorded, not raised (the trainer stops at its next batch boundary)
        assert stop.received == signal.SIGTERM
        signal.signal(signal.SIGTERM, ours)  # the trainer finished its last step normally
        with pytest.raises(Stopped):  # what the sweep calls before starting its next job
            raise_if_stopped()
        raise_if_stopped()  # acted on once
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


# ----------------------------------------------------------------------------- 2. one run per folder
def _locked(folder: Path) -> bool:
    try:
        RunLock(folder).acquire().release()
    except FolderInUse:
        return True
    return False


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    first = start(*RUN, f"hydra.run.dir={run}", cwd=tmp_path)
    try:
        wait_for(first, run / "checkpoints" / "last.ckpt")
        hydra_files = {p: p.read_text() for p in (run / ".hydra").iterdir()}
        second = subprocess.run([sys.executable, "-m", "gptlab.cli.train", *RUN, "seed=7", f"hydra.run.dir={run}"],
                                cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=WAIT)
        assert second.returncode == 2, second.stdout[-3000:] + second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(f"gptlab-train: error: {run} is in use by another run (pid {first.pid} on ")
        assert "gptlab.cli.train" in lines[0] and "seed=7" not in lines[0]  # the FIRST run's command
        assert {p: p.read_text() for p in (run / ".hydra").iterdir()} == hydra_files  # not rewritten
        assert "seed: 123" in hydra_files[run / ".hydra" / "config.yaml"]
        assert "in use" not in (run / "train.log").read_text()  # the refused run never logged there
        assert not list((run / "checkpoints").glob("*-v1.ckpt"))
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=WAIT)
    assert first.returncode == 143


def test_the_lock_of_a_killed_process_is_released_by_the_kernel(tmp_path):
    read_end, write_end = os.pipe()
    pid = os.fork()  # a process of its own (the lock belongs to it), without a second interpreter start
    if pid == 0:
        try:
            RunLock(tmp_path).acquire()
            os.write(write_end, b"locked")
            time.sleep(600)
        finally:
            os._exit(1)
    try:
        assert os.read(read_end, 6) == b"locked"
        with pytest.raises(FolderInUse, match=rf"{tmp_path} is in use by another run \(pid {pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    assert (tmp_path / LOCK_FILE).exists()  # kill -9 left the file behind ...
    lock = RunLock(tmp_path).acquire()  # ... but not the lock
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# ----------------------------------------------------------------------------- 3, 4. resuming
SHORT = ["model=gpt2-tiny", "data.batch_size=4", "data.max_length=16", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "task.sample_prompt=null", "trainer.num_sanity_val_steps=0",
         "trainer.limit_val_batches=1", "+trainer.val_check_interval=3", "logger=many",
         "callbacks.step_checkpoint.every_n_train_steps=2", "task.lr_schedule.name=constant",
         "task.lr_schedule.warmup_steps=0"]


def csv_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss_step")})


def test_a_resume_into_a_moved_folder_replaces_last_ckpt_and_keeps_the_csv_rows(tmp_path, monkeypatch, run_entry):
    from gptlab.cli import train as train_cli

    monkeypatch.chdir(tmp_path)
    code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=6",
                               f"hydra.run.dir={tmp_path / 'first'}")
    assert code == 0, out[-2000:] + err[-3000:]
    assert csv_steps(tmp_path / "first") == list(range(6))
    shutil.move(tmp_path / "first", tmp_path / "moved")  # the run folder is renamed, then resumed in place
    moved = tmp_path / "moved"
    code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=10",
                               f"ckpt_path={moved / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={moved}")
    assert code == 0, out[-2000:] + err[-3000:]
    names = sorted(p.name for p in (moved / "checkpoints").iterdir())
    assert not [n for n in names if "-v" in n], names  # no last-v1.ckpt, no best-...-v1.ckpt
    assert safe_torch_load(moved / "checkpoints" / "last.ckpt")["global_step"] == 10  # the newest
    assert csv_steps(moved) == list(range(10))  # the first part's rows 0-5, then 6-9


def test_a_resume_with_a_different_optimizer_value_is_refused_naming_both(tmp_path, monkeypatch, run_entry):
    from gptlab.cli import train as train_cli

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=2", f"hydra.run.dir={run}")
    assert code == 0, out[-2000:] + err[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    for override, expected in [("task.optimizer.lr=0.001", "task.optimizer.lr=0.001 (the checkpoint's: 0.0004)"),
                               ("task.optimizer.betas=[0.9,0.99]", "task.optimizer.betas=[0.9, 0.99] (the checkpoint's: [0.9, 0.95])"),
                               ("task.lr_schedule.min_lr=1e-5", "task.lr_schedule.min_lr=1e-05 (the checkpoint's: 4e-05)"),
                               ("task.weight_decay_on=all", "task.weight_decay_on=all (the checkpoint's: matrices)")]:
        code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=4", override,
                                   f"ckpt_path={last}", f"hydra.run.dir={run}")
        assert code == 2, out[-2000:] + err[-3000:]
        assert expected in err, err
    assert last.read_bytes() == before
    assert json.loads((run / "metrics.json").read_text())["status"] == "ok"  # the first run's record stands
    code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=4", "task.grad_clip=0.5",
                               "task.optimizer.fused=false", f"ckpt_path={last}", f"hydra.run.dir={run}")
    assert code == 0, err[-3000:]  # values a resume applies fully (clipping, the kernel) may change


# ----------------------------------------------------------------------------- 5. full and read-only disks
def test_a_checkpoint_that_does_not_fit_ends_in_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, run_entry):
    from gptlab.cli import train as train_cli

    monkeypatch.chdir(tmp_path)
    # gpt2-tiny's last.ckpt with its AdamW state is 39 MB: one fits in 60 MB, a second beside it does not
    with small_filesystem(tmp_path / "disk", "60m") as disk:
        run = disk / "run"
        code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=6", "logger=csv",
                                   "~callbacks.model_checkpoint", f"hydra.run.dir={run}")
        assert code == 1, out[-2000:] + err[-3000:]
        last = run / "checkpoints" / "last.ckpt"
        assert err == (f"gptlab-train: error: could not write checkpoint {last}: no space left on the device; "
                       "the previous last.ckpt, if any, is unchanged\n")
        assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no partial file left
        assert safe_torch_load(last)["global_step"] == 2  # the previous one, intact (checksums verified)
        assert result(run)["status"] == "failed"


def test_a_read_only_run_folder_is_refused_in_one_line(tmp_path, monkeypatch, run_entry):
    from gptlab.cli import train as train_cli

    monkeypatch.chdir(tmp_path)
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=2",
                                   f"hydra.run.dir={disk / 'run'}")
    assert code == 2, out[-2000:] + err[-3000:]
    assert err == (f"gptlab-train: error: cannot write to the run folder {disk / 'run'}: read-only file system: "
                   "not writable; run in another folder (hydra.run.dir=...)\n")


def test_an_unwritable_run_folder_is_refused_in_one_line_injected(tmp_path, monkeypatch, run_entry):
    """Where mounting is not allowed: the folder's creation fails with EROFS, as on a read-only disk."""
    from gptlab.cli import train as train_cli

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Path, "mkdir", read_only)
    code, out, err = run_entry(train_cli.main, "gptlab-train", *SHORT, "trainer.max_steps=2",
                               f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2, out[-2000:] + err[-3000:]
    assert err == (f"gptlab-train: error: cannot write to the run folder {tmp_path / 'run'}: read-only file system: "
                   "not writable; run in another folder (hydra.run.dir=...)\n")
