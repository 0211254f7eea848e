"""What a user sees: each tool's own ``--help``, one-line messages for missing values and missing
plugins, ``gptlab-config`` (list, show, copy a preset and run it from your own folder), the run
folder and metrics in the console and ``train.log``, ``gptlab-compare`` refusing names that do not
exist, ``gptlab-eval`` taking the context from the checkpoint, chat's banner, file permissions."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.cli.compare import main as compare
from gptlab.cli.configs import main as config_tool
from gptlab.cli import check_plugins, handle_help, require_values
from gptlab.cli.hparams import select_hparams
from gptlab.config_tree import read_keys, render
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import apply_lora, save_adapter
from gptlab.results import read_result, write_result

TINY_RUN = ["model=gpt2-tiny", "data.max_length=32", "data.batch_size=8", "trainer.enable_progress_bar=false",
            "task.sample_prompt=null"]
TOOLS = {"train": ("gptlab-train", ["model", "data", "task", "adapter", "trainer"]),
         "generate": ("gptlab-generate", []), "chat": ("gptlab-chat", []), "classify": ("gptlab-classify", []),
         "eval": ("gptlab-eval", ["data"]), "export": ("gptlab-export", []), "judge": ("gptlab-judge", []),
         "reward": ("gptlab-reward", []), "respond": ("gptlab-respond", ["data"]), "serve": ("gptlab-serve", []),
         "tokenizer": ("gptlab-tokenizer", []),
         "solve": ("gptlab-solve", ["data"])}


# --------------------------------------------------------------------------- --help
@pytest.mark.parametrize("name", sorted(TOOLS))
def test_each_tool_has_its_own_help_with_its_keys_and_examples(name, capsys):
    prog, groups = TOOLS[name]
    with pytest.raises(SystemExit) as e:
        handle_help(name, prog, groups, argv=[prog, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{prog}: ")
    examples = text.split("Examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(examples) >= 3 and all(prog in e for e in examples)
    own = [k for k, _, _ in read_keys((Path(CONFIG_DIR) / f"{name}.yaml").read_text())]
    assert own and all(f"  {k}=" in text for k in own)  # every key of its own config, with its default
    if name != "train":  # the inference tools do not list training groups they would reject
        assert "  trainer " not in text and "  model " not in text
    else:
        assert "gpt2-mini*" in text and "verdict*" in text  # groups with their defaults marked


def test_help_shows_defaults_and_comments():
    text = render("generate", "gptlab-generate")
    assert "temperature=0.0" in text and "0 = greedy" in text and "--config-dir" in text


@pytest.mark.parametrize("name, key", [("export", "out_dir"), ("judge", "responses")])
def test_a_missing_mandatory_value_is_one_line_naming_the_key(name, key, capsys):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(name)
    with pytest.raises(SystemExit) as e:
        require_values(cfg, name, f"gptlab-{name}")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"gptlab-{name}: missing value for {key}=...") and "--help" in err


def test_the_console_entry_prints_help_without_composing(tmp_path):
    res = run_cli(["gptlab.cli.export", "--help"], cwd=tmp_path)
    assert res.returncode == 0 and "out_dir=???" in res.stdout and "Traceback" not in res.stderr


@pytest.mark.parametrize("arg, extra", [("hydra/launcher=parallel", "launchers"), ("hparams_search=spam_optuna", "optuna")])
def test_an_option_whose_plugin_is_missing_names_the_extra(arg, extra, capsys, monkeypatch):
    import gptlab.cli as entry

    monkeypatch.setattr(entry, "_installed", lambda module: False)
    with pytest.raises(SystemExit) as e:
        check_plugins("gptlab-train", ["gptlab-train", "-m", arg])
    assert e.value.code == 2 and f'pip install "gptlab[{extra}]"' in capsys.readouterr().err


# --------------------------------------------------------------------------- gptlab-config
def test_config_ls_lists_groups_options_and_descriptions(capsys):
    assert config_tool(["ls", "experiment"]) == 0
    out = capsys.readouterr().out
    assert "experiment/ch06_spam_scratch" in out and "experiment/ch05_verdict" in out


def test_config_ls_describes_every_tool_config_and_every_preset(capsys):
    """Every config file is listed with a description: each tool's own config (one per console script
    that composes one) and every option of every group, presets included."""
    assert config_tool(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    described = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ") and len(line.split()) > 1}
    listed = {line.split()[0] for line in lines if line.startswith("  ")}
    root = Path(CONFIG_DIR)
    every = {p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml")}
    assert listed == every and set(described) == every, sorted(every - set(described))
    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    tools = {name.removeprefix("gptlab-") for name in scripts} - {"compare", "config"}  # argparse tools: no config
    assert tools <= every and {"respond", "reward"} <= tools
    assert all(len(described[name]) >= 8 for name in every)  # "no logger" is the shortest


def test_config_cp_copies_a_preset_that_runs_from_your_own_folder(tmp_path, capsys):
    assert config_tool(["cp", "experiment/ch06_spam_scratch", str(tmp_path / "mine" / "experiment" / "my_spam.yaml")]) == 0
    copied = tmp_path / "mine" / "experiment" / "my_spam.yaml"
    assert copied.read_text() == (Path(CONFIG_DIR) / "experiment" / "ch06_spam_scratch.yaml").read_text()
    assert f"--config-dir {tmp_path / 'mine'} experiment=my_spam" in capsys.readouterr().out
    copied.write_text(copied.read_text().replace("\nseed: ", "\nseed: 777  # was "))  # the user's edit
    with pytest.raises(SystemExit):
        config_tool(["cp", "experiment/ch06_spam_scratch", str(copied)])  # no silent overwrite
    # the user's folder joins the search path (what --config-dir does) and composes with gptlab's groups
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=my_spam", f"hydra.searchpath=[file://{tmp_path / 'mine'}]"])
    assert cfg.seed == 777 and cfg.task._target_ == "gptlab.tasks.classify.ClassificationTask"


def test_config_refuses_unknown_names_listing_the_options():
    with pytest.raises(SystemExit, match="options: .*ch05_verdict"):
        config_tool(["show", "experiment/ch99"])


# --------------------------------------------------------------------------- runs, logs, results
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, object]:
    tmp = tmp_path_factory.mktemp("run")
    run = tmp / "run"
    res = run_cli(["gptlab.cli.train", *TINY_RUN, "trainer.max_steps=4", "trainer.val_check_interval=2",
                   f"hydra.run.dir={run}"], cwd=tmp, env={"HYDRA_FULL_ERROR": "0"})
    return run, res


@pytest.mark.slow
def test_a_run_names_its_folder_and_logs_metrics_without_noise(finished_run):
    run, res = finished_run
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.splitlines()[0] == f"run folder: {run}"
    assert f"results in {run}" in res.stdout and f"tensorboard --logdir {run}" in res.stdout
    log = (run / "train.log").read_text()
    # the metrics of every validation (after updates 2 and 4), at the steps TensorBoard shows them at
    assert "epoch 0, step 1: " in log and "epoch 0, step 3: " in log and "val/loss" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [1, 3]
    assert [e.step for e in events.Scalars("train/loss_step")] == [0, 1, 2, 3]
    assert "GPU available" in log  # Lightning's own lines reach the file too
    both = res.stdout + res.stderr
    for noise in ("Tip:", "LeafSpec", "Total FLOPs", 'ckpt_path="last"', "smaller than the logging interval"):
        assert noise not in both
    result = read_result(run)
    assert result["status"] == "ok" and result["metrics"]["val/loss"] > 0


@pytest.mark.slow
def test_a_run_into_a_folder_with_checkpoints_refuses_to_overwrite_them(finished_run, tmp_path):
    run, _ = finished_run
    res = run_cli(["gptlab.cli.train", *TINY_RUN, "trainer.max_steps=1", f"hydra.run.dir={run}"], cwd=tmp_path,
                  env={"HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 2 and "already holds" in res.stderr and "ckpt_path=" in res.stderr
    assert "Traceback" not in res.stderr


def test_hparams_are_the_knobs_not_the_plumbing():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["adapter=lora", "paths.output_dir=/tmp/x"])
    hp = select_hparams(OmegaConf.to_container(cfg, resolve=True), {"experiment": "appE_spam_lora"})
    assert {"model.emb_dim", "data.batch_size", "adapter.rank", "trainer.max_epochs", "seed"} <= set(hp)
    assert hp["experiment"] == "appE_spam_lora"
    assert not [k for k in hp if "_target_" in k or k.startswith(("paths", "hydra", "callbacks", "logger"))
                or k.endswith(("dirpath", "default_root_dir", "num_workers"))]
    assert len(hp) < 60


def make_run(root: Path, name: str, overrides: list[str], status: str | None, metrics: dict, csv_rows=None) -> Path:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / ".hydra" / "config.yaml").write_text("task:\n  lr: 0.001\nseed: 1\n")
    if status:
        write_result(run, status, metrics, "val/loss")
    if csv_rows:
        (run / "csv").mkdir()
        (run / "csv" / "metrics.csv").write_text("epoch,step,val/loss\n" + "".join(f"0,{s},{v}\n" for s, v in csv_rows))
    return run


def test_compare_reads_csv_runs_marks_unfinished_ones_and_formats_numbers(tmp_path, capsys):
    make_run(tmp_path, "0", ["task.lr=0.00031622776601683794"], "ok", {"val/loss": 2.5}, csv_rows=[(1, 3.0), (2, 2.5)])
    make_run(tmp_path, "1", ["task.lr=0.001"], None, {}, csv_rows=[(1, 3.5)])  # killed: no metrics.json
    make_run(tmp_path, "2", ["task.lr=0.01"], "interrupted", {"val/loss": 2.0})
    assert compare([str(tmp_path)]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")][1:]
    assert [(r[1], r[2], r[3]) for r in rows] == [("0", "ok", "0.0003162"), ("1", "incomplete", "0.001"),
                                                  ("2", "interrupted", "0.01")]


@pytest.mark.parametrize("args, message", [(["--metric", "val/los"], "no run has the metric 'val/los'; metrics: val/loss"),
                                           (["--plot", "x.png", "--x", "task.lrr"], "no run has the hyperparameter 'task.lrr'; keys: ")])
def test_compare_refuses_names_that_no_run_has(tmp_path, capsys, args, message):
    make_run(tmp_path, "0", ["task.lr=0.001"], "ok", {"val/loss": 2.5})
    assert compare([str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    if "--x" in args:
        assert "task.lr" in err and not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- eval, chat, files
def test_eval_windows_take_the_models_context_by_default(tmp_path):
    from gptlab.cli.evaluate import run as eval_run

    model = GPT(GPTConfig.from_name("gpt2-tiny", context_length=48))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"init_from={tmp_path / 'm.pt'}", "device=cpu", "progress=false",
                                         "splits=[val]", f"output={tmp_path / 'eval.json'}"])
    eval_run(cfg)
    out = json.loads((tmp_path / "eval.json").read_text())
    assert out["max_length"] == 48 and out["data"][0].endswith("the-verdict.txt")


def test_chat_prints_a_banner_with_the_model_and_settings(tmp_path):
    from gptlab.cli.chat import banner
    from gptlab.inference import load_model

    torch.save(GPT(GPTConfig.from_name("gpt2-tiny")).state_dict(), tmp_path / "m.pt")
    lm = load_model(init_from=str(tmp_path / "m.pt"))
    cfg = OmegaConf.create({"temperature": 0.7, "top_k": 40, "top_p": None, "max_new_tokens": 64})
    line = banner(lm, "alpaca", cfg)
    assert "m.pt" in line and "3.2M parameters" in line and "alpaca" in line and "temperature 0.7, top-k 40" in line
    assert "\n" not in line


def test_safetensors_files_get_the_usual_permissions(tmp_path):
    model = apply_lora(GPT(GPTConfig.from_name("gpt2-tiny")), rank=2)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_offline_downloads_fail_at_once_naming_every_file(tmp_path, monkeypatch):
    import gptlab.weights.download as dl

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(dl, "reachable", lambda url, timeout=3.0: False)
    monkeypatch.setattr(dl, "_hub_download", lambda: pytest.fail("a download was attempted"))
    with pytest.raises(dl.DownloadError) as e:
        dl.fetch_hf_model("openai-community/gpt2")
    msg = str(e.value)
    for name in ("config.json", "model.safetensors"):
        assert f"openai-community/gpt2/resolve/main/{name}" in msg
        assert str(tmp_path / "hf" / "openai-community--gpt2" / name) in msg


def test_the_end_of_run_line_names_only_what_the_run_wrote(tmp_path, caplog):
    """debug=fdr writes no checkpoint and logger=none no event file: the line does not claim them."""
    import logging
    import time

    from gptlab.cli.runs import announce_end

    (tmp_path / "checkpoints").mkdir()  # made, left empty
    (tmp_path / "train.log").write_text("")
    (tmp_path / "metrics.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="gptlab"):
        announce_end(tmp_path, "finished", {"val/loss": 1.0}, time.perf_counter())
    line = caplog.messages[-1]
    assert line == f"results in {tmp_path.resolve()} (train.log, metrics.json)"
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out").write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger="gptlab"):
        announce_end(tmp_path, "finished", {}, time.perf_counter())
    assert caplog.messages[-1].startswith(f"results in {tmp_path.resolve()} (checkpoints/, tensorboard/, train.log, "
                                          "metrics.json); view: tensorboard --logdir")


def test_a_run_too_short_to_validate_is_validated_at_its_end_on_one_step_axis(tmp_path, caplog):
    """3 updates and no validation interval reached: the final weights are validated (val/loss exists
    for the sweep's optimized_metric), every point on the book's 0-based step axis: the pass before
    the first update at -1, the k-th update's training loss and the validation after it at k - 1,
    on the console as in the CSV."""
    import csv
    import logging

    from gptlab.cli.train import train

    overrides = ["model=gpt2-tiny", "data.batch_size=4", "data.max_length=32", "trainer.max_steps=3",
                 "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "validate_before_fit=true",
                 "logger=csv", "callbacks=none", "+callbacks.log_metrics._target_=gptlab.callbacks.LogMetrics",
                 f"paths.output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with caplog.at_level(logging.INFO, logger="gptlab"):
        metrics = train(cfg)
    assert metrics["val/loss"] > 0 and "step" not in metrics
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("val/loss")] == [-1, 2]
    assert [int(r["step"]) for r in rows if r.get("train/loss_step")] == [0, 1, 2]
    console = [m.split(":")[0].split(", ")[1] for m in caplog.messages if m.startswith("epoch ")]
    assert console == ["step -1", "step 2"]
