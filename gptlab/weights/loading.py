"""``load_pretrained``: GPT-2 weights from OpenAI (fetched once), Hugging Face folders and
safetensors files, the book's ``GPTModel`` state dicts and gptlab state dicts, mapped by the
tables in :mod:`gptlab.weights.formats` onto a :class:`~gptlab.model.gpt.GPT`, exactly.

    model = load_pretrained("gpt2-small")                    # fetched once into the cache
    model = load_pretrained("path/to/hf_folder", drop_rate=0.0, context_length=256)
    model = load_pretrained("gpt2-small-124M.pth", n_heads=12)   # the book's own state dict

The model is built on the ``meta`` device and the tensors are assigned, not copied, so loading
needs about the model's own size in RAM (``experiments/pretrained_memory``). gptlab's training
checkpoints (``.ckpt``) hold a task, not just weights: ``gptlab.weights.checkpoint.load_backbone``
reads those (and everything this reads).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from gptlab.model.config import PRESETS, GPTConfig
from gptlab.model.gpt import GPT
from gptlab.weights.download import fetch_hf_model
from gptlab.weights.formats import (BOOK_BLOCK, BOOK_BUFFERS, BOOK_KEY, BOOK_QKV, BOOK_TOP, HF_BLOCK, HF_BUFFERS,
                                    HF_CONV1D, HF_HEAD, HF_KEY, HF_REPOS, HF_TOP, config_from_hf, detect_format,
                                    pretrained_names, preset_for, resolve_pretrained_name)
from gptlab.weights.readers import MappingReader, Reader, SafetensorsReader, safe_torch_load

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_CONFIG_FIELDS = {f.name for f in fields(GPTConfig)}


class TrainingCheckpointError(ValueError):
    """``load_pretrained`` was given a gptlab training checkpoint (read it with ``load_backbone``)."""


@dataclass
class _Entry:
    """One gptlab tensor: its shape, and how to produce it from the source (called once)."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


# --------------------------------------------------------------------------- mapping to gptlab names
def _block_keys(keys: Iterable[str], pattern: re.Pattern[str]) -> dict[tuple[int, str], str]:
    return {(int(m[1]), m[2]): k for k in keys if (m := pattern.match(k))}


def _hf_entries(r: Reader, source: str) -> tuple[dict[str, _Entry], bool]:
    """gptlab entries of a Hugging Face GPT-2 state dict; also whether it holds ``lm_head.weight``."""
    out: dict[str, _Entry] = {}
    unknown = []
    for key in r.keys():
        m = HF_KEY.match(key)
        if m:
            i, rest = int(m[1]), m[2]
            if rest in HF_BUFFERS:
                continue
            if rest not in HF_BLOCK:
                unknown.append(key)
                continue
            name, shape = f"blocks.{i}.{HF_BLOCK[rest]}", r.shape(key)
            if rest in HF_CONV1D:
                out[name] = _Entry(shape[::-1], lambda k=key: r.get(k, transpose=True))
            else:
                out[name] = _Entry(shape, lambda k=key: r.get(k))
            continue
        top = key.removeprefix("transformer.")
        if top in HF_TOP:
            out[HF_TOP[top]] = _Entry(r.shape(key), lambda k=key: r.get(k))
        elif key == HF_HEAD:
            out["out_head.weight"] = _Entry(r.shape(key), lambda k=key: r.get(k))
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unexpected GPT-2 tensor(s) {unknown[:5]} (is this a GPT2LMHeadModel?)")
    return out, HF_HEAD in r.keys()


def _book_entries(r: Reader, source: str) -> dict[str, _Entry]:
    """gptlab entries of a state dict in the book's ``GPTModel`` naming (q, k, v fused)."""
    out: dict[str, _Entry] = {}
    blocks = _block_keys(r.keys(), BOOK_KEY)
    unknown = [k for k in r.keys() if not BOOK_KEY.match(k) and k not in BOOK_TOP]
    for key in r.keys():
        if key in BOOK_TOP:
            out[BOOK_TOP[key]] = _Entry(r.shape(key), lambda k=key: r.get(k))
    for (i, rest), key in blocks.items():
        if rest in BOOK_BLOCK:
            out[f"blocks.{i}.{BOOK_BLOCK[rest]}"] = _Entry(r.shape(key), lambda k=key: r.get(k))
        elif rest.rsplit(".", 1)[0] not in BOOK_QKV and rest not in BOOK_BUFFERS:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: unexpected tensor(s) for the book's GPTModel: {unknown[:5]}")
    for i in sorted({i for i, _ in blocks}):
        for suffix in ("weight", "bias"):
            parts = [blocks.get((i, f"{p}.{suffix}")) for p in BOOK_QKV]
            if not any(parts):
                continue
            if not all(parts):
                raise ValueError(f"{source}: block {i} has only some of W_query/W_key/W_value .{suffix}")
            rows = sum(r.shape(k)[0] for k in parts)
            shape = (rows, *r.shape(parts[0])[1:])
            out[f"blocks.{i}.attn.qkv.{suffix}"] = _Entry(
                shape, lambda ks=tuple(parts): torch.cat([r.get(k) for k in ks], dim=0))
    return out


def _native_entries(r: Reader, source: str) -> dict[str, _Entry]:
    """gptlab entries of a gptlab state dict (``torch.compile``'s ``_orig_mod.`` prefix dropped)."""
    out = {k.replace("_orig_mod.", ""): _Entry(r.shape(k), lambda k=k: r.get(k)) for k in r.keys()}
    lora = [k for k in out if ".lora_A" in k or ".lora_B" in k]
    if lora:
        raise ValueError(f"{source} holds LoRA weights ({lora[0]}, ...); load it with "
                         "gptlab.weights.checkpoint.load_backbone (it merges LoRA), or export the merged model first")
    return out



def _infer_config(entries: Mapping[str, _Entry], hints: Mapping[str, Any], overrides: Mapping[str, Any],
                  source: str) -> dict[str, Any]:
    """GPTConfig fields from tensor shapes; ``hints`` (a config file) fill what shapes cannot say,
    ``overrides`` win where they may. Raises a clear error for an override the weights contradict."""
    for key in ("tok_emb.weight", "pos_emb.weight", "blocks.0.mlp.fc.weight"):
        if key not in entries:
            raise ValueError(f"{source}: no tensor for {key!r}; found {sorted(entries)[:6]} ...")
    rows, d = entries["tok_emb.weight"].shape
    layers = sorted({int(k.split(".")[1]) for k in entries if k.startswith("blocks.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"{source}: transformer blocks {layers} are not numbered 0..{len(layers) - 1}")
    shape = dict(emb_dim=d, n_layers=len(layers), context_length=entries["pos_emb.weight"].shape[0],
                 mlp_ratio=entries["blocks.0.mlp.fc.weight"].shape[0] // d,
                 qkv_bias="blocks.0.attn.qkv.bias" in entries)
    cfg: dict[str, Any] = {"vocab_size": rows, **{k: v for k, v in hints.items() if k in _CONFIG_FIELDS}, **shape}
    if cfg["vocab_size"] > rows or GPTConfig(**{**cfg, "n_heads": 1}).padded_vocab_size != rows:
        cfg.update(vocab_size=rows, pad_vocab_multiple=1)  # rows are the truth when a hint disagrees
    if cfg.get("n_heads") is None:
        preset = preset_for(d)
        if "n_heads" in overrides:
            cfg["n_heads"] = overrides["n_heads"]
        elif preset is not None:
            cfg["n_heads"] = PRESETS[preset]["n_heads"]
            log.info("%s: n_heads=%d taken from preset %s (emb_dim=%d)", source, cfg["n_heads"], preset, d)
        else:
            raise ValueError(f"{source}: the number of attention heads cannot be read from the weights "
                             f"(emb_dim={d} matches no preset); pass n_heads=... (load_pretrained(path, n_heads=...), "
                             f"or n_heads=... on the gptlab-export / gptlab-eval command line)")
    unknown = sorted(set(overrides) - _CONFIG_FIELDS)
    if unknown:
        raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid fields: {sorted(_CONFIG_FIELDS)}")
    fixed = ("vocab_size", "emb_dim", "n_layers", "mlp_ratio", "n_heads")
    for key, value in overrides.items():
        have = cfg.get(key)
        if key in fixed and value != have:
            raise ValueError(f"{source} has {key}={have}; it cannot be overridden to {value} (shapes are "
                             f"fixed by the weights)")
        if key == "context_length" and value > have:
            raise ValueError(f"{source} has {have} learned positions; context_length={value} is longer")
        if key == "qkv_bias" and have and not value:
            raise ValueError(f"{source} has q/k/v biases; qkv_bias=False would drop them")
        if key == "tie_weights" and value and not cfg.get("tie_weights"):
            raise ValueError(f"{source} has an output head separate from the token embedding; "
                             "tie_weights=True would drop it")
    cfg.update(overrides)
    if "name" not in overrides and cfg.get("name", "custom") == "custom":
        cfg["name"] = preset_for(d, len(layers)) or "custom"
    return cfg


# --------------------------------------------------------------------------- building the model
def _build(entries: dict[str, _Entry], config: GPTConfig, source: str, dtype: torch.dtype | None,
           head_tied_in_file: bool) -> GPT:
    """Instantiate ``config`` on the meta device and assign the tensors of ``entries`` (consumed).

    ``head_tied_in_file``: the source's head is its token embedding (a stored copy is dropped).
    """
    with torch.device("meta"):
        model = GPT(config)
    want = model.state_dict()  # meta tensors: names and shapes only
    V, D, ctx = config.padded_vocab_size, config.emb_dim, config.context_length

    def fetch(name: str) -> torch.Tensor:
        t = entries.pop(name).load()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def pad_rows(t: torch.Tensor) -> torch.Tensor:  # vocab rows -> padded_vocab_size (zeros; sliced off)
        return t if t.size(0) == V else torch.cat([t, t.new_zeros(V - t.size(0), *t.shape[1:])])

    sd: dict[str, torch.Tensor] = {}
    tok = fetch("tok_emb.weight")
    head = entries.get("out_head.weight")
    if head is not None and head.shape[0] not in (tok.size(0), config.vocab_size, V):
        raise ValueError(f"{source}: out_head has {head.shape[0]} rows, not a language-model head over "
                         f"{tok.size(0)} tokens (a classifier checkpoint?)")
    if head is not None:
        head_t = fetch("out_head.weight")
        tied = head_tied_in_file
        sd["out_head.weight"] = None if tied else pad_rows(head_t)
    else:
        tied = True
    if config.tie_weights and not tied:
        raise ValueError(f"{source}: out_head differs from tok_emb, so tie_weights=True cannot hold")
    sd["tok_emb.weight"] = pad_rows(tok[: config.vocab_size] if tok.size(0) > V else tok)
    if sd.get("out_head.weight") is None:  # tied in the file; untie by copying if the config says so
        sd["out_head.weight"] = sd["tok_emb.weight"] if config.tie_weights else sd["tok_emb.weight"].clone()
    pos = fetch("pos_emb.weight")
    sd["pos_emb.weight"] = pos[:ctx].clone() if pos.size(0) > ctx else pos
    for name in list(entries):
        if name not in want:
            raise ValueError(f"{source}: tensor {name!r} has no place in a GPT with {config}")
        sd[name] = fetch(name)
    if config.qkv_bias:  # a checkpoint without q/k/v biases loaded with qkv_bias=True: zero biases
        for i in range(config.n_layers):
            sd.setdefault(f"blocks.{i}.attn.qkv.bias", torch.zeros(3 * D, dtype=sd["tok_emb.weight"].dtype))
    missing = [k for k in want if k not in sd]
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}")
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
             for k in want if tuple(sd[k].shape) != tuple(want[k].shape)]
    if wrong:
        raise ValueError(f"{source}: shape mismatch: {wrong[:5]}")
    model.load_state_dict(sd, strict=True, assign=True)
    if config.tie_weights:  # assign=True replaced both parameters: share them again
        model.out_head.weight = model.tok_emb.weight
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: tensors left on the meta device after loading: {left[:5]}")
    return model


def load_from_reader(reader: Reader, source: str, hints: Mapping[str, Any] | None = None,
                     overrides: Mapping[str, Any] | None = None, dtype: torch.dtype | None = torch.float32,
                     kind: str | None = None) -> GPT:
    """Map ``reader``'s tensors to gptlab names, work out the config, build the model.

    ``source`` names the weights in errors; ``hints``: GPTConfig fields the tensors cannot tell
    (e.g. from a ``config.json``); ``overrides``: fields the caller sets (checked against the
    weights); ``kind``: ``hf``, ``book`` or ``native``, detected from the names when None."""
    hints, overrides = dict(hints or {}), dict(overrides or {})
    kind = kind or detect_format(reader.keys())
    if kind == "hf":
        entries, has_head = _hf_entries(reader, source)
        tied = bool(hints.get("tie_weights", True)) or not has_head
        if tied:  # HF ties lm_head to wte: a stored lm_head is ignored
            entries.pop("out_head.weight", None)
        hints = {**hints, "tie_weights": tied}
    else:
        entries = _book_entries(reader, source) if kind == "book" else _native_entries(reader, source)
        head = entries.get("out_head.weight")
        if "tok_emb.weight" not in entries and head is not None:
            # safetensors' save_model keeps one name of a tied pair, possibly the head's
            entries["tok_emb.weight"], head = entries.pop("out_head.weight"), None
        if head is None:
            hints = {**hints, "tie_weights": True}
        elif "tie_weights" not in hints:
            # the book (and a plain state dict) stores the head even when it equals the embedding:
            # compare once, and keep the loaded tensors so nothing is read twice
            tok_t, head_t = entries["tok_emb.weight"].load(), head.load()
            entries["tok_emb.weight"] = _Entry(tuple(tok_t.shape), lambda t=tok_t: t)
            entries["out_head.weight"] = _Entry(tuple(head_t.shape), lambda t=head_t: t)
            hints = {**hints, "tie_weights": tok_t.shape == head_t.shape and torch.equal(tok_t, head_t)}
    head_tied = bool(hints["tie_weights"])
    cfg = GPTConfig(**_infer_config(entries, hints, overrides, source))
    model = _build(entries, cfg, source, dtype, head_tied)
    log.info("loaded %s (%s format): %s", source, kind, cfg)
    return model



def _hf_folder(folder: Path, overrides: Mapping[str, Any], dtype: torch.dtype | None, source: str) -> GPT:
    """A Hugging Face GPT-2 folder: ``config.json`` + ``model.safetensors`` (OpenAI's four GPT-2
    sizes are each one such file on the Hub; sharded and ``pytorch_model.bin`` folders are not read)."""
    weights, config_path = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} holds no model.safetensors; files there: "
                                f"{sorted(p.name for p in folder.iterdir())}")
    reader = SafetensorsReader([weights])
    hints: dict[str, Any] = {}
    if config_path.is_file():
        hints = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    kind = detect_format(reader.keys())
    if kind == "hf" and not hints:
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face GPT-2 folder needs its config.json")
    return load_from_reader(reader, source, hints, overrides, dtype, kind)


def load_state_dict_object(obj: Any, source: str, overrides: Mapping[str, Any] | None = None,
                           dtype: torch.dtype | None = torch.float32) -> GPT:
    """A :class:`GPT` from an already loaded state dict (book, gptlab or Hugging Face names; a
    ``{"model_state_dict": ...}`` wrapper as the book saves it is unwrapped). A training checkpoint
    raises :class:`TrainingCheckpointError`."""
    if is_training_checkpoint(obj):
        raise TrainingCheckpointError(
            f"{source} is a gptlab training checkpoint, not plain weights: read it with "
            "gptlab.weights.checkpoint.load_backbone (init_from= and ckpt_path= on the command line do)")
    if isinstance(obj, Mapping) and isinstance(obj.get("model_state_dict"), Mapping):
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
    return load_from_reader(MappingReader(obj), source, {}, overrides, dtype)


def is_training_checkpoint(obj: Any) -> bool:
    """Whether a loaded ``.ckpt``/``.pt`` object is a Lightning training checkpoint (a task's state)."""
    return isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype | None = torch.float32,
                    **overrides: Any) -> GPT:
    """A :class:`GPT` with pretrained weights, in train mode (call ``.eval()`` for inference).

    ``name_or_path``:
      * ``gpt2-small|gpt2-medium|gpt2-large|gpt2-xl`` (aliases ``gpt2``, ``124M``, ``355M``, ``774M``,
        ``1558M``, or the ``openai-community/...`` repo id): OpenAI's GPT-2, fetched once into the
        cache by :func:`gptlab.weights.download.fetch_hf_model`;
      * a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``), or one ``.safetensors``
        file (a ``config.json`` beside it is read when present);
      * a ``.pt``/``.pth``/``.bin`` state dict in the book's ``GPTModel`` naming, in gptlab's naming,
        or in Hugging Face's (a ``{"model_state_dict": ...}`` wrapper as the book saves it is fine),
        read with ``torch.load(weights_only=True)``: a file that would run code is refused.

    A gptlab training checkpoint (``.ckpt``) raises :class:`TrainingCheckpointError`: its backbone
    depends on the task (heads, adapters), so ``gptlab.weights.checkpoint.load_backbone`` reads it.

    ``overrides``: GPTConfig fields applied on top of what the weights say, e.g. ``drop_rate=0.0``,
    ``context_length=256`` (the position table is cut), ``tie_weights=False`` (the head becomes a
    copy), ``pad_vocab_multiple=64``, ``n_heads=...`` (required for book/gptlab state dicts whose
    width matches no preset). Shape fields that contradict the weights raise ValueError.
    ``dtype``: cast floating tensors to it (default float32; None keeps the file's dtype).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        source = str(path)
        if path.is_dir():
            return _hf_folder(path, overrides, dtype, source)
        if path.suffix == ".safetensors":
            cfg_file = path.with_name("config.json")
            hints = config_from_hf(json.loads(cfg_file.read_text()), str(cfg_file)) if cfg_file.is_file() else {}
            return load_from_reader(SafetensorsReader([path]), source, hints, overrides, dtype)
        if path.suffix in TORCH_SUFFIXES:
            return load_state_dict_object(safe_torch_load(path), source, overrides, dtype)
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected a folder, .safetensors "
                         f"or one of {list(TORCH_SUFFIXES)}")
    preset = resolve_pretrained_name(str(name_or_path))
    if preset is None:
        raise FileNotFoundError(f"{name_or_path!r} is neither an existing file or folder ({path.resolve()} "
                                f"does not exist) nor a pretrained model name; valid names: {pretrained_names()}")
    folder = fetch_hf_model(HF_REPOS[preset])
    return _hf_folder(folder, {"name": preset, **overrides}, dtype, f"{preset} ({folder})")


__all__ = ["load_pretrained", "load_from_reader", "load_state_dict_object", "is_training_checkpoint", "TrainingCheckpointError",
           "TORCH_SUFFIXES"]
