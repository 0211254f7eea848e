"""Pretrained weights in and out are exact: Hugging Face GPT-2, the book's GPTModel, gptlab
checkpoints. Every model here is a tiny random one created in the test; nothing is downloaded."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from gptlab.model.config import GPTConfig
from gptlab.model.generation import generate
from gptlab.model.gpt import GPT
from gptlab.weights import (HF_REPOS, SafetensorsReader, export_hf, load_pretrained, pretrained_names,
                            save_book_state_dict, to_book_state_dict, to_hf_state_dict)
from gptlab.weights.book_reference import GPTModel as BookGPTModel
from gptlab.weights.checkpoint import load_backbone

transformers = pytest.importorskip("transformers")

# Two shapes: tied head, 4 heads, 50,257 ids; untied head, 3 heads, narrower MLP (n_inner), small vocab.
HF_SHAPES = {
    "tied": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=50257, n_positions=128),
    "untied": dict(n_embd=48, n_layer=3, n_head=3, vocab_size=1000, n_positions=96, n_inner=96,
                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on a busy machine OpenMP spin-waits cost ~0.2 s a call."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_hf(folder, drop: float = 0.0, **shape) -> "transformers.GPT2LMHeadModel":
    """A random GPT2LMHeadModel saved with ``save_pretrained`` into ``folder``; returned in eval mode."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop, initializer_range=0.1,
                                  **shape)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # HF zero-inits biases and LayerNorms; random values test the mapping better
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(params=sorted(HF_SHAPES))
def hf_pair(request, tmp_path):
    """(HF model, its folder, shape) for each shape."""
    shape = HF_SHAPES[request.param]
    folder = tmp_path / "hf"
    return make_hf(folder, **shape), folder, shape


def ids(vocab: int, shape=(2, 17)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(7))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- Hugging Face in
@torch.no_grad()
def test_hf_folder_gives_the_same_logits(hf_pair):
    hf, folder, shape = hf_pair
    model = load_pretrained(folder).eval()
    c = model.config
    assert (c.emb_dim, c.n_layers, c.n_heads, c.vocab_size, c.context_length) == (
        shape["n_embd"], shape["n_layer"], shape["n_head"], shape["vocab_size"], shape["n_positions"])
    assert c.qkv_bias and c.tie_weights == shape.get("tie_word_embeddings", True)
    x = ids(c.vocab_size)
    assert max_diff(model(x), hf(x).logits) < 1e-4


@torch.no_grad()
def test_hf_greedy_generation_matches(hf_pair):
    hf, folder, shape = hf_pair
    model = load_pretrained(folder).eval()
    prompt = ids(shape["vocab_size"], (1, 6))
    ref = prompt
    for _ in range(12):  # greedy on HF's logits, no cache
        ref = torch.cat([ref, hf(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, prompt, 12, use_kv_cache=True), ref)
    assert torch.equal(generate(model, prompt, 12, use_kv_cache=False), ref)


@torch.no_grad()
def test_dropout_in_the_config_is_inactive_in_eval_mode(tmp_path):
    hf = make_hf(tmp_path, drop=0.3, **HF_SHAPES["tied"])
    model = load_pretrained(tmp_path).eval()
    assert model.config.drop_rate == 0.3
    x = ids(50257)
    assert max_diff(model(x), hf(x).logits) < 1e-4


def test_a_single_safetensors_file_with_config_beside_it_loads(hf_pair):
    hf, folder, _ = hf_pair
    a = load_pretrained(folder / "model.safetensors")
    b = load_pretrained(folder)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_keys_without_the_transformer_prefix_load_too(tmp_path):
    """OpenAI's files on the Hub name tensors ``h.0.attn.c_attn.weight`` (no ``transformer.``) and
    carry ``attn.bias`` mask buffers."""
    from safetensors.torch import load_file, save_file

    hf = make_hf(tmp_path / "a", **HF_SHAPES["tied"])
    sd = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "a" / "model.safetensors").items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    (tmp_path / "b").mkdir()
    save_file(sd, tmp_path / "b" / "model.safetensors")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    x = ids(50257)
    with torch.no_grad():
        assert max_diff(load_pretrained(tmp_path / "b").eval()(x), hf(x).logits) < 1e-4


def test_conv1d_weights_are_transposed(hf_pair):
    hf, folder, _ = hf_pair
    model = load_pretrained(folder)
    assert torch.equal(model.blocks[0].attn.qkv.weight, hf.transformer.h[0].attn.c_attn.weight.T)
    assert torch.equal(model.blocks[1].mlp.fc.weight, hf.transformer.h[1].mlp.c_fc.weight.T)


def test_loading_builds_on_meta_and_leaves_no_meta_tensor(hf_pair):
    _, folder, shape = hf_pair
    model = load_pretrained(folder)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in model.parameters())
    assert (model.out_head.weight is model.tok_emb.weight) == shape.get("tie_word_embeddings", True)
    assert model.training  # like any fresh module; callers pick eval()


def test_init_from_reads_what_load_pretrained_reads(hf_pair):
    """``init_from=`` (tasks' ``load_backbone``) and ``gptlab.load_pretrained`` give the same model."""
    _, folder, _ = hf_pair
    a, b = load_backbone(str(folder), drop_rate=0.0), load_pretrained(folder, drop_rate=0.0)
    assert a.config == b.config
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- overrides
@torch.no_grad()
def test_overrides_drop_rate_and_a_shorter_context_apply(tmp_path):
    hf = make_hf(tmp_path, drop=0.1, **HF_SHAPES["tied"])
    model = load_pretrained(tmp_path, drop_rate=0.0, context_length=32).eval()
    assert model.config.drop_rate == 0.0 and model.config.context_length == 32
    assert model.pos_emb.weight.shape == (32, 64)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    x = ids(50257, (2, 32))
    assert max_diff(model(x), hf(x).logits) < 1e-4
    with pytest.raises(ValueError, match="context_length"):
        model(ids(50257, (1, 33)))


@torch.no_grad()
def test_untying_and_padding_the_vocab_keep_the_logits(tmp_path):
    hf = make_hf(tmp_path, **HF_SHAPES["tied"])
    model = load_pretrained(tmp_path, tie_weights=False, pad_vocab_multiple=64).eval()
    assert model.tok_emb.weight.shape[0] == 50304 and model.out_head.weight is not model.tok_emb.weight
    x = ids(50257)
    assert max_diff(model(x), hf(x).logits) < 1e-4


@pytest.mark.parametrize("override, match", [(dict(emb_dim=128), "emb_dim"), (dict(n_heads=8), "n_heads"),
                                             (dict(context_length=256), "128 learned positions"),
                                             (dict(n_hedas=2), "unknown GPTConfig field")])
def test_overrides_that_contradict_the_weights_raise(tmp_path, override, match):
    make_hf(tmp_path, **HF_SHAPES["tied"])
    with pytest.raises(ValueError, match=match):
        load_pretrained(tmp_path, **override)


def test_tying_an_untied_checkpoint_is_refused(tmp_path):
    make_hf(tmp_path, **HF_SHAPES["untied"])
    with pytest.raises(ValueError, match="tie_weights=True"):
        load_pretrained(tmp_path, tie_weights=True)


def test_dtype_casts_or_keeps(hf_pair):
    _, folder, _ = hf_pair
    assert load_pretrained(folder, dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16
    assert load_pretrained(folder, dtype=None).tok_emb.weight.dtype == torch.float32


# --------------------------------------------------------------------------- names, errors
def test_unknown_name_lists_the_valid_choices():
    with pytest.raises(FileNotFoundError) as e:
        load_pretrained("gpt3-small")
    assert "gpt2-small" in str(e.value) and "124M" in str(e.value) and "gpt3-small" in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_pretrained(tmp_path / "nothere.safetensors")


def test_a_folder_without_weights_says_what_it_expected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_every_gpt2_size_and_alias_is_a_pretrained_name():
    names = pretrained_names()
    for n in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2", "124M", "355M", "774M", "1558M",
              "openai-community/gpt2"):
        assert n in names
    assert HF_REPOS["gpt2-xl"] == "openai-community/gpt2-xl"


@pytest.mark.parametrize("name", ["gpt2", "124M", "gpt2-small", "openai-community/gpt2"])
def test_a_preset_name_loads_from_the_cache_without_network(tmp_path, monkeypatch, name):
    import gptlab.weights.download as dl

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    make_hf(tmp_path / "hf" / "openai-community--gpt2", **HF_SHAPES["tied"])

    def no_network(*a, **k):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(dl.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(dl, "_hub_download", lambda: no_network)
    model = load_pretrained(name)
    assert model.config.name == "gpt2-small" and model.config.emb_dim == 64


def test_non_gpt2_configs_are_refused(tmp_path):
    make_hf(tmp_path, **HF_SHAPES["tied"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function"):
        load_pretrained(tmp_path)


# --------------------------------------------------------------------------- export to Hugging Face
@torch.no_grad()
@pytest.mark.parametrize("qkv_bias, tie", [(True, True), (False, False)])
def test_export_hf_reloads_in_transformers_with_the_same_logits(tmp_path, qkv_bias, tie):
    model = GPT(GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                          drop_rate=0.2, qkv_bias=qkv_bias, tie_weights=tie)).eval()
    out = export_hf(model, tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = ids(50257)
    assert max_diff(hf(x).logits, model(x)) < 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert cfg["tie_word_embeddings"] is tie and cfg["activation_function"] == "gelu_new"
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"], cfg["n_ctx"]) == (32, 2, 4, 64, 64)
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    if not qkv_bias:
        assert torch.count_nonzero(hf.transformer.h[0].attn.c_attn.bias) == 0


def test_export_writes_the_tokenizer_files_and_transformers_reads_them(tmp_path):
    out = export_hf(GPT(GPTConfig.from_name("gpt2-tiny")), tmp_path)
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    from gptlab.tokenizer import get_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Every effort moves you, 12 times: <|endoftext|> ünïcödé"
    assert tok(text)["input_ids"] == get_tokenizer().encode(text, allowed_special="all")
    assert tok.eos_token_id == 50256


def test_export_uses_hf_names_and_conv1d_layout(tmp_path):
    model = GPT(GPTConfig.from_name("gpt2-tiny", tie_weights=True))
    sd = to_hf_state_dict(model)
    assert "lm_head.weight" not in sd and "transformer.wte.weight" in sd
    assert torch.equal(sd["transformer.h.1.mlp.c_fc.weight"], model.blocks[1].mlp.fc.weight.T)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
    assert "lm_head.weight" in to_hf_state_dict(GPT(GPTConfig.from_name("gpt2-tiny", tie_weights=False)))


@torch.no_grad()
def test_a_padded_vocab_exports_only_the_real_rows(tmp_path):
    model = GPT(GPTConfig.from_name("gpt2-tiny", pad_vocab_multiple=64)).eval()
    assert model.tok_emb.weight.shape[0] == 50304
    reader = SafetensorsReader([export_hf(model, tmp_path) / "model.safetensors"])
    assert reader.shape("transformer.wte.weight") == (50257, 32)
    assert reader.shape("lm_head.weight") == (50257, 32)
    x = ids(50257)
    back = load_pretrained(tmp_path).eval()
    assert back.config.vocab_size == 50257 and max_diff(back(x), model(x)) < 1e-5


@torch.no_grad()
def test_export_folds_lora_into_the_weights(tmp_path):
    from gptlab.model.lora import apply_lora

    model = GPT(GPTConfig.from_name("gpt2-tiny")).eval()
    apply_lora(model, rank=2, alpha=4, targets=["q", "v", "mlp_fc"])
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_()
    x = ids(50257)
    want = model(x)
    back = load_pretrained(export_hf(model, tmp_path)).eval()
    assert max_diff(back(x), want) < 1e-4


def test_a_classifier_head_does_not_export(tmp_path):
    model = GPT(GPTConfig.from_name("gpt2-tiny"))
    model.out_head = nn.Linear(32, 2, bias=False)
    with pytest.raises(ValueError, match="classifier"):
        export_hf(model, tmp_path)


# --------------------------------------------------------------------------- the book's GPTModel
BOOK_SHAPES = {
    "book-defaults": dict(vocab_size=50257, context_length=64, emb_dim=768 // 12, n_heads=4, n_layers=2,
                          drop_rate=0.1, qkv_bias=False),
    "gpt2-like": dict(vocab_size=700, context_length=40, emb_dim=48, n_heads=6, n_layers=3, drop_rate=0.0,
                      qkv_bias=True),
}


def randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return model


@torch.no_grad()
@pytest.mark.parametrize("shape", sorted(BOOK_SHAPES))
def test_the_books_model_and_gptlab_agree_after_loading_its_state_dict(tmp_path, shape):
    cfg = BOOK_SHAPES[shape]
    book = randomize(BookGPTModel(cfg)).eval()
    torch.save(book.state_dict(), tmp_path / "book.pth")
    model = load_pretrained(tmp_path / "book.pth", n_heads=cfg["n_heads"]).eval()
    c = model.config
    assert (c.vocab_size, c.context_length, c.emb_dim, c.n_layers, c.qkv_bias, c.tie_weights) == (
        cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"], cfg["qkv_bias"], False)
    x = ids(cfg["vocab_size"])
    assert max_diff(model(x), book(x)) < 1e-4
    # and back: gptlab -> book naming -> the book's model, strictly
    book2 = BookGPTModel(cfg).eval()
    book2.load_state_dict(to_book_state_dict(model), strict=True)
    assert max_diff(book2(x), book(x)) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("qkv_bias, tie", [(False, False), (True, True)])
def test_book_state_dict_round_trip_is_identical(tmp_path, qkv_bias, tie):
    model = GPT(GPTConfig.from_name("gpt2-tiny", qkv_bias=qkv_bias, tie_weights=tie, drop_rate=0.1)).eval()
    path = save_book_state_dict(model, tmp_path / "book.pth")
    back = load_pretrained(path, n_heads=4, drop_rate=0.1).eval()
    assert back.config == model.config.__class__(**{**model.config.to_dict(), "name": back.config.name})
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert (back.out_head.weight is back.tok_emb.weight) == tie  # tying detected from equal tensors
    x = ids(50257)
    assert torch.equal(back(x), model(x))


def test_the_books_model_and_optimizer_checkpoint_loads(tmp_path):
    """Chapter 5 saves ``{"model_state_dict": ..., "optimizer_state_dict": ...}``."""
    book = randomize(BookGPTModel(BOOK_SHAPES["gpt2-like"]))
    opt = torch.optim.AdamW(book.parameters())
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": opt.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    assert load_pretrained(tmp_path / "model_and_optimizer.pth", n_heads=6).config.n_layers == 3


def test_book_heads_come_from_the_preset_of_the_same_width(tmp_path):
    book = BookGPTModel(dict(BOOK_SHAPES["gpt2-like"], emb_dim=192, n_heads=6))
    torch.save(book.state_dict(), tmp_path / "book.pth")
    assert load_pretrained(tmp_path / "book.pth").config.n_heads == 6  # gpt2-mini has emb_dim 192


def test_book_heads_that_cannot_be_inferred_ask_for_n_heads(tmp_path):
    torch.save(BookGPTModel(BOOK_SHAPES["gpt2-like"]).state_dict(), tmp_path / "book.pth")
    with pytest.raises(ValueError, match=r"pass n_heads=\.\.\."):
        load_pretrained(tmp_path / "book.pth")


# --------------------------------------------------------------------------- gptlab checkpoints
@torch.no_grad()
def test_gptlab_lightning_checkpoint_gives_its_backbone(tmp_path):
    config = GPTConfig.from_name("gpt2-tiny", tie_weights=True, qkv_bias=True, drop_rate=0.25)
    model = GPT(config).eval()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"model": {"name": "gpt2-tiny", "tie_weights": True, "qkv_bias": True,
                                           "drop_rate": 0.25}, "init_from": None, "lr": 1e-3},
            "gptlab_task": "gptlab.tasks.pretrain.PretrainTask", "gptlab_model_config": config.to_dict(),
            "pytorch-lightning_version": "2.6.0", "global_step": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    back = load_backbone(tmp_path / "last.ckpt").eval()
    assert back.config == config and back.out_head.weight is back.tok_emb.weight
    x = ids(50257)
    assert torch.equal(back(x), model(x))
    assert load_backbone(tmp_path / "last.ckpt", drop_rate=0.0).config.drop_rate == 0.0
    with pytest.raises(ValueError, match="training checkpoint.*load_backbone"):
        load_pretrained(tmp_path / "last.ckpt")  # weights/ reads weights; a task's checkpoint is read by tasks/


def test_gptlab_state_dict_as_safetensors_loads(tmp_path):
    from safetensors.torch import save_model

    model = GPT(GPTConfig.from_name("gpt2-mini"))
    save_model(model, str(tmp_path / "w.safetensors"))  # drops the tied duplicate
    back = load_pretrained(tmp_path / "w.safetensors")
    assert back.config.n_heads == 6 and back.config.tie_weights
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_gpt2_small_shapes_map_without_allocating(tmp_path):
    """The full-size mapping (names, shapes) on the meta device: 12 blocks, 124M parameters."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2-small", qkv_bias=True, tie_weights=True))
        sd = to_hf_state_dict(model)
    assert sd["transformer.h.11.attn.c_attn.weight"].shape == (768, 2304)
    assert math.isclose(sum(t.numel() for t in sd.values()) / 1e6, 124.44, abs_tol=0.01)
