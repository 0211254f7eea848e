"""QLoRA: NF4 base weights (torchao) under LoRA: the quantization error bound, the stored bytes, the
outputs at init, training, gradients, adapter files, merging, checkpoints and resume, and the
``adapter=qlora`` config group."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("torchao", reason="adapter=qlora needs torchao: pip install 'gptlab[qlora]'")

from conftest import CONF_DIR  # noqa: E402
from gptlab.model import lora as lora_module  # noqa: E402
from gptlab.model import qlora as qlora_module  # noqa: E402
from gptlab.model.config import GPTConfig  # noqa: E402
from gptlab.model.gpt import GPT  # noqa: E402
from gptlab.model.lora import LoRALinear, lora_layers, merge_lora, read_adapter, save_adapter  # noqa: E402
from gptlab.model.qlora import (QLoRALinear, apply_qlora, dequantize_qlora, frozen_linear_bytes,  # noqa: E402
                                is_nf4, load_qlora_adapter, nf4_nbytes, nf4_quantizable, qlora_layers)
from gptlab.tasks.classify import ClassificationTask  # noqa: E402
from gptlab.tasks.pretrain import PretrainTask  # noqa: E402

TINY = GPTConfig.from_name("gpt2-tiny").to_dict()
SMALL_BLOCKS = dict(block_size=32, scaler_block_size=8)  # gpt2-tiny's 32-wide weights do not split into 64 x 256
NF4_LEVELS = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])  # QLoRA's NF4 table


def ids(B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 50257, (B, T))


def tiny_qlora(rank: int = 4, **kw) -> GPT:
    return apply_qlora(GPT(GPTConfig(**TINY)).eval(), rank=rank, alpha=rank, **{**SMALL_BLOCKS, **kw})


def randomize_lora(model: nn.Module) -> nn.Module:
    """Non-zero B (and a changed head): stands in for training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.3)
    return model


def plain_with_weights_of(model: nn.Module) -> GPT:
    """A plain GPT holding ``model``'s state dict: the dequantized base, without LoRA."""
    plain = GPT(GPTConfig(**TINY)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    return plain


# ----------------------------------------------------------------- the quantizer
def test_nf4_error_stays_within_the_per_block_bound_on_a_gpt2_matrix():
    """Bound per weight w in 64-block i (absmax s_i), scaler group g of 256 blocks:
    |w - deq(q(w))| <= s_i * h + d_g / 128, where h = 0.1519 is the largest half-gap between
    neighbouring NF4 levels (between -1 and -0.6962) and d_g = max |s_j - mean(s)| over the group: the
    int8 scales step by d_g / 128 (an error of at most one step when round-to-nearest is clamped at 127)."""
    w = torch.empty(3072, 768)
    nn.init.normal_(w, std=0.02)  # GPT-2's init of mlp.fc (768 -> 3072), stored (out, in)
    q = qlora_module.nf4_module().to_nf4(w, 64, 256)
    err = (q.get_original_weight() - w).abs().view(-1, 64)
    s = w.view(-1, 64).abs().amax(1)  # (n_blocks,)
    h = (NF4_LEVELS.diff() / 2).max()
    d = (s - s.mean()).view(-1, 256).abs().amax(1).repeat_interleave(256)  # (n_blocks,)
    bound = s * h + d / 128
    ratio = (err / bound[:, None]).max().item()
    assert ratio <= 1 + 1e-5, f"error reaches {ratio:.4f}x the bound"
    assert ratio > 0.5  # the bound is tight-ish, not vacuous
    rel = (err.sum() / w.abs().sum()).item()
    assert 0.05 < rel < 0.12  # mean |error| / mean |w|: ~9% for Gaussian weights


def test_frozen_linears_store_at_most_0_3x_their_fp32_bytes():
    # one GPT-2-small block (768 wide) and a tiny vocabulary: the real layer shapes, quickly
    model = GPT(GPTConfig(**{**TINY, "emb_dim": 768, "n_heads": 12, "n_layers": 1, "vocab_size": 256}))
    apply_qlora(model, rank=8, alpha=8)
    layers = qlora_layers(model)
    assert [n for n, _ in layers] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc", "blocks.0.mlp.proj"]
    # counted by hand: 4-bit codes (n/2 bytes), int8 scale per 64 (n/64), fp32 factor per 64*256, mean, 16-level table
    expected = sum(n // 2 + n // 64 + 4 * (n // (64 * 256)) + 4 + 16 * 4
                   for n in (2304 * 768, 768 * 768, 3072 * 768, 768 * 3072))
    stored, fp32 = frozen_linear_bytes(model)
    assert stored == expected and fp32 == 4 * 12 * 768 * 768
    assert stored <= 0.3 * fp32 and round(stored / fp32, 3) == 0.129
    assert all(is_nf4(layer.weight) and nf4_nbytes(layer.weight) < layer.weight.numel() for _, layer in layers)


@pytest.mark.parametrize("shape, ok", [((3072, 768), True), ((768, 768), True), ((1600, 1600), False),
                                       ((50257, 768), False), ((96, 32), False)])
def test_which_gpt2_shapes_nf4_can_store_with_blocks_64_and_256(shape, ok):
    assert nf4_quantizable(shape, 64, 256) is ok


def test_unsplittable_weights_stay_full_precision_with_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="gptlab.model.qlora"):
        model = apply_qlora(GPT(GPTConfig(**TINY)), rank=2, alpha=2)  # default 64 / 256 blocks
    assert qlora_layers(model) == [] and len(list(lora_layers(model))) == 9  # all 8 block linears + head: LoRA
    assert "8 linear weight(s) stay full precision" in caplog.text and "blocks.0.attn.qkv (96, 32)" in caplog.text


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="block_size must be an even integer >= 2.*got 33"):
        tiny_qlora(block_size=33)
    with pytest.raises(ValueError, match="scaler_block_size must be an integer >= 1, got 0"):
        tiny_qlora(scaler_block_size=0)
    with pytest.raises(ValueError, match="unknown QLoRA compute_dtype 'fp8'.*bfloat16"):
        tiny_qlora(compute_dtype="fp8")


def test_missing_torchao_is_an_error_naming_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # how Python marks a module as not importable
    with pytest.raises(ImportError, match=r"pip install 'gptlab\[qlora\]'"):
        apply_qlora(GPT(GPTConfig(**TINY)), rank=2, alpha=2)


def test_importing_torchao_prints_nothing():
    code = "from gptlab.model.qlora import nf4_module; nf4_module()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stderr[-2000:]


def test_compute_dtype_auto_is_bfloat16_only_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tiny_qlora().blocks[0].mlp.fc.compute_dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    layer = tiny_qlora().blocks[0].mlp.fc
    assert layer.compute_dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------- the model
def test_at_init_the_outputs_equal_the_dequantized_base_models():
    model = tiny_qlora()
    x = ids()
    plain = plain_with_weights_of(model)  # a state dict holds the dequantized weights
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
    assert not torch.allclose(model(x), GPT(GPTConfig(**TINY)).eval()(x))  # vs another base: differs


def test_only_the_head_and_embeddings_stay_full_precision():
    model = tiny_qlora()
    assert len(qlora_layers(model)) == 8 and type(model.out_head) is LoRALinear  # LoRA on a full-precision head
    plain = [n for n, p in model.named_parameters() if not is_nf4(p) and ".lora_" not in n]
    assert set(plain) == {"tok_emb.weight", "pos_emb.weight", "final_norm.weight", "final_norm.bias", "out_head.weight"} \
        | {f"blocks.{i}.{m}.{p}" for i in range(2) for m in ("norm1", "norm2") for p in ("weight", "bias")} \
        | {f"blocks.{i}.mlp.{m}.bias" for i in range(2) for m in ("fc", "proj")} \
        | {f"blocks.{i}.attn.proj.bias" for i in range(2)}


def test_gradients_reach_only_the_adapter_and_head_weights():
    task = ClassificationTask(model=TINY, num_classes=2, adapter={"name": "qlora", "rank": 2, "alpha": 2,
                                                                   "train_extra": ["out_head"], **SMALL_BLOCKS})
    x = ids(4, 10)
    loss = nn.functional.cross_entropy(task(x, torch.ones_like(x)), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    with_grad = {n for n, p in task.model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in task.model.named_parameters() if ".lora_" in n or n.startswith("out_head.")}
    assert all(p.grad.abs().sum() > 0 for n, p in task.model.named_parameters() if p.grad is not None and "lora_A" not in n)


def test_a_short_cpu_qlora_classification_fit_lowers_the_loss(tmp_path):
    L.seed_everything(0)
    x = torch.randint(0, 1000, (32, 12))
    y = (x[:, -1] % 2)  # the class is the parity of the last token: learnable from the last position
    batches = [{"input_ids": x[i:i + 8], "attention_mask": torch.ones(8, 12, dtype=torch.long), "label": y[i:i + 8]}
               for i in range(0, 32, 8)]
    task = ClassificationTask(model=TINY, num_classes=2, lr=1e-2, betas=[0.9, 0.95], lr_schedule="constant",
                              adapter={"name": "qlora", "rank": 8, "alpha": 16, "train_extra": ["out_head"],
                                       **SMALL_BLOCKS})
    with torch.no_grad():
        before = [task.compute_loss(b).item() for b in batches]
    codes = {n: m.weight.quantized_data.clone() for n, m in qlora_layers(task.model)}
    trainer = L.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    with torch.no_grad():
        after = [task.compute_loss(b).item() for b in batches]
    assert sum(after) / 4 < 0.7 * sum(before) / 4, (before, after)
    assert all(torch.equal(m.weight.quantized_data, codes[n]) for n, m in qlora_layers(task.model))  # base frozen


def test_an_sft_task_takes_qlora_with_no_task_code():
    from gptlab.tasks.instruct import InstructionTask

    task = InstructionTask(model=TINY, adapter={"name": "qlora", "rank": 2, "alpha": 2, "targets": ["q", "v", "mlp_fc"],
                                                **SMALL_BLOCKS})
    assert [n for n, _ in qlora_layers(task.model)] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc",
                                                         "blocks.1.attn.qkv", "blocks.1.mlp.fc"]
    x = ids(2, 9)
    loss = task.compute_loss({"input_ids": x[:, :-1], "labels": x[:, 1:]})
    loss.backward()
    assert torch.isfinite(loss) and task.trainable_parameter_count() == 2 * (2 * 2 * (32 + 32) + 2 * (32 + 128))


def test_bfloat16_compute_matches_float32_to_bf16_precision():
    base = GPT(GPTConfig(**TINY)).eval()
    model = randomize_lora(apply_qlora(copy.deepcopy(base), rank=4, alpha=4, compute_dtype="float32", **SMALL_BLOCKS))
    bf16 = apply_qlora(copy.deepcopy(base), rank=4, alpha=4, compute_dtype="bfloat16", **SMALL_BLOCKS)
    bf16.load_state_dict(model.state_dict())
    assert bf16.blocks[0].mlp.fc.weight.dtype == torch.bfloat16  # quantized from, and dequantized to, bf16
    x = ids()
    y32, y16 = model(x), bf16(x)
    assert y16.dtype == torch.float32 and not torch.equal(y32, y16)
    assert ((y16 - y32).norm() / y32.norm()).item() < 3e-2  # bf16 keeps ~3 significant digits
    y16.sum().backward()
    assert bf16.blocks[0].mlp.fc.lora_A.grad.dtype == torch.float32  # LoRA weights train in fp32


def test_moves_and_copies_keep_the_very_same_4bit_codes():
    model = tiny_qlora()
    layer = model.blocks[1].mlp.proj
    codes = layer.weight.quantized_data.clone()
    model.to("cpu").to(torch.bfloat16).float()  # a dtype cast must not dequantize the base
    assert is_nf4(layer.weight) and torch.equal(layer.weight.quantized_data, codes)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "lora_A", "lora_B"]
    twin = copy.deepcopy(model)
    assert torch.equal(twin.blocks[1].mlp.proj.weight.get_original_weight(), layer.weight.get_original_weight())
    assert twin.blocks[1].mlp.proj.weight.quantized_data.data_ptr() != layer.weight.quantized_data.data_ptr()


def test_the_base_path_alone_is_the_dequantized_base():
    """What adapters-off means for a QLoRA layer (DPO's reference model): the 4-bit base, no update."""
    model = randomize_lora(tiny_qlora())
    x = ids()
    disable = getattr(lora_module, "disable_lora", None)  # issue 11's context manager, once merged
    if disable is not None:
        with disable(model):
            off = model(x)
    else:
        off = lora_module.remove_lora(copy.deepcopy(model))(x)
    torch.testing.assert_close(off, plain_with_weights_of(model)(x), rtol=0, atol=1e-6)


# ----------------------------------------------------------------- adapters and merging
def test_the_adapter_file_holds_lora_weights_and_settings_not_the_base(tmp_path):
    model = randomize_lora(tiny_qlora(rank=2))
    path = save_adapter(model, tmp_path / "a.safetensors")
    tensors, config = read_adapter(path)
    # per block: q, k, v parts of qkv + attn_proj + mlp_fc + mlp_proj, an A and a B each; + the head's
    assert all(".lora_" in k for k in tensors) and len(tensors) == 2 * 2 * (3 + 3) + 2
    assert config["adapter"] == "qlora" and config["rank"] == 2
    assert config["quantization"] == {"block_size": 32, "scaler_block_size": 8, "compute_dtype": "float32"}


def test_a_qlora_adapter_on_the_full_precision_base_is_requantized_and_reproduces_the_run(tmp_path):
    base = GPT(GPTConfig(**TINY)).eval()
    tuned = randomize_lora(apply_qlora(copy.deepcopy(base), rank=2, alpha=2, **SMALL_BLOCKS))
    path = save_adapter(tuned, tmp_path / "a.safetensors")
    x = ids()
    again = load_qlora_adapter(copy.deepcopy(base), path)
    assert len(qlora_layers(again)) == 8 and torch.equal(again(x), tuned(x))
    unrounded = load_qlora_adapter(copy.deepcopy(base), path, requantize=False)  # LoRA on the original weights
    assert qlora_layers(unrounded) == [] and not torch.allclose(unrounded(x), tuned(x), atol=1e-3)


def test_a_classifier_qlora_adapter_brings_its_head_onto_the_plain_base(tmp_path):
    base = GPT(GPTConfig(**TINY)).eval()
    task = ClassificationTask(model=TINY, num_classes=2, adapter={"name": "qlora", "rank": 2, "alpha": 2,
                                                                   "train_extra": ["out_head"], **SMALL_BLOCKS})
    # the task's base := ``base`` (re-quantized on load), its own 2-class head kept
    task.model.load_state_dict({k: v for k, v in base.state_dict().items() if not k.startswith("out_head")},
                               strict=False)
    randomize_lora(task.model.eval())
    path = task.save_adapter(tmp_path / "a.safetensors")
    again = load_qlora_adapter(copy.deepcopy(base), path)
    x = ids()
    assert again.out_head.out_features == 2 and torch.equal(again(x), task.model(x))


def test_merging_gives_a_full_precision_model_of_the_quantized_run():
    model = randomize_lora(tiny_qlora())
    x = ids()
    quantized_out = model(x)
    merge_lora(model)
    assert not any(is_nf4(p) for p in model.parameters())
    assert all(layer.merged and layer.weight.dtype == torch.float32 for _, layer in qlora_layers(model))
    torch.testing.assert_close(model(x), quantized_out, rtol=0, atol=1e-4)


def test_the_export_state_dict_folds_the_update_into_the_dequantized_base():
    from gptlab.weights import plain_state_dict

    model = randomize_lora(tiny_qlora())
    plain = GPT(GPTConfig(**TINY)).eval()
    plain.load_state_dict(plain_state_dict(model))
    x = ids()
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-4)


# ----------------------------------------------------------------- state dicts, checkpoints, resume
def test_a_state_dict_holds_the_dequantized_base_as_plain_tensors():
    model = tiny_qlora()
    state = model.state_dict()
    assert all(type(v) is torch.Tensor for v in state.values())
    fc = model.blocks[0].mlp.fc
    assert torch.equal(state["blocks.0.mlp.fc.weight"], fc.weight.get_original_weight())
    assert state["blocks.0.mlp.fc.weight"].dtype == torch.float32


def test_loading_the_own_state_dict_keeps_the_very_same_codes_and_scales():
    torch.manual_seed(5)
    model = tiny_qlora()
    torch.manual_seed(5)
    again = tiny_qlora()  # the same base, quantized again: a resumed run
    again.load_state_dict(model.state_dict())
    for (_, a), (_, b) in zip(qlora_layers(model), qlora_layers(again)):
        for part in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
            assert torch.equal(getattr(a.weight, part), getattr(b.weight, part))


def test_loading_another_base_quantizes_it_like_this_layer():
    model = tiny_qlora()
    other = tiny_qlora()  # another random base
    other.load_state_dict(model.state_dict())
    for (_, a), (_, b) in zip(qlora_layers(model), qlora_layers(other)):
        # re-quantizing dequantized weights gives the same 4-bit codes; the double-quantized scales
        # are rounded once more, a drift far below the 4-bit rounding itself
        assert torch.equal(a.weight.quantized_data, b.weight.quantized_data)
        wa, wb = a.weight.get_original_weight(), b.weight.get_original_weight()
        assert (wa - wb).abs().max() < 0.02 * wa.abs().max()


def lm_batches(n: int, T: int = 12) -> torch.utils.data.DataLoader:
    x = torch.randint(0, 50257, (n, 2, T + 1), generator=torch.Generator().manual_seed(7))
    return torch.utils.data.DataLoader([{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in x], batch_size=None)


def qlora_pretrain_task() -> PretrainTask:
    torch.manual_seed(3)
    return PretrainTask(model=TINY, adapter={"name": "qlora", "rank": 2, "alpha": 4, **SMALL_BLOCKS}, lr=1e-2,
                        lr_schedule="constant", sample_prompt=None)


def test_a_qlora_checkpoint_loads_weights_only_and_resumes_to_the_uninterrupted_run(tmp_path):
    def trainer(epochs: int, root, **kw) -> L.Trainer:
        return L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root, num_sanity_val_steps=0, **kw)

    # 2 epochs of 2 batches straight, or 1 epoch, a checkpoint, and resuming for the second
    straight = qlora_pretrain_task()
    trainer(2, tmp_path / "a", enable_checkpointing=False).fit(straight, train_dataloaders=lm_batches(2))

    first = qlora_pretrain_task()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)
    trainer(1, tmp_path / "b", callbacks=[ckpt_cb]).fit(first, train_dataloaders=lm_batches(2))
    ckpt = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)  # plain tensors only
    assert ckpt["hyper_parameters"]["adapter"]["name"] == "qlora"
    assert all(type(v) is torch.Tensor for v in ckpt["state_dict"].values())

    resumed = qlora_pretrain_task()
    trainer(2, tmp_path / "c", enable_checkpointing=False).fit(resumed, train_dataloaders=lm_batches(2),
                                                               ckpt_path=tmp_path / "b" / "last.ckpt")
    assert resumed.trainer.global_step == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        if is_nf4(a):
            assert torch.equal(a.quantized_data, b.quantized_data) and torch.equal(a.quantized_scalers, b.quantized_scalers)
        else:
            assert torch.equal(a, b), name


def test_the_qlora_run_writes_its_adapter_at_the_end(tmp_path):
    task = qlora_pretrain_task()
    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(task, train_dataloaders=lm_batches(1))
    _, config = read_adapter(tmp_path / "checkpoints" / "adapter.safetensors")
    assert config["adapter"] == "qlora" and config["quantization"]["block_size"] == 32


# ----------------------------------------------------------------- the config group and presets
@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_adapter_qlora_builds_a_4bit_classifier_from_the_config(hydra_conf):
    from gptlab.cli.train import build_task

    cfg = compose("train", overrides=["experiment=appE_spam_qlora_cpu"])
    assert (cfg.adapter.name, cfg.adapter.block_size, cfg.adapter.scaler_block_size, cfg.model.emb_dim) == \
        ("qlora", 64, 256, 128)
    task = build_task(cfg)
    assert len(qlora_layers(task.model)) == 8 and not isinstance(task.model.out_head, QLoRALinear)
    assert {n for n, p in task.named_parameters() if p.requires_grad} == \
        {n for n, _ in task.named_parameters() if ".lora_" in n}


def test_the_gpu_preset_is_appendix_e_on_a_4bit_base(hydra_conf):
    cfg = compose("train", overrides=["experiment=appE_spam_qlora"])
    lora = compose("train", overrides=["experiment=appE_spam_lora"])
    assert (cfg.adapter.name, cfg.adapter.compute_dtype, cfg.trainer.precision) == ("qlora", "bfloat16", "bf16-mixed")
    assert {k: v for k, v in cfg.adapter.items() if k in lora.adapter and k != "name"} == \
        {k: v for k, v in lora.adapter.items() if k != "name"}
    assert (cfg.init_from, cfg.task, cfg.data) == (lora.init_from, lora.task, lora.data)


# ----------------------------------------------------------------- inference: the one loader
@pytest.fixture
def trained_qlora_lm(tmp_path):
    """A QLoRA language model "trained" on a saved base (LoRA weights randomized), its adapter file and
    a training checkpoint of it."""
    base_file = tmp_path / "base.pt"
    torch.save(GPT(GPTConfig(**TINY)).state_dict(), base_file)
    task = PretrainTask(model=TINY, init_from=str(base_file), sample_prompt=None,
                        adapter={"name": "qlora", "rank": 2, "alpha": 4, **SMALL_BLOCKS})
    randomize_lora(task.model.eval())
    adapter = task.save_adapter(tmp_path / "adapter.safetensors")
    trainer = L.Trainer(max_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "task.ckpt")
    return task.model, base_file, adapter, tmp_path / "task.ckpt"


def test_the_loader_puts_a_qlora_adapter_on_its_requantized_base_and_merges_it(trained_qlora_lm):
    from gptlab.inference import load_model

    tuned, base_file, adapter, _ = trained_qlora_lm
    x = ids()
    merged = load_model(init_from=str(base_file), adapter_path=str(adapter)).model
    assert not any(is_nf4(p) for p in merged.parameters()) and all(l.merged for _, l in lora_layers(merged))
    torch.testing.assert_close(merged(x), tuned(x), rtol=0, atol=1e-4)
    four_bit = load_model(init_from=str(base_file), adapter_path=str(adapter), merge=False).model
    assert len(qlora_layers(four_bit)) == 8 and torch.equal(four_bit(x), tuned(x))


def test_the_loader_folds_a_qlora_checkpoint_into_its_stored_base_exactly(trained_qlora_lm):
    from gptlab.inference import load_model
    from gptlab.weights.checkpoint import load_backbone

    tuned, _, _, ckpt = trained_qlora_lm
    x = ids()
    loaded = load_model(ckpt_path=str(ckpt)).model
    assert not any(is_nf4(p) for p in loaded.parameters())
    torch.testing.assert_close(loaded(x), tuned(x), rtol=0, atol=1e-5)
    folded = load_backbone(ckpt).eval()  # init_from=<a QLoRA checkpoint>: a plain GPT, LoRA folded in
    assert type(folded.blocks[0].mlp.fc) is nn.Linear
    torch.testing.assert_close(folded(x), tuned(x), rtol=0, atol=1e-5)
    four_bit = load_model(ckpt_path=str(ckpt), merge=False).model  # re-quantized: same codes, scales rounded again
    assert len(qlora_layers(four_bit)) == 8
    torch.testing.assert_close(four_bit(x), tuned(x), rtol=0, atol=0.05)
