"""DDP with two CPU processes (gloo) through ``gptlab-train``, inside a Hydra ``-m`` sweep.

One sweep of two jobs (``task.optimizer.lr=1e-3,3e-4``) with ``trainer=ddp`` on CPU, gradient accumulation and
activation checkpointing on. Each rank records what it ended with (:class:`RankState`, loaded by Hydra
from this module through ``PYTHONPATH``); the tests check that the ranks stayed in sync, that each
DDP child ran its own job's config, and that Hydra's folders hold exactly what the jobs wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import run_cli

HERE = Path(__file__).resolve().parent
LRS = ("0.001", "0.0003")


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the backbone's tensors (``model.*``), in key order."""
    h = hashlib.sha256()
    for k in sorted(k for k in state_dict if k.startswith("model.")):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankState(L.Callback):
    """Writes ``rank<global_rank>.json`` into the run folder at the end of training: the step, the
    batches seen, a hash of the weights, a hash of the first batch this rank saw, and the learning
    rate it was built with."""

    def __init__(self) -> None:
        self.first_batch: str | None = None
        self.batches = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batches += 1
        if self.first_batch is None:
            self.first_batch = hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {"global_step": trainer.global_step, "world_size": trainer.world_size, "batches": self.batches,
                 "weights": weights_hash(pl_module.state_dict()), "first_batch": self.first_batch,
                 "lr": pl_module.hparams.optimizer["lr"]}
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(state))


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory) -> tuple[Path, str]:
    """Run the sweep once; (the outputs folder, the console output)."""
    tmp = tmp_path_factory.mktemp("ddp")
    outputs = tmp / "outputs"
    args = ["gptlab.cli.train", "-m", "model=gpt2-tiny", "model.activation_checkpointing=true",
            "data.batch_size=4", "data.max_length=32", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=4",
            "trainer.accumulate_grad_batches=2", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "task.sample_prompt=null", "task.lr_schedule.warmup_steps=0",
            "+callbacks.rank_state._target_=test_distributed.RankState", f"task.optimizer.lr={','.join(LRS)}"]
    env = {"GPTLAB_OUTPUTS": str(outputs), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    res = run_cli(args, cwd=tmp, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return outputs, res.stdout + res.stderr


def job_folders(outputs: Path) -> list[Path]:
    sweeps = list((outputs / "pretrain" / "multiruns").iterdir())
    assert len(sweeps) == 1, f"expected one sweep folder, found {sweeps}"
    return sorted(p for p in sweeps[0].iterdir() if p.is_dir())


def rank_states(job: Path) -> list[dict]:
    return [json.loads((job / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_both_ranks_end_with_the_same_weights_as_the_checkpoint(ddp_sweep):
    outputs, _ = ddp_sweep
    for job in job_folders(outputs):
        r0, r1 = rank_states(job)
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["global_step"] == r1["global_step"] == 4
        assert r0["batches"] == r1["batches"] == 8  # accumulate_grad_batches=2
        # different data on each rank (DistributedSampler), yet identical weights: gradients were averaged
        assert r0["first_batch"] != r1["first_batch"]
        assert r0["weights"] == r1["weights"]
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 4
        assert weights_hash(ckpt["state_dict"]) == r0["weights"]


@pytest.mark.slow
def test_each_ddp_child_runs_its_own_jobs_config(ddp_sweep):
    outputs, _ = ddp_sweep
    jobs = job_folders(outputs)
    for job, lr in zip(jobs, LRS):
        assert f"task.optimizer.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert [s["lr"] for s in rank_states(job)] == [float(lr)] * 2
    # the jobs really differ: different learning rates, different weights
    assert rank_states(jobs[0])[0]["weights"] != rank_states(jobs[1])[0]["weights"]


@pytest.mark.slow
def test_multirun_with_ddp_keeps_hydras_folders(ddp_sweep):
    outputs, console = ddp_sweep
    assert console.count("Launching 2 jobs") == 1  # the children did not re-launch the sweep
    assert "sync_dist" not in console  # every epoch-level metric is reduced over the ranks
    assert not (outputs / "pretrain" / "runs").exists()
    jobs = job_folders(outputs)
    assert [j.name for j in jobs] == ["0", "1"]
    assert {p.name for p in jobs[0].parent.iterdir()} == {"0", "1", "multirun.yaml"}
    for job in jobs:
        assert {p.name for p in job.iterdir()} == {".hydra", "checkpoints", "tensorboard", "train.log", "metrics.json",
                                                   "train_ddp_process_1.log", "rank0.json", "rank1.json"}
        assert {p.name for p in (job / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
        assert [p.name for p in (job / "checkpoints").iterdir()] == ["last.ckpt"]
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
