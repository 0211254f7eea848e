"""Opening a file never runs code. A checkpoint whose pickle would create a file (as a real attack
would run a shell) is refused by every way gptlab opens files: each CLI, ``gptlab-train init_from=``,
``load_pretrained``, ``load_task``; and a checkpoint naming an arbitrary callable as its task is
refused by the task registry, never imported."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gptlab.cli import CONFIG_DIR
from gptlab.cli.chat import run as chat_run
from gptlab.cli.classify import run as classify_run
from gptlab.cli.evaluate import run as eval_run
from gptlab.cli.export import run as export_run
from gptlab.cli.generate import run as generate_run
from gptlab.cli.train import train
from gptlab.errors import ConfigError
from gptlab.inference import load_model
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.tasks.registry import load_task
from gptlab.weights import UnsafeCheckpointError, load_pretrained
from gptlab.weights.checkpoint import CheckpointError, load_backbone


class CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: the file appearing means code ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def tiny_state() -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in GPT(GPTConfig.from_name("gpt2-tiny")).state_dict().items()}


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a gptlab-looking checkpoint carrying a payload, the file the payload would create)."""
    marker = tmp_path / "PWNED"
    ckpt = {"state_dict": tiny_state(), "gptlab_task": "pretrain", "gptlab_kind": "lm",
            "gptlab_model_config": GPTConfig.from_name("gpt2-tiny").to_dict(), "payload": CreatesAFile(marker)}
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_the_crafted_checkpoint_really_runs_code_when_unpickled(evil, tmp_path):
    """The fixture is a real attack: an unsafe load (what gptlab never does) creates the file."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def assert_refused(excinfo: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    message = str(excinfo.value)
    assert not marker.exists(), "the checkpoint's code ran"
    assert str(path) in message and "not a gptlab, Hugging Face or book checkpoint" in message
    assert "weights_only=False" not in message


def cli_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.mark.parametrize("source", ["ckpt_path", "init_from"])
@pytest.mark.parametrize("cli", ["generate", "chat", "classify", "eval", "export"])
def test_every_inference_cli_refuses_it_without_running_it(evil, tmp_path, cli, source):
    path, marker = evil
    common = [f"{source}={path}", "device=cpu"]
    with pytest.raises(UnsafeCheckpointError) as e:
        if cli == "generate":
            generate_run(cli_config("generate", *common, "max_new_tokens=2"))
        elif cli == "chat":
            chat_run(cli_config("chat", *common, "instruction=hi", "max_new_tokens=2"), out=io.StringIO())
        elif cli == "classify":
            classify_run(cli_config("classify", *common, "text=hi"), out=io.StringIO())
        elif cli == "eval":
            eval_run(cli_config("eval", *common, "max_batches=1", "progress=false"))
        else:
            export_run(cli_config("export", f"{source}={path}", f"out_dir={tmp_path / 'out'}"))
    assert_refused(e, path, marker)
    assert not (tmp_path / "out").exists()


def test_train_init_from_refuses_it_without_running_it(evil, tmp_path):
    path, marker = evil
    cfg = cli_config("train", "model=gpt2-tiny", f"init_from={path}", f"paths.output_dir={tmp_path / 'run'}",
                     "data.max_length=32", "logger=csv")
    with pytest.raises(ConfigError) as e:  # by the pre-flight: before the run folder, data or task exist
        train(cfg)
    assert_refused(e, path, marker)
    assert f"init_from={str(path)!r}: " in str(e.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("loader", [load_pretrained, load_backbone, load_task,
                                    lambda p: load_model(ckpt_path=p), lambda p: load_model(init_from=p)])
def test_the_library_loaders_refuse_it_without_running_it(evil, loader):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as e:
        loader(path)
    assert_refused(e, path, marker)


def test_a_plain_state_dict_with_a_payload_is_refused_too(tmp_path):
    marker = tmp_path / "PWNED"
    sd = {**GPT(GPTConfig.from_name("gpt2-tiny")).state_dict(), "x": CreatesAFile(marker)}
    torch.save(sd, tmp_path / "book.pth")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_pretrained(tmp_path / "book.pth")
    assert_refused(e, tmp_path / "book.pth", marker)


def test_a_legacy_non_zip_pickle_is_refused(tmp_path):
    """``torch.save(_use_new_zipfile_serialization=False)`` files go through the same safe load."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(2), "x": CreatesAFile(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_pretrained(path)
    assert_refused(e, path, marker)


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "gptlab.tasks.base.GPTTask", "subprocess.call"])
def test_a_task_name_that_is_not_a_registered_gptlab_task_is_refused(tmp_path, name):
    """Nothing a file names is imported or called: ``gptlab_task`` is looked up in the registry."""
    ckpt = {"state_dict": tiny_state(), "gptlab_task": name, "hyper_parameters": {"model": {"name": "gpt2-tiny"}}}
    path = tmp_path / "named.ckpt"
    torch.save(ckpt, path)  # plain containers: the safe loader reads it; the registry refuses it
    with pytest.raises(CheckpointError, match=rf"task '{name}' is not one of gptlab's tasks"):
        load_task(path)
    with pytest.raises(CheckpointError, match="not one of gptlab's tasks"):
        load_model(ckpt_path=path)


def test_a_file_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.ckpt is not a readable checkpoint"):
        load_task(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what torch alone says: gptlab's message names the file
