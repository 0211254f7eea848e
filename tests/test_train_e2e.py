"""``gptlab-train`` end to end in subprocesses: run folder contents, learning, sweeps, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, run_cli

TINY = ["model=gpt2-tiny", "data.batch_size=4", "data.max_length=32", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "task.sample_max_new_tokens=5"]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def train(tmp_path: Path, run_dir: Path, *overrides: str) -> None:
    res = run_cli(["gptlab.cli.train", *TINY, f"hydra.run.dir={run_dir}", *overrides], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]


@pytest.mark.slow
def test_a_run_writes_config_tensorboard_and_checkpoints_and_learns(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, run, "trainer.max_steps=40", "task.optimizer.lr=3e-3", "task.lr_schedule.warmup_steps=0",
          "validate_before_fit=true")
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    ckpts = {p.name for p in (run / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    loss = [v for _, v in scalars(run, "train/loss_step")]
    assert len(loss) >= 30
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 1.0  # clearly learning
    assert scalars(run, "val/loss") and scalars(run, "val/ppl")
    assert scalars(run, "val/loss")[0][0] == -1  # validate_before_fit: before the first update (step 0)
    seen = scalars(run, "train/tokens_seen")  # 4 windows of 32 tokens per step, logged after each
    assert [v for s, v in seen if s < 40] == [128 * (s + 1) for s in range(40)] and seen[-1][1] == 5120
    assert scalars(run, "lr-AdamW/decay") and scalars(run, "lr-AdamW/no_decay")
    assert scalars(run, "throughput/tokens_per_sec")
    acc = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "samples/text_summary" in acc.Tags()["tensors"]  # the generated text sample


@pytest.mark.slow
def test_resume_from_last_ckpt_continues_from_the_saved_step(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    constant = "task.lr_schedule={name:constant,warmup_steps:0}"  # more steps on resume: a constant LR stays continuous
    train(tmp_path, first, "trainer.max_steps=6", constant)
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    train(tmp_path, second, "trainer.max_steps=10", constant, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    steps = [s for s, _ in scalars(second, "train/loss_step")]
    assert steps and min(steps) >= 6  # no step was trained twice


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_own_folder(tmp_path):
    sweep = tmp_path / "sweep"
    res = run_cli(["gptlab.cli.train", "-m", *TINY, "trainer.max_steps=3", "task.optimizer.lr=1e-3,3e-4",
                   f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-5000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    for job, lr in zip(jobs, ("0.001", "0.0003")):
        assert f"task.optimizer.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert scalars(job, "train/loss_step")


def test_wrong_key_is_one_line_naming_the_closest_key(tmp_path):
    res = run_cli(["gptlab.cli.train", "task.lrr=1", f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                  env={"HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 2
    assert "unknown key task.lrr; task has: " in res.stderr and "optimizer" in res.stderr  # where to look
    assert "did you mean task.optimizer.lr?" in res.stderr
    assert "Could not override" not in res.stderr and len(res.stderr.strip().splitlines()) == 1  # not Hydra's block too
    assert "Traceback" not in res.stderr


def test_wrong_group_choice_lists_the_options(tmp_path):
    res = run_cli(["gptlab.cli.train", "model=gpt9", f"hydra.run.dir={tmp_path}"], cwd=tmp_path,
                  env={"HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 2 and "gpt2-small" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_generate_cli_streams_from_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(tmp_path, run, "trainer.max_steps=2")
    res = run_cli(["gptlab.cli.generate", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                   "prompt=Every effort moves you", "max_new_tokens=12", "top_k=50", "temperature=1.4"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("Every effort moves you") and len(res.stdout) > len("Every effort moves you")
