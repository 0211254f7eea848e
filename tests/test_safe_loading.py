"""Opening a file never runs code. A checkpoint whose pickle would create a file (as a real attack
would run a shell) is refused by every way gptlab opens files: each CLI, ``gptlab-train init_from=``,
``load_pretrained``, ``load_task``; and a checkpoint naming an arbitrary callable as its task is
refused by the task registry, never imported.

Files that lie are refused, naming the file and the tensor or field: safetensors headers whose
offsets, dtypes, shapes or lengths do not hold, weights holding NaN or infinities (with valid
checksums), adapters whose metadata is not what gptlab writes."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from faults import SAFETENSORS_LIES, TINY_WEIGHTS, write_safetensors_parts, write_weight_files
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
from gptlab.model.lora import InvalidAdapterError, apply_lora, has_lora, read_adapter
from gptlab.model.qlora import load_qlora_adapter
from gptlab.tasks.registry import load_task
from gptlab.weights import (SafetensorsReader, TrainingCheckpointError, UnsafeCheckpointError, load_pretrained,
                            to_hf_state_dict)
from gptlab.weights.checkpoint import CheckpointError, load_backbone
from gptlab.weights.checks import InvalidWeightsError, NonFiniteWeightsError
from gptlab.weights.readers import InvalidSafetensorsError


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


# ----------------------------------------------------------------------------- files that lie
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    return write_weight_files(tmp_path_factory.mktemp("weights"))


def test_the_untouched_files_load(weights):
    """The control: the files the lies are made from load, and equal their model."""
    hf = load_pretrained(weights["hf"]).eval()
    assert hf.config.emb_dim == 32 and not hf.config.tie_weights
    lm = load_model(ckpt_path=weights["ckpt"])
    ids = torch.arange(8)[None]
    assert torch.allclose(lm.model(ids), hf(ids), atol=1e-6)
    adapted = load_model(init_from=weights["hf"], adapter_path=weights["adapter"], merge=False)
    assert adapted.model.lora_config["rank"] == 2


@pytest.mark.parametrize("lie", sorted(SAFETENSORS_LIES))
def test_a_safetensors_file_whose_header_lies_is_refused_naming_it(weights, lie):
    path = weights[f"lie_{lie}"]
    with pytest.raises(InvalidWeightsError) as e:
        load_pretrained(path)
    assert str(path) in str(e.value) and SAFETENSORS_LIES[lie][1] in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("lie", sorted(lie for lie in SAFETENSORS_LIES if "declared_1d" not in lie))
def test_the_safetensors_library_refuses_the_same_headers(weights, lie):
    """gptlab's reader is as strict as the library's (whose reader would cost 2x the memory,
    experiments/pretrained_memory); a 1-D shape for a matrix is valid safetensors, refused by shape."""
    with pytest.raises(SafetensorError):
        with safe_open(str(weights[f"lie_{lie}"]), framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]


def test_a_header_length_of_1e12_allocates_nothing(tmp_path):
    path = write_safetensors_parts(tmp_path / "big.safetensors", {}, b"", length=10**12)
    with pytest.raises(InvalidSafetensorsError, match="header length field says 1,000,000,000,000"):
        SafetensorsReader([path])


NON_FINITE = {"nan_hf": "transformer.h.0.mlp.c_fc.weight", "inf_book": "trf_blocks.0.ff.layers.0.weight",
              "nan_ckpt": "model.blocks.0.attn.qkv.weight"}
LOADERS = {"load_pretrained": load_pretrained, "load_backbone": load_backbone, "load_task": load_task,
           "load_model(init_from)": lambda p: load_model(init_from=p),
           "load_model(ckpt_path)": lambda p: load_model(ckpt_path=p)}


@pytest.mark.parametrize("name,loader", [
    *((name, loader) for name in ("nan_hf", "inf_book") for loader in ("load_pretrained", "load_backbone",
                                                                       "load_model(init_from)")),
    *(("nan_ckpt", loader) for loader in ("load_backbone", "load_model(init_from)", "load_model(ckpt_path)",
                                          "load_task"))])
def test_non_finite_weights_are_refused_by_every_loader_naming_the_tensor(weights, name, loader):
    path, tensor = weights[name], NON_FINITE[name]
    with pytest.raises(NonFiniteWeightsError) as e:
        LOADERS[loader](path)
    message = str(e.value)
    # load_backbone names a checkpoint's backbone tensor without the task's "model." prefix
    assert str(path) in message and f"{tensor.removeprefix('model.')}' holds 1 " in message, message
    assert ("NaN" if name.startswith("nan") else "infinite") in message


@pytest.mark.parametrize("name", ["nan_hf", "nan_ckpt"])
def test_train_init_from_refuses_non_finite_weights(weights, tmp_path, name):
    cfg = cli_config("train", "model=gpt2-tiny", "model.context_length=16", f"init_from={weights[name]}",
                     f"paths.output_dir={tmp_path / 'run'}",
                     "data.max_length=16", "logger=csv")
    with pytest.raises(Exception) as e:
        train(cfg)
    cause = e.value if isinstance(e.value, (NonFiniteWeightsError, ConfigError)) else e.value.__cause__  # Hydra wraps it
    # a gptlab training checkpoint is refused by the pre-flight, before anything is built (a ConfigError
    # quoting the loader's refusal); other weight files when they are loaded
    assert isinstance(cause, (NonFiniteWeightsError, ConfigError)) and str(weights[name]) in str(cause)
    assert f"{NON_FINITE[name].removeprefix('model.')}' holds 1 NaN" in str(cause)
    assert isinstance(cause, ConfigError) == (name == "nan_ckpt")


def test_load_pretrained_sends_a_training_checkpoint_to_load_backbone(weights):
    with pytest.raises(TrainingCheckpointError, match="load_backbone"):
        load_pretrained(weights["nan_ckpt"])


def test_float64_weights_that_overflow_float32_are_refused(weights, tmp_path):
    book = {k: v.double() for k, v in torch.load(weights["inf_book"], weights_only=True).items()}
    book["trf_blocks.0.ff.layers.0.weight"] = torch.zeros_like(book["trf_blocks.0.ff.layers.0.weight"])
    book["trf_blocks.0.ff.layers.0.weight"][0, 0] = 1e300
    torch.save(book, tmp_path / "f64.pth")
    with pytest.raises(NonFiniteWeightsError, match="'trf_blocks.0.ff.layers.0.weight' holds 1 infinite"):
        load_pretrained(tmp_path / "f64.pth")
    assert load_pretrained(tmp_path / "f64.pth", dtype=None).blocks[0].mlp.fc.weight[0, 0] == 1e300  # as stored


def test_a_resume_from_a_checkpoint_with_nan_weights_is_refused_before_anything_is_built(weights, tmp_path):
    cfg = cli_config("train", "model=gpt2-tiny", f"ckpt_path={weights['nan_ckpt']}",
                     f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"ckpt_path: .*nan.ckpt: tensor 'model.blocks.0.attn.qkv.weight' holds 1 NaN"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_an_adapter_with_nan_weights_is_refused_naming_the_tensor(weights):
    with pytest.raises(NonFiniteWeightsError,
                       match=r"nan_adapter.safetensors: tensor 'blocks.0.mlp.fc.lora_B' holds 1 NaN"):
        load_model(init_from=weights["hf"], adapter_path=weights["nan_adapter"])


@pytest.mark.parametrize("name,expected", [
    ("adapter_not_json", "its 'config' metadata is not JSON"),
    ("adapter_list", "its 'config' metadata is a JSON list"),
    ("adapter_rank_1e9", "has shape [32, 2], but the adapter's rank is 1000000000"),
    ("adapter_rank_float_1e9", "rank=1000000000.0: expected an integer >= 1"),
    ("adapter_rank_mismatch", "but the adapter's rank is 3"),
    ("adapter_garbage", "is not a valid safetensors file")])
def test_an_adapter_whose_metadata_lies_is_refused_naming_it(weights, name, expected):
    path = weights[name]
    with pytest.raises(InvalidAdapterError) as e:
        read_adapter(path)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)
    base = load_pretrained(weights["hf"])
    with pytest.raises(InvalidAdapterError):
        load_qlora_adapter(base, path)
    assert not has_lora(base)  # refused before any layer was replaced or allocated


@pytest.mark.parametrize("quantization,expected", [
    ({"block_size": 3}, "quantization.block_size=3: expected an even integer >= 2"),
    ({"compute_dtype": "int8"}, "quantization.compute_dtype='int8'"),
    ({"scaler_block_size": 1e9}, "quantization.scaler_block_size=1000000000.0: expected an integer >= 1")])
def test_qlora_settings_in_an_adapter_file_are_checked_before_anything_is_quantized(weights, tmp_path, quantization,
                                                                                    expected):
    with safe_open(str(weights["adapter"]), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    path = tmp_path / "qlora.safetensors"
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps({**config, "quantization": quantization})})
    base = load_pretrained(weights["hf"])
    with pytest.raises(InvalidAdapterError) as e:
        load_qlora_adapter(base, path)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)
    assert not has_lora(base)


def test_a_lora_rank_beyond_the_layer_width_allocates_nothing():
    model = GPT(GPTConfig.from_name("gpt2-tiny"))
    with pytest.raises(ValueError, match=r"LoRA rank 1000000000 for blocks.0.attn.qkv: expected an integer from 1 to "
                                         r"its input width 32"):
        apply_lora(model, rank=10**9)
    assert not has_lora(model)


def test_a_bare_safetensors_with_an_untied_lm_head_keeps_its_head(tmp_path):
    """Without a config.json the tensors tell: an lm_head equal to wte is tied, another one is kept."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(**TINY_WEIGHTS)).eval()
    sd = {k: v.contiguous() for k, v in to_hf_state_dict(model).items()}
    assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    save_file(sd, str(tmp_path / "untied.safetensors"))
    untied = load_pretrained(tmp_path / "untied.safetensors").eval()
    assert not untied.config.tie_weights
    assert torch.equal(untied.out_head.weight, model.out_head.weight)
    ids = torch.arange(10)[None]
    assert torch.allclose(untied(ids), model(ids), atol=1e-6)
    save_file({**sd, "lm_head.weight": sd["transformer.wte.weight"].clone()}, str(tmp_path / "tied.safetensors"))
    tied = load_pretrained(tmp_path / "tied.safetensors")
    assert tied.config.tie_weights and tied.out_head.weight is tied.tok_emb.weight
