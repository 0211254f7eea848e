"""Sweeps end to end: every combination in its own folder, a failing job that does not stop the
sweep, TensorBoard's HPARAMS data with the real final metrics, ``gptlab-compare`` on the result,
and an Optuna search (when the optional plugin is installed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import CONF_DIR, run_cli
from gptlab.cli.compare import main as compare
from gptlab.model.lora import read_adapter
from gptlab.tasks import base as base_task

# the bundled story, a 2-layer GPT, three training batches and two validation batches per job
TINY = ["model=gpt2-tiny", "data.batch_size=4", "data.max_length=32", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "task.sample_max_new_tokens=5", "+trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0"]


def events(run: Path) -> EventAccumulator:
    return EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()


def hparams_data(acc: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
            for tag, content in acc.PluginTagToContent("hparams").items()}


@pytest.fixture(scope="module")
def lora_sweep(tmp_path_factory) -> tuple[Path, object]:
    """``-m adapter=lora adapter.rank=2,4 task.optimizer.lr=3e-3,-1``: 4 jobs, the two with lr=-1 fail."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = tmp / "sweep"
    res = run_cli(["gptlab.cli.train", "-m", *TINY, "adapter=lora", "adapter.rank=2,4", "task.optimizer.lr=3e-3,-1",
                   f"hydra.sweep.dir={sweep}"], cwd=tmp)
    return sweep, res


@pytest.mark.slow
def test_every_combination_runs_in_its_own_folder_of_one_sweep(lora_sweep):
    sweep, res = lora_sweep
    # every job ran; the sweep then fails (status 1) naming the two jobs that did
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-5000:]
    assert "2 job(s) did not finish: 1, 3" in res.stdout
    assert (sweep / "multirun.yaml").is_file()
    jobs = sorted((p for p in sweep.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    combos = [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) for j in jobs]
    assert [(c[-2], c[-1]) for c in combos] == [
        ("adapter.rank=2", "task.optimizer.lr=0.003"), ("adapter.rank=2", "task.optimizer.lr=-1"),
        ("adapter.rank=4", "task.optimizer.lr=0.003"), ("adapter.rank=4", "task.optimizer.lr=-1")]


@pytest.mark.slow
def test_a_failing_job_is_marked_and_the_others_complete(lora_sweep):
    sweep, res = lora_sweep
    for job, rank in (("0", 2), ("2", 4)):
        run = sweep / job
        assert not (run / "FAILED").exists()
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert read_adapter(run / "checkpoints" / "adapter.safetensors")[1]["rank"] == rank
        assert events(run).Scalars("val/loss")
    for job in ("1", "3"):
        run = sweep / job
        assert "task.optimizer.lr=-1: expected a number in (0, 10]" in (run / "FAILED").read_text()
        assert not (run / "checkpoints").exists()  # refused before anything was built


@pytest.mark.slow
def test_hparams_tab_gets_each_runs_hyperparameters_and_real_final_metrics(lora_sweep):
    sweep, _ = lora_sweep
    run = sweep / "2"
    acc = events(run)
    data = hparams_data(acc)
    session = data["_hparams_/session_start_info"].session_start_info
    assert session.hparams["task.optimizer.lr"].number_value == pytest.approx(3e-3)
    assert session.hparams["adapter.rank"].number_value == 4
    assert session.hparams["model.name"].string_value == "gpt2-tiny"
    assert not [k for k in session.hparams if "_target_" in k or k.startswith(("paths.", "hydra", "callbacks."))]
    metric_tags = {m.name.tag for m in data["_hparams_/experiment"].experiment.metric_infos}
    assert {"final/val/loss", "final/val/ppl", "final/train/loss_epoch"} <= metric_tags
    assert "hp_metric" not in acc.Tags()["scalars"]
    # each final metric is its own one-point series holding the run's final value (metrics.json) ...
    final = json.loads((run / "metrics.json").read_text())["metrics"]
    for tag in metric_tags:
        points = acc.Scalars(tag)
        assert len(points) == 1 and points[0].value == pytest.approx(final[tag.removeprefix("final/")], abs=1e-4)
    # ... so the curves it comes from get no extra point: val/loss ends at the last validation
    val = acc.Scalars("val/loss")
    assert len({p.step for p in val}) == len(val) and val[-1].value == pytest.approx(final["val/loss"], abs=1e-4)


@pytest.mark.slow
def test_compare_lists_one_row_per_job_best_first(lora_sweep, capsys):
    sweep, _ = lora_sweep
    assert compare([str(sweep)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 4
    statuses = [[c.strip() for c in r.strip("|").split("|")][2] for r in rows]  # from each job's metrics.json
    assert statuses == ["ok", "ok", "failed", "failed"]


def boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("failure", ["in Lightning's fit", "outside Lightning"])
def test_a_failing_run_still_closes_its_loggers(failure, tmp_path, monkeypatch):
    from gptlab.cli import train as train_cli

    made, instantiate_group = [], train_cli._instantiate_group

    def recording(node):  # remember the callbacks and loggers the run builds
        objs = instantiate_group(node)
        made.extend(objs)
        return objs

    monkeypatch.setattr(train_cli, "_instantiate_group", recording)
    overrides = [*TINY, f"paths.output_dir={tmp_path}"]
    if failure == "in Lightning's fit":
        monkeypatch.setattr(base_task, "build_optimizer", boom)  # configure_optimizers fails inside fit
    else:
        monkeypatch.setattr(train_cli, "fit_and_test", boom)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.raises((ValueError, RuntimeError), match="boom"):
        train_cli.train(cfg)
    writers = [lg._experiment for lg in made if type(lg).__name__ == "TensorBoardLogger"]
    assert writers and all(w.all_writers is None for w in writers)  # SummaryWriter.close() was called
    assert events(tmp_path).Scalars("params/total")


@pytest.mark.slow
def test_optuna_search_returns_the_optimized_metric(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    res = run_cli(["gptlab.cli.train", "hparams_search=pretrain_optuna", *TINY, "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-5000:]
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1"]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and math.isfinite(results["best_value"]) and results["best_value"] > 0
    assert set(results["best_params"]) == {"task.optimizer.lr", "task.lr_schedule.warmup_steps",
                                           "task.optimizer.weight_decay", "model.drop_rate"}
