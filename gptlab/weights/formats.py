"""GPT-2 checkpoint formats: the name tables that map OpenAI's Hugging Face layout and the book's
``GPTModel`` onto gptlab's backbone, config translation, and the pretrained names gptlab can fetch.

Hugging Face's GPT-2 uses ``Conv1D`` layers whose weights are stored (in, out), so those four
matrices are transposed for our ``nn.Linear`` (out, in). The book keeps separate W_query / W_key /
W_value; they are concatenated into our fused ``attn.qkv`` (rows q | k | v).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from gptlab.model.config import _ALIASES, PRESETS, GPTConfig

HF_REPOS: dict[str, str] = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
"""Pretrained preset -> Hugging Face Hub repository holding OpenAI's weights."""

# Hugging Face GPT-2 (inside ``transformer.``, which some files omit) -> gptlab.
HF_TOP: dict[str, str] = {
    "wte.weight": "tok_emb.weight",
    "wpe.weight": "pos_emb.weight",
    "ln_f.weight": "final_norm.weight",
    "ln_f.bias": "final_norm.bias",
}
HF_BLOCK: dict[str, str] = {  # below ``h.{i}.`` -> below ``blocks.{i}.``
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.c_attn.weight": "attn.qkv.weight",
    "attn.c_attn.bias": "attn.qkv.bias",
    "attn.c_proj.weight": "attn.proj.weight",
    "attn.c_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.c_fc.weight": "mlp.fc.weight",
    "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight",
    "mlp.c_proj.bias": "mlp.proj.bias",
}
HF_CONV1D = frozenset({"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"})
"""Conv1D weights, stored (in, out): transposed on the way in and out."""
HF_BUFFERS = frozenset({"attn.bias", "attn.masked_bias"})
"""Causal-mask buffers some GPT-2 files carry; not weights."""
HF_HEAD = "lm_head.weight"

# The book's GPTModel (chapter 4) -> gptlab.
BOOK_TOP: dict[str, str] = {
    "tok_emb.weight": "tok_emb.weight",
    "pos_emb.weight": "pos_emb.weight",
    "final_norm.scale": "final_norm.weight",
    "final_norm.shift": "final_norm.bias",
    "out_head.weight": "out_head.weight",
}
BOOK_BLOCK: dict[str, str] = {  # below ``trf_blocks.{i}.`` -> below ``blocks.{i}.``
    "norm1.scale": "norm1.weight",
    "norm1.shift": "norm1.bias",
    "att.out_proj.weight": "attn.proj.weight",
    "att.out_proj.bias": "attn.proj.bias",
    "norm2.scale": "norm2.weight",
    "norm2.shift": "norm2.bias",
    "ff.layers.0.weight": "mlp.fc.weight",
    "ff.layers.0.bias": "mlp.fc.bias",
    "ff.layers.2.weight": "mlp.proj.weight",
    "ff.layers.2.bias": "mlp.proj.bias",
}
BOOK_QKV = ("att.W_query", "att.W_key", "att.W_value")
"""Three nn.Linear layers in the book; their rows stack (q | k | v) into our fused ``attn.qkv``."""
BOOK_BUFFERS = frozenset({"att.mask"})

HF_KEY = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
BOOK_KEY = re.compile(r"^trf_blocks\.(\d+)\.(.+)$")
NATIVE_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation, as ours


def pretrained_names() -> list[str]:
    """Every name :func:`load_pretrained` fetches by itself (presets, aliases, Hub repo ids)."""
    aliases = [a for a, k in _ALIASES.items() if k in HF_REPOS]
    return sorted(HF_REPOS) + aliases + sorted(HF_REPOS.values())


def resolve_pretrained_name(name: str) -> str | None:
    """The preset (``gpt2-small`` ...) that ``name`` stands for, or None if it is not one."""
    key = _ALIASES.get(name, name)
    if key in HF_REPOS:
        return key
    return next((k for k, repo in HF_REPOS.items() if repo == name), None)


def detect_format(keys: list[str]) -> str:
    """``hf``, ``book`` or ``native`` (gptlab's own names) from a state dict's keys; ValueError otherwise."""
    if any(HF_KEY.match(k) for k in keys) or any(k.removeprefix("transformer.") == "wte.weight" for k in keys):
        return "hf"
    if any(k.startswith("trf_blocks.") for k in keys):
        return "book"
    if "tok_emb.weight" in keys or any(k.replace("_orig_mod.", "").startswith("blocks.") for k in keys):
        return "native"
    raise ValueError(f"unrecognised weights (first keys: {keys[:4]}); expected Hugging Face GPT-2 "
                     "(h.N.attn.c_attn...), the book's GPTModel (trf_blocks.N...) or gptlab (blocks.N...)")


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """GPTConfig fields of a Hugging Face GPT-2 ``config.json``; raises on features gptlab lacks."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"{source}: activation_function {act!r} is not supported; gptlab uses the tanh "
                         f"GELU ({' / '.join(_HF_ACTIVATIONS)})")
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                    ("add_cross_attention", False)):
        if bool(hf.get(key, ok)) != ok:
            raise ValueError(f"{source}: {key}={hf[key]} is not supported by gptlab's GPT")
    missing = [k for k in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"{source}: GPT-2 config lacks {missing}")
    d, inner = hf["n_embd"], hf.get("n_inner")
    if inner and inner % d:
        raise ValueError(f"{source}: n_inner={inner} is not a multiple of n_embd={d}")
    return dict(vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=d,
                n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=hf.get("resid_pdrop", 0.1),
                mlp_ratio=inner // d if inner else 4, ln_eps=hf.get("layer_norm_epsilon", 1e-5),
                tie_weights=bool(hf.get("tie_word_embeddings", True)))


def config_to_hf(config: GPTConfig, eos_token_id: int = 50256) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a GPT2LMHeadModel with ``config``'s shape; ``eos_token_id``:
    the tokenizer's ``<|endoftext|>`` (also the BOS, as in GPT-2)."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.emb_dim,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": None if config.mlp_ratio == 4 else config.mlp_ratio * config.emb_dim,
        "activation_function": "gelu_new",
        "resid_pdrop": config.drop_rate,
        "embd_pdrop": config.drop_rate,
        "attn_pdrop": config.drop_rate,
        "layer_norm_epsilon": config.ln_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "tie_word_embeddings": config.tie_weights,
        "torch_dtype": "float32",
    }


def preset_for(emb_dim: int, n_layers: int | None = None) -> str | None:
    """The preset whose shape has this width (and depth, when given)."""
    for name, p in PRESETS.items():
        if p["emb_dim"] == emb_dim and (n_layers is None or p["n_layers"] == n_layers):
            return name
    return None


__all__ = ["HF_REPOS", "HF_TOP", "HF_BLOCK", "HF_CONV1D", "HF_BUFFERS", "HF_HEAD", "BOOK_TOP", "BOOK_BLOCK",
           "BOOK_QKV", "BOOK_BUFFERS", "HF_KEY", "BOOK_KEY", "NATIVE_KEY", "pretrained_names",
           "resolve_pretrained_name", "detect_format", "config_from_hf", "config_to_hf", "preset_for"]
