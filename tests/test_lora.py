"""LoRA: the layer's math, freezing, merging, adapter files, and the task hookup."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn as nn

from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import (LoRALinear, apply_lora, disable_lora, load_adapter, lora_layers, lora_state_dict, merge_lora,
                               read_adapter, remove_lora, save_adapter, trainable_parameters, unmerge_lora)
from gptlab.tasks.pretrain import PretrainTask

TINY = dict(name="gpt2-tiny", vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2,
            drop_rate=0.0)


def randomize_lora(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Give every B a non-zero value, so the adapter actually changes the outputs."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for _, B in layer._pairs():
                B.normal_(0, std)
    return model


def ids(batch: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, T))


# ----------------------------------------------------------------- the layer
@pytest.mark.parametrize("scaling,expected", [("rank", 8 / 4), ("plain", 8.0), ("rslora", 8 / math.sqrt(4))])
def test_lora_linear_equals_dense_weight_plus_scaled_AB(scaling, expected):
    base = nn.Linear(8, 12)
    layer = LoRALinear(base, rank=4, alpha=8, scaling=scaling)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 8)
    assert layer.scale == pytest.approx(expected)
    assert layer.lora_A.shape == (8, 4) and layer.lora_B.shape == (4, 12)
    dense = base.weight + expected * (layer.lora_A @ layer.lora_B).T  # (out, in)
    torch.testing.assert_close(layer(x), x @ dense.T + base.bias)


def test_fused_qkv_parts_adapt_only_their_own_output_slice():
    D = 6
    base = nn.Linear(D, 3 * D, bias=False)
    layer = LoRALinear(base, rank=2, alpha=2, parts={"q": (0, D), "v": (2 * D, 3 * D)})
    for B in layer.lora_B.values():
        nn.init.normal_(B)
    delta = torch.zeros(3 * D, D)
    delta[:D] = (layer.lora_A["q"] @ layer.lora_B["q"]).T
    delta[2 * D:] = (layer.lora_A["v"] @ layer.lora_B["v"]).T  # k rows stay untouched
    x = torch.randn(4, D)
    torch.testing.assert_close(layer(x), x @ (base.weight + delta).T)
    torch.testing.assert_close(layer.delta_weight(), delta)


def test_lora_linear_shares_the_base_parameters_and_keeps_their_names():
    base = nn.Linear(4, 4)
    layer = LoRALinear(base, rank=2, alpha=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert {n for n, _ in layer.named_parameters()} == {"weight", "bias", "lora_A", "lora_B"}


def test_dropout_acts_on_the_lora_path_only():
    layer = LoRALinear(nn.Linear(16, 16), rank=2, alpha=2, dropout=0.5).train()
    x = torch.randn(8, 16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))  # B = 0
    nn.init.normal_(layer.lora_B)
    assert not torch.allclose(layer(x), layer(x))  # random masks on the LoRA path
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


# ----------------------------------------------------------------- applying to the backbone
def test_fresh_lora_leaves_the_outputs_unchanged(tiny_model):
    x = ids()
    before = tiny_model(x)
    apply_lora(tiny_model, rank=4, alpha=8)
    assert torch.equal(tiny_model(x), before)  # B = 0


def test_apply_lora_wraps_the_targets_and_freezes_the_rest(tiny_model):
    apply_lora(tiny_model, rank=4, alpha=4, targets=["q", "v", "mlp_fc"])
    names = {n for n, _ in lora_layers(tiny_model)}
    assert names == {"blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.mlp.fc", "blocks.1.mlp.fc"}
    assert list(tiny_model.blocks[0].attn.qkv.parts) == ["q", "v"]
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # per block: q and v (in=32, out=32) and fc (32 -> 128), rank 4
    assert trainable_parameters(tiny_model) == 2 * (2 * 4 * (32 + 32) + 4 * (32 + 128))


def test_train_extra_trains_matching_parameters_fully(tiny_model):
    apply_lora(tiny_model, rank=2, alpha=2, targets=["q"], train_extra=["out_head", "final_norm"])
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert {"out_head.weight", "final_norm.weight", "final_norm.bias"} <= trainable


def test_bad_settings_fail_with_the_offending_value(tiny_model):
    with pytest.raises(ValueError, match="attn_qkv"):
        apply_lora(copy.deepcopy(tiny_model), targets=["attn_qkv"])
    with pytest.raises(ValueError, match="no_such_layer"):
        apply_lora(copy.deepcopy(tiny_model), train_extra=["no_such_layer"])
    with pytest.raises(ValueError, match="scaling"):
        apply_lora(copy.deepcopy(tiny_model), scaling="sqrt")
    apply_lora(tiny_model, rank=2)
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(tiny_model, rank=2)


def test_a_tied_head_is_skipped_with_a_warning():
    model = GPT(GPTConfig(**{**TINY, "tie_weights": True}))
    with pytest.warns(UserWarning, match="tied"):
        apply_lora(model, rank=2, alpha=2)
    assert not isinstance(model.out_head, LoRALinear)
    assert model.out_head.weight is model.tok_emb.weight
    merge_lora(randomize_lora(model))
    assert model.out_head.weight is model.tok_emb.weight


def test_book_appendix_e_trainable_parameter_count():
    """gpt2-small, 2-class head, rank 16 on every linear layer: the book's 2,666,528."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2-small"))
        model.out_head = nn.Linear(768, 2)
    apply_lora(model, rank=16, alpha=16)
    assert trainable_parameters(model) == 2_666_528


def test_only_lora_parameters_change_after_an_optimizer_step(tiny_model):
    apply_lora(tiny_model.train(), rank=4, alpha=8, train_extra=["final_norm"])
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(2):  # step 1 moves B only (A's grad is 0 while B = 0); step 2 moves A too
        tiny_model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in tiny_model.named_parameters() if not torch.equal(p, before[n])}
    expected = {n for n, _ in tiny_model.named_parameters() if ".lora_" in n or n.startswith("final_norm")}
    assert changed == expected


# ----------------------------------------------------------------- merging
def test_merged_model_gives_the_unmerged_outputs(tiny_model):
    randomize_lora(apply_lora(tiny_model, rank=4, alpha=8))
    x = ids()
    unmerged = tiny_model(x)
    weight = tiny_model.blocks[0].mlp.fc.weight.detach().clone()
    merge_lora(tiny_model)
    merged_once = tiny_model(x)
    merge_lora(tiny_model)  # idempotent
    torch.testing.assert_close(merged_once, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tiny_model(x), merged_once, rtol=0, atol=0)
    unmerge_lora(tiny_model)
    torch.testing.assert_close(tiny_model.blocks[0].mlp.fc.weight, weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiny_model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_disable_lora_gives_the_base_outputs_inside_and_the_adapted_ones_after(tiny_model):
    x = ids()
    with torch.no_grad():
        base = tiny_model(x)
        model = randomize_lora(apply_lora(copy.deepcopy(tiny_model), rank=4, alpha=8))
        adapted = model(x)
        with disable_lora(model):
            assert torch.allclose(model(x), base, atol=1e-6)
        assert torch.equal(model(x), adapted)
        merge_lora(model)  # a merged update is taken out of the weights and put back
        with disable_lora(model):
            assert torch.allclose(model(x), base, atol=1e-5)
        assert torch.allclose(model(x), adapted, atol=1e-5) and all(layer.merged for _, layer in lora_layers(model))
        with disable_lora(tiny_model):  # no LoRA: nothing to switch off
            assert torch.equal(tiny_model(x), base)


def test_merge_is_a_no_op_without_lora(tiny_model):
    x = ids()
    before = tiny_model(x)
    assert torch.equal(merge_lora(tiny_model)(x), before)


# ----------------------------------------------------------------- adapter files
def test_adapter_holds_lora_weights_train_extra_and_settings_only(tiny_model, tmp_path):
    apply_lora(tiny_model, rank=4, alpha=8, targets=["q", "k", "v", "head"], train_extra=["final_norm"],
               scaling="plain")
    keys = set(lora_state_dict(tiny_model))
    assert all(".lora_" in k or k.startswith("final_norm.") for k in keys)
    assert {"final_norm.weight", "final_norm.bias", "out_head.lora_A", "blocks.1.attn.qkv.lora_B.k"} <= keys
    path = save_adapter(tiny_model, tmp_path / "a.safetensors", {"init_from": "base.pt"})
    tensors, config = read_adapter(path)
    assert set(tensors) == keys
    assert config == {"init_from": "base.pt", "rank": 4, "alpha": 8, "dropout": 0.0,
                      "targets": ["q", "k", "v", "head"], "scaling": "plain", "train_extra": ["final_norm"]}
    full_bytes = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    assert path.stat().st_size < full_bytes / 10


def test_base_plus_adapter_reproduces_the_finetuned_model_exactly(tiny_model, tmp_path):
    base_state = copy.deepcopy(tiny_model.state_dict())
    apply_lora(tiny_model.train(), rank=4, alpha=8, dropout=0.1, train_extra=["final_norm"])
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = ids()
        tiny_model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    path = save_adapter(tiny_model.eval(), tmp_path / "adapter.safetensors")
    fresh = GPT(tiny_model.config)
    fresh.load_state_dict(base_state)
    load_adapter(fresh.eval(), path)
    x = ids()
    assert torch.equal(fresh(x), tiny_model(x))


def test_a_classifier_adapter_loads_onto_the_plain_pretrained_model(tiny_model, tmp_path):
    base_state = copy.deepcopy(tiny_model.state_dict())
    tiny_model.out_head = nn.Linear(32, 2)  # what a classification task does before LoRA
    randomize_lora(apply_lora(tiny_model, rank=2, alpha=2))
    path = save_adapter(tiny_model, tmp_path / "spam.safetensors")
    assert {"out_head.weight", "out_head.bias"} <= set(read_adapter(path)[0])  # the new head travels along
    fresh = GPT(tiny_model.config)
    fresh.load_state_dict(base_state)
    load_adapter(fresh.eval(), path)
    x = ids()
    assert fresh(x).shape == (2, 16, 2)
    assert torch.equal(fresh(x), tiny_model(x))


def test_adapters_swap_on_one_base_and_remove_lora_restores_it(tiny_model, tmp_path):
    x = ids()
    base_out = tiny_model(x)
    paths, outs = [], []
    for i, rank in enumerate((2, 4)):
        model = randomize_lora(apply_lora(copy.deepcopy(tiny_model), rank=rank, alpha=rank))
        outs.append(model(x))
        paths.append(save_adapter(model, tmp_path / f"task{i}.safetensors"))
    assert not torch.allclose(outs[0], outs[1])
    model = copy.deepcopy(tiny_model)
    for path, out in zip(paths, outs):
        assert torch.equal(load_adapter(model, path)(x), out)
        assert torch.equal(remove_lora(model)(x), base_out)
        assert not any(True for _ in lora_layers(model))


def test_loading_onto_the_wrong_model_names_the_key(tiny_model, tmp_path):
    path = save_adapter(apply_lora(tiny_model, rank=2, alpha=2), tmp_path / "a.safetensors")
    other = GPT(GPTConfig(**{**TINY, "emb_dim": 48}))
    with pytest.raises(ValueError, match=r"shape mismatch for 'blocks\.\d\.[a-z.]+\.lora_A"):
        load_adapter(other, path)
    different = apply_lora(GPT(GPTConfig(**TINY)), rank=4, alpha=2)
    with pytest.raises(ValueError, match="rank"):
        load_adapter(different, path)


def test_not_an_adapter_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a gptlab LoRA adapter"):
        read_adapter(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        read_adapter(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------- the task hookup
def lm_batches(n: int, T: int = 16) -> torch.utils.data.DataLoader:
    x = torch.randint(0, 50257, (n, 2, T + 1))
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in x]
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_a_lora_run_saves_an_adapter_that_reproduces_the_finetuned_model(tmp_path):
    adapter = dict(name="lora", rank=4, alpha=8, dropout=0.0, targets=["q", "v", "mlp_fc"], scaling="rank",
                   train_extra=[])
    task = PretrainTask(model=TINY, adapter=adapter, optimizer={"lr": 1e-2}, lr_schedule={"name": "constant"},
                        sample_prompt=None)
    base_state = {k: v.clone() for k, v in task.model.state_dict().items() if ".lora_" not in k}
    assert task.trainable_parameter_count() == 2 * (2 * 4 * 64 + 4 * 160)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(task, train_dataloaders=lm_batches(3))
    path = tmp_path / "checkpoints" / "adapter.safetensors"
    assert path.is_file() and read_adapter(path)[1]["rank"] == 4
    fresh = GPT(GPTConfig(**TINY))
    fresh.load_state_dict(base_state)
    load_adapter(fresh.eval(), path)
    x = ids()
    assert torch.equal(fresh(x), task.model.eval()(x))
    assert not torch.allclose(fresh(x), remove_lora(copy.deepcopy(fresh))(x))  # training did change it


def test_the_inference_loader_merges_an_adapter(tmp_path):
    from gptlab.inference import load_model

    base = GPT(GPTConfig(**TINY)).eval()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    tuned = randomize_lora(apply_lora(copy.deepcopy(base), rank=2, alpha=2))
    path = save_adapter(tuned, tmp_path / "a.safetensors")
    model = load_model(init_from=str(tmp_path / "base.pt"), adapter_path=str(path)).model
    assert all(layer.merged for _, layer in lora_layers(model))
    x = ids()
    torch.testing.assert_close(model(x), tuned(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_lora_run_on_an_init_from_base_gives_an_adapter_for_that_base(tmp_path):
    """gptlab-train init_from=<base> adapter=lora writes checkpoints/adapter.safetensors; the base +
    that adapter is the fine-tuned model, bit for bit (and gptlab-generate's loader merges it)."""
    from conftest import run_cli
    from gptlab.inference import load_model
    from gptlab.tasks.registry import load_task
    from gptlab.weights import load_pretrained

    base_file = tmp_path / "base.pt"
    torch.save(GPT(GPTConfig.from_name("gpt2-tiny")).state_dict(), base_file)
    run = tmp_path / "run"
    res = run_cli(["gptlab.cli.train", "model=gpt2-tiny", f"init_from={base_file}", "data=random",
                   "data.num_train=12", "data.num_val=4", "data.batch_size=4", "data.num_workers=0",
                   "data.max_length=32", "adapter=lora", "adapter.targets=[q,v,mlp_fc,head]", "task.optimizer.lr=1e-2",
                   "task.sample_prompt=null", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                   f"hydra.run.dir={run}"], cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    adapter = run / "checkpoints" / "adapter.safetensors"
    tensors, config = read_adapter(adapter)
    assert config["init_from"] == str(base_file) and config["targets"] == ["q", "v", "mlp_fc", "head"]
    tuned = load_task(str(run / "checkpoints" / "last.ckpt")).model.eval()
    base = load_pretrained(base_file).eval()
    x = ids()
    assert not torch.allclose(base(x), tuned(x))
    assert torch.equal(load_adapter(base, adapter)(x), tuned(x))
    merged = load_model(init_from=str(base_file), adapter_path=str(adapter)).model
    torch.testing.assert_close(merged(x), tuned(x), rtol=1e-4, atol=1e-4)
