"""``gptlab-compare``: finds runs, reads their overrides and final metrics, ranks them, plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from gptlab.cli.compare import main
from gptlab.results import find_runs, load_run, metric_mode, write_result

# job -> (overrides, val/loss curve, val/acc curve); job 2 failed after one validation
JOBS = {
    "0": (["adapter.rank=4", "task.optimizer.lr=0.0001"], [0.9, 0.7, 0.6], [0.70, 0.80, 0.85]),
    "1": (["adapter.rank=8", "task.optimizer.lr=0.0001"], [0.9, 0.5, 0.4], [0.70, 0.90, 0.95]),
    "2": (["adapter.rank=4", "task.optimizer.lr=0.0005"], [0.9], [0.70]),
    "10": (["adapter.rank=8", "task.optimizer.lr=0.0005"], [0.9, 0.6, 0.5], [0.70, 0.85, 0.90]),
}


def make_sweep(root: Path) -> Path:
    """A sweep folder laid out as Hydra + gptlab write it: <job>/.hydra/, <job>/tensorboard/."""
    (root / "multirun.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    for job, (overrides, losses, accs) in JOBS.items():
        run = root / job
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "model=gpt2-tiny"]))
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 123, "task": {"lr": 0.1}}))
        writer = SummaryWriter(str(run / "tensorboard"))
        for step, (loss, acc) in enumerate(zip(losses, accs)):
            writer.add_scalar("val/loss", loss, (step + 1) * 10)
            writer.add_scalar("val/acc", acc, (step + 1) * 10)
            writer.add_scalar("train/loss_step", loss + 0.1, (step + 1) * 10)
        writer.close()
        if job == "2":
            (run / "FAILED").write_text("Traceback ...\nValueError: boom\n")
        # every run ends by writing metrics.json (gptlab.results.record)
        write_result(run, "failed" if job == "2" else "ok", {"val/loss": losses[-1], "val/acc": accs[-1]}, "val/loss")
    return root


@pytest.fixture
def sweep(tmp_path) -> Path:
    return make_sweep(tmp_path / "sweep")


def table(out: str) -> list[list[str]]:
    rows = [line for line in out.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[:1] + rows[2:]]


def test_finds_every_run_folder_in_numeric_job_order(sweep):
    assert [p.name for p in find_runs(sweep)] == ["0", "1", "2", "10"]
    assert [p.name for p in find_runs(sweep.parent)] == ["0", "1", "2", "10"]  # any folder above works


def test_a_run_has_its_overrides_and_last_metric_values(sweep):
    run = load_run(sweep / "1", sweep)
    assert run.overrides == {"adapter.rank": "8", "task.optimizer.lr": "0.0001", "model": "gpt2-tiny"}
    assert run.metrics["val/loss"] == pytest.approx(0.4) and run.metrics["val/acc"] == pytest.approx(0.95)
    assert [s for s, _ in run.curves["val/loss"]] == [10, 20, 30]
    assert load_run(sweep / "2", sweep).status == "failed"


def test_loss_is_minimised_and_accuracy_maximised():
    assert metric_mode("val/loss") == "min" and metric_mode("val/ppl") == "min"
    assert metric_mode("val/acc") == "max" and metric_mode("test/f1") == "max"
    assert metric_mode("val/acc", "min") == "min"


def test_markdown_table_ranks_runs_best_first_with_the_failed_one_last(sweep, capsys):
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    header, *rows = table(out)
    assert header[:5] == ["#", "run", "status", "adapter.rank", "task.optimizer.lr"]
    assert "model" not in header and "same in all: model=gpt2-tiny" in out  # constant overrides go above
    assert header[5:] == ["val/loss", "val/acc"]
    assert [r[1] for r in rows] == ["1", "10", "0", "2"]
    assert rows[0][5] == "0.4" and rows[-1][2] == "failed"


def test_accuracy_metric_ranks_highest_first(sweep, capsys):
    assert main([str(sweep), "--metric", "val/acc"]) == 0
    rows = table(capsys.readouterr().out)[1:]
    assert [r[1] for r in rows] == ["1", "10", "0", "2"] and rows[0][5] == "0.95"
    assert main([str(sweep), "--metric", "val/acc", "--mode", "min"]) == 0
    assert [r[1] for r in table(capsys.readouterr().out)[1:]] == ["0", "10", "1", "2"]


def test_csv_output_has_one_row_per_run(sweep, capsys):
    assert main([str(sweep), "--csv", "--metrics", "val/acc"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4 and list(rows[0]) == ["#", "run", "status", "adapter.rank", "task.optimizer.lr", "val/loss",
                                                "val/acc"]
    assert rows[0]["run"] == "1" and float(rows[0]["val/loss"]) == pytest.approx(0.4)


def test_plots_metric_against_a_hyperparameter_and_curves(sweep, tmp_path):
    assert main([str(sweep), "--plot", str(tmp_path / "lr.png"), "--x", "task.optimizer.lr"]) == 0
    assert main([str(sweep), "--plot", str(tmp_path / "seed.png"), "--x", "seed"]) == 0  # from config.yaml
    assert main([str(sweep), "--plot", str(tmp_path / "curves.png"), "--curves"]) == 0
    for name in ("lr.png", "seed.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_runs_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no runs" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2


def test_runs_that_never_validated_are_listed_unranked_and_the_sweep_table_says_why(tmp_path, capsys):
    """Short runs (or limit_val_batches=0) log no val/loss: gptlab-compare shows them instead of
    refusing the default metric, and the sweep's own table marks their empty cell."""
    from gptlab.results import summary_table

    for job, loss in (("0", 2.5), ("1", 2.1)):
        run = tmp_path / job
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"task.optimizer.lr={job}e-3"]))
        write_result(run, "ok", {"train/loss": loss}, "val/loss")
    assert main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "no run logged val/loss" in err and "2 run(s)" in out and "unranked" in out
    rows = table(out)
    assert rows[0] == ["#", "run", "status", "task.optimizer.lr"] and [r[1] for r in rows[1:]] == ["0", "1"]
    assert main([str(tmp_path), "--metric", "val/loss"]) == 2  # asked for by name: still refused, naming what exists
    assert "no run has the metric 'val/loss'; metrics: train/loss" in capsys.readouterr().err
    summary = table(summary_table(tmp_path, "val/loss"))
    assert [r[-1] for r in summary[1:]] == ["ok, no val/loss", "ok, no val/loss"]
