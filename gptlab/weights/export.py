"""GPT-2 weights out of gptlab: Hugging Face ``GPT2LMHeadModel`` folders and the book's
``GPTModel`` state dicts (LoRA folded in, padded vocabulary rows cut off)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import lora_layers, save_safetensors
from gptlab.tokenizer import ASSETS, EOT_TOKEN, get_tokenizer, hf_vocab_and_merges, tokenizer_info
from gptlab.weights.formats import (BOOK_BLOCK, BOOK_QKV, BOOK_TOP, HF_BLOCK, HF_CONV1D, HF_HEAD, HF_TOP,
                                    NATIVE_KEY, config_to_hf)


def plain_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The backbone's state dict with any LoRA update folded into its base weight (the model is
    not modified) and the LoRA factors left out: what a model without LoRA would hold."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_A" not in k and ".lora_B" not in k}
    for name, layer in lora_layers(model):
        if not layer.merged:
            with torch.no_grad():
                base = sd[f"{name}.weight"]  # a plain tensor also for a 4-bit QLoRA base (its dequantized weight)
                sd[f"{name}.weight"] = base + layer.delta_weight().to(base.dtype)
    return sd


def _lm_state(model: GPT) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and plain state dict of a language model; the padded vocab rows are cut off."""
    c = model.config
    if model.out_head.out_features not in (c.vocab_size, c.padded_vocab_size):
        raise ValueError(f"the model's head has {model.out_head.out_features} outputs, not a language-model "
                         f"head over {c.vocab_size} tokens (a classifier?); only language models export")
    sd = plain_state_dict(model)
    for key in ("tok_emb.weight", "out_head.weight"):
        sd[key] = sd[key][: c.vocab_size]
    return c, sd


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Hugging Face ``GPT2LMHeadModel`` tensors (``transformer.`` names, Conv1D layout, contiguous,
    no shared memory); ``lm_head.weight`` only when the head is not tied. Models without q/k/v
    biases get zero ones (GPT-2 always has them)."""
    c, sd = _lm_state(model)
    top = {v: k for k, v in HF_TOP.items()}
    block = {v: k for k, v in HF_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name == "out_head.weight":
            if not c.tie_weights:
                out[HF_HEAD] = t.detach().clone(memory_format=torch.contiguous_format)
            continue
        m = NATIVE_KEY.match(name)
        hf = f"h.{m[1]}.{block[m[2]]}" if m else top[name]
        t = t.detach().t() if m and block[m[2]] in HF_CONV1D else t.detach()
        out[f"transformer.{hf}"] = t.clone(memory_format=torch.contiguous_format)
    if not c.qkv_bias:
        ref = sd["tok_emb.weight"]
        for i in range(c.n_layers):
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * c.emb_dim, dtype=ref.dtype)
    return out


def to_book_state_dict(model: GPT, include_mask: bool = True) -> dict[str, torch.Tensor]:
    """The state dict the book's ``GPTModel`` of this shape would have (``W_query/W_key/W_value``
    split from our fused q|k|v, ``scale``/``shift`` norms, ``out_head.weight`` always present).
    ``include_mask``: add the ``att.mask`` buffers the book registers, so its strict
    ``load_state_dict`` accepts the result."""
    c, sd = _lm_state(model)
    top = {v: k for k, v in BOOK_TOP.items()}
    block = {v: k for k, v in BOOK_BLOCK.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        t = t.detach().clone()
        m = NATIVE_KEY.match(name)
        if not m:
            out[top[name]] = t
        elif m[2].startswith("attn.qkv."):
            suffix = m[2].rsplit(".", 1)[1]
            for part, chunk in zip(BOOK_QKV, t.split(c.emb_dim, dim=0)):
                out[f"trf_blocks.{m[1]}.{part}.{suffix}"] = chunk.clone()
        else:
            out[f"trf_blocks.{m[1]}.{block[m[2]]}"] = t
    if include_mask:
        mask = torch.triu(torch.ones(c.context_length, c.context_length), diagonal=1)
        for i in range(c.n_layers):
            out[f"trf_blocks.{i}.att.mask"] = mask.clone()
    return out


def save_book_state_dict(model: GPT, path: str | Path) -> Path:
    """``torch.save`` :func:`to_book_state_dict` to ``path``; the book's ``GPTModel`` (or
    :func:`load_pretrained`) reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_book_state_dict(model), path)
    return path


TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
"""Hugging Face tokenizer file -> the same file shipped in ``gptlab/assets``."""


def export_hf(model: GPT, out_dir: str | Path, dtype: torch.dtype | None = None, tokenizer: Any = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder ``transformers.GPT2LMHeadModel.from_pretrained``
    and ``AutoTokenizer`` read: ``config.json``, ``model.safetensors`` (``dtype``: cast, e.g. to
    float16; default the model's), ``generation_config.json`` and its tokenizer (``tokenizer``, a
    ``tiktoken.Encoding``; None = GPT-2's) as byte-level BPE files (``vocab.json``, ``merges.txt``,
    ``tokenizer_config.json``, ``special_tokens_map.json``). Returns ``out_dir``."""
    tok = tokenizer or get_tokenizer()
    eot = tok.eot_token
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    hf_config = config_to_hf(model.config, eos_token_id=eot)
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
    if tokenizer_info(tok).is_gpt2:
        for hf_name, ours in TOKENIZER_FILES.items():
            shutil.copyfile(ASSETS / ours, out / hf_name)
    else:  # a trained tokenizer: the same byte-level BPE in Hugging Face's two files
        vocab, merges = hf_vocab_and_merges(tok)
        _write_json(out / "vocab.json", vocab)
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.context_length,
        "add_prefix_space": False, "errors": "replace", **special,
        "added_tokens_decoder": {str(eot): {"content": EOT_TOKEN, "lstrip": False, "normalized": True,
                                               "rstrip": False, "single_word": False, "special": True}},
    })
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


