"""Sweeps through Hydra's submitit launcher, without SLURM.

``hydra/launcher=submitit_local`` runs each sweep job through submitit's own code path (the job
pickled, started by ``python -m submitit.core._submit`` in its own process, its result read back),
as ``hydra/launcher=slurm`` does on a cluster, with local processes instead of ``sbatch``. The SLURM
side is checked on the composed config: ``trainer.devices`` / ``trainer.num_nodes`` become the
allocation (``gpus_per_node``, ``tasks_per_node``, ``nodes``) Lightning's SLURM environment expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF_DIR, run_cli

TINY = ["model=gpt2-tiny", "data.batch_size=4", "data.max_length=32", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "task.sample_prompt=null", "task.lr_schedule.warmup_steps=0"]


@pytest.mark.slow
def test_submitit_local_runs_each_sweep_job_in_its_own_folder_with_its_summary(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'gptlab[launchers]'")
    sweep = tmp_path / "sweep"
    res = run_cli(["gptlab.cli.train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                   *TINY, "task.optimizer.lr=1e-3,3e-4", f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [j.name for j in jobs] == ["0", "1"]
    summaries = [json.loads((job / "metrics.json").read_text()) for job in jobs]
    assert [s["status"] for s in summaries] == ["ok", "ok"]
    assert all("val/loss" in s["metrics"] for s in summaries)
    for job, lr in zip(jobs, ("0.001", "0.0003")):
        assert f"task.optimizer.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert (job / "checkpoints" / "last.ckpt").is_file()
    # submitit's own records: each job ran as a submitit job (pickled call, result read back)
    submitit = sweep / ".submitit"
    assert len(list(submitit.glob("*/*_result.pkl"))) == 2
    assert summaries[0]["metrics"]["val/loss"] != summaries[1]["metrics"]["val/loss"]


def test_slurm_launcher_allocates_what_the_trainer_asks_for():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'gptlab[launchers]'")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # one SLURM task per GPU on every node: Lightning's SLURMEnvironment reads the ranks from SLURM
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.partition == "gpu" and launcher.name == "pretrain"
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")
