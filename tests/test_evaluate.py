"""``gptlab-eval``: loss/perplexity of a model on a text, through the pretraining data module."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from gptlab.data.pretrain import PretrainDataModule
from gptlab.weights import export_hf, load_pretrained


def reference_loss(model, dm_kwargs, split):
    """The book's calc_loss_loader, but token-weighted over every window of the split."""
    dm = PretrainDataModule(shuffle=False, drop_last=False, **dm_kwargs)
    dm.setup()
    ds = dm.train_set if split == "train" else dm.val_set
    losses = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            logits = model(item["input_ids"][None])
            losses.append(torch.nn.functional.cross_entropy(logits[0], item["labels"]).item())
    return sum(losses) / len(losses), len(ds)


@pytest.mark.slow
def test_eval_cli_matches_a_direct_computation(tmp_path, tiny_model):
    export_hf(tiny_model, tmp_path / "tiny")
    model = load_pretrained(tmp_path / "tiny").eval()
    out = tmp_path / "eval.json"
    res = run_cli(["gptlab.cli.evaluate", f"init_from={tmp_path / 'tiny'}", "model.context_length=32",
                   "data.batch_size=3", f"output={out}", "progress=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    for split in ("train", "val"):
        want, n_windows = reference_loss(model, dict(max_length=32, batch_size=3), split)
        assert got[split]["tokens"] == n_windows * 32
        assert got[split]["loss"] == pytest.approx(want, rel=1e-5)
        assert got[split]["ppl"] == pytest.approx(math.exp(want), rel=1e-4)
        assert f"{split}: loss {got[split]['loss']:.4f}" in res.stdout
    # an untrained model is close to uniform over the vocabulary
    assert abs(got["val"]["loss"] - math.log(50257)) < 0.5


def test_eval_rejects_bad_splits_and_too_long_windows(tmp_path, tiny_model):
    export_hf(tiny_model, tmp_path / "tiny")
    res = run_cli(["gptlab.cli.evaluate", f"init_from={tmp_path / 'tiny'}", "splits=[test]"], cwd=tmp_path)
    assert res.returncode == 2 and "splits=['test']: expected a non-empty list of ['train', 'val', 'all']" in res.stderr
    res = run_cli(["gptlab.cli.evaluate", f"init_from={tmp_path / 'tiny'}", "model.context_length=256"], cwd=tmp_path)
    assert res.returncode == 2 and "exceeds the model's context length 64" in res.stderr
    assert "Traceback" not in res.stderr
