"""The inference loader stands below the tasks: it builds every kind of model from the checkpoint
alone (the same function as the task rebuilt by ``load_task``), reads the file once, and the library
path of ``gptlab-generate`` / ``gptlab-chat`` / ``gptlab-classify`` (pre-flight, loading, a generated
token) never imports Lightning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import gptlab.weights.readers as readers
from gptlab.inference import load_model
from gptlab.tasks.base import GPTTask
from gptlab.tasks.classify import ClassificationTask
from gptlab.tasks.pretrain import PretrainTask
from gptlab.tasks.registry import load_task
from gptlab.tasks.reward import RewardModelTask

SMALL = dict(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
LORA = dict(name="lora", rank=2, alpha=4, targets=["q", "v", "mlp_fc"])


def save(task: GPTTask, path: Path) -> Path:
    """What a gptlab-train checkpoint holds for inference: weights, hyperparameters, gptlab's entries."""
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def randomize_lora(task: GPTTask) -> None:
    with torch.no_grad():
        for name, p in task.model.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("kind,make", [
    ("lm", lambda: PretrainTask(model=SMALL, adapter=LORA, sample_prompt=None)),
    ("classifier", lambda: ClassificationTask(model=SMALL, labels=["a", "b", "c"], adapter=LORA)),
    ("reward", lambda: RewardModelTask(model={**SMALL, "tie_weights": True}, adapter=LORA)),
])
def test_every_kind_is_built_from_the_checkpoint_alone_as_the_task_has_it(tmp_path, kind, make):
    torch.manual_seed(0)
    task = make()
    randomize_lora(task)
    path = save(task, tmp_path / f"{kind}.ckpt")
    loaded = load_model(ckpt_path=path, expect=kind)
    rebuilt = load_task(path).model.eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids), rebuilt(ids), atol=1e-5)
    assert loaded.task == task.task_name
    assert {k: getattr(loaded, k) for k in task.prediction_metadata() if hasattr(loaded, k)} == \
        {k: v for k, v in task.prediction_metadata().items() if hasattr(loaded, k)}


@pytest.mark.parametrize("argument", ["ckpt_path", "init_from"])
def test_load_model_reads_the_checkpoint_once(tmp_path, monkeypatch, argument):
    torch.manual_seed(0)
    path = save(PretrainTask(model=SMALL, sample_prompt=None), tmp_path / "lm.ckpt")
    loads, crc_passes = [], []
    torch_load, zip_file = torch.load, zipfile.ZipFile

    def counting_load(f, *args, **kwargs):
        loads.append(Path(f))
        return torch_load(f, *args, **kwargs)

    def counting_zip(file, *args, **kwargs):
        crc_passes.append(Path(file))
        return zip_file(file, *args, **kwargs)

    readers._VERIFIED.clear()  # a file verified earlier in this process is not read again
    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(readers.zipfile, "ZipFile", counting_zip)
    lm = load_model(**{argument: path})
    assert lm.kind == "lm" and lm.task == "pretrain"
    assert loads == [path] and crc_passes == [path]


@pytest.mark.slow
def test_the_inference_path_never_imports_lightning(tmp_path):
    torch.manual_seed(0)
    path = save(PretrainTask(model=SMALL, sample_prompt=None), tmp_path / "lm.ckpt")
    script = textwrap.dedent(f"""
        import sys
        import torch
        from omegaconf import OmegaConf
        from gptlab.cli.validation import validate_chat_config, validate_classify_config, validate_generate_config
        from gptlab.inference import load_model
        from gptlab.model.generation import generate

        source = dict(ckpt_path={str(path)!r}, init_from=None, adapter_path=None, device="cpu", precision="32")
        validate_generate_config(OmegaConf.create(dict(source, prompt="Hi", max_new_tokens=1, temperature=0.0,
                                                       top_k=None, top_p=None, seed=1, stop_at_eos=True,
                                                       stream=False, use_kv_cache=True)))
        validate_chat_config(OmegaConf.create(dict(source, instruction="Hi", max_new_tokens=1, temperature=0.0)))
        validate_classify_config(OmegaConf.create(dict(source, input=None, batch_size=2)), "a text")
        lm = load_model(ckpt_path={str(path)!r})
        out = generate(lm.model, torch.tensor([[1, 2, 3]]), 1)
        assert out.shape == (1, 4), out.shape
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
        print("LIGHTNING:", loaded[:5])
        sys.exit(1 if loaded else 0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "LIGHTNING: []" in done.stdout
