"""GPT-2 weights in and out, exactly: OpenAI's checkpoints (Hugging Face layout), the book's
``GPTModel`` state dicts, gptlab state dicts and Lightning checkpoints.

    model = load_pretrained("gpt2-small")                    # fetched once into the cache
    model = load_pretrained("path/to/hf_folder", drop_rate=0.0, context_length=256)
    model = load_pretrained("gpt2-small-124M.pth", n_heads=12)   # the book's own state dict
    export_hf(model, "out/")                                 # GPT2LMHeadModel.from_pretrained("out/")

Names map by the explicit tables below. Hugging Face's GPT-2 uses ``Conv1D`` layers whose weights
are stored (in, out), so those four matrices are transposed for our ``nn.Linear`` (out, in). The
book keeps separate W_query / W_key / W_value; they are concatenated into our fused ``attn.qkv``
(rows q | k | v).

Memory: tensors are read one at a time (safetensors: straight from the file into fresh memory;
``.pt``: ``torch.load(mmap=True)``), the model is built on the ``meta`` device and the tensors are
assigned, not copied, so loading gpt2-xl needs about its own size in RAM, not twice it
(``experiments/pretrained_memory``).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from gptlab.model.config import _ALIASES, PRESETS, GPTConfig
from gptlab.model.gpt import GPT

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- names and tables
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

_HF_KEY = re.compile(r"^(?:transformer\.)?h\.(\d+)\.(.+)$")
_BOOK_KEY = re.compile(r"^trf_blocks\.(\d+)\.(.+)$")
_NATIVE_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_CHUNK_BYTES = 16 << 20  # buffer for transposing while reading: big enough for few syscalls, small enough not to matter
_CONFIG_FIELDS = {f.name for f in fields(GPTConfig)}
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


# --------------------------------------------------------------------------- reading tensors lazily
class SafetensorsReader:
    """Tensors of one or more ``.safetensors`` files, read on demand with plain file reads.

    ``safe_open`` hands out memory-mapped tensors; the pages it touches stay in this process's
    resident set until the file is closed, so transposing every Conv1D matrix on the way in would
    hold the file *and* the copies (2x). Reading each tensor straight into its final memory (a
    transposed one through a 16 MiB buffer) keeps the peak at the model's size. The format is an 8-byte header length, a JSON header
    ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes.
    """

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, files: Iterable[str | Path]):
        self._index: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self._buf: torch.Tensor | None = None
        for path in map(Path, files):
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path} is not a valid safetensors file ({e})") from e
            header.pop("__metadata__", None)
            for key, info in header.items():
                if info["dtype"] not in self.DTYPES:
                    raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
                start, end = info["data_offsets"]
                self._index[key] = (path, self.DTYPES[info["dtype"]], tuple(info["shape"]),
                                    8 + n + start, 8 + n + end)

    def keys(self) -> list[str]:
        return list(self._index)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key][2]

    def get(self, key: str, transpose: bool = False) -> torch.Tensor:
        """The tensor ``key`` in fresh memory; ``transpose``: a 2-D tensor comes back transposed
        (and contiguous), assembled through a small reused buffer instead of a full-size copy."""
        path, dtype, shape, start, end = self._index[key]
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            if not transpose:
                buf = torch.empty(end - start, dtype=torch.uint8)
                self._read(f, memoryview(buf.numpy()), path, key)
                return buf.view(dtype).reshape(shape)
            rows, cols = shape
            out = torch.empty(cols, rows, dtype=dtype)
            row_bytes = cols * dtype.itemsize
            step = max(1, _CHUNK_BYTES // row_bytes)
            if self._buf is None or self._buf.numel() < min(step, rows) * row_bytes:
                self._buf = torch.empty(max(_CHUNK_BYTES, row_bytes), dtype=torch.uint8)  # reused: no heap churn
            buf = self._buf
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                self._read(f, memoryview(buf.numpy())[: n * row_bytes], path, key)
                out[:, r0:r0 + n] = buf[: n * row_bytes].view(dtype).view(n, cols).t()
            return out

    @staticmethod
    def _read(f: Any, view: memoryview, path: Path, key: str) -> None:
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{path} is truncated (tensor {key!r})")
            got += n


class MappingReader:
    """Tensors of an in-memory (or ``torch.load(mmap=True)``-mapped) state dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def get(self, key: str, transpose: bool = False) -> torch.Tensor:
        t = self._t[key]
        return t.t().contiguous() if transpose else t


Reader = SafetensorsReader | MappingReader


@dataclass
class _Entry:
    """One gptlab tensor: its shape, and how to produce it from the source (called once)."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def torch_load(path: str | Path) -> Any:
    """``torch.load`` memory-mapped and weights-only where the file allows; a legacy (non-zip) file
    is read normally, a gptlab/Lightning checkpoint with non-tensor objects fully unpickled (it
    is the user's own file, as ``gptlab.tasks.load_task`` reads it)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


# --------------------------------------------------------------------------- mapping to gptlab names
def _block_keys(keys: Iterable[str], pattern: re.Pattern[str]) -> dict[tuple[int, str], str]:
    return {(int(m[1]), m[2]): k for k in keys if (m := pattern.match(k))}


def _hf_entries(r: Reader, source: str) -> tuple[dict[str, _Entry], bool]:
    """gptlab entries of a Hugging Face GPT-2 state dict; also whether it holds ``lm_head.weight``."""
    out: dict[str, _Entry] = {}
    unknown = []
    for key in r.keys():
        m = _HF_KEY.match(key)
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
    blocks = _block_keys(r.keys(), _BOOK_KEY)
    unknown = [k for k in r.keys() if not _BOOK_KEY.match(k) and k not in BOOK_TOP]
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
                         "gptlab.tasks.load_task and merge_lora, or export the merged model first")
    return out


def _detect(keys: list[str]) -> str:
    if any(_HF_KEY.match(k) for k in keys) or any(k.removeprefix("transformer.") == "wte.weight" for k in keys):
        return "hf"
    if any(k.startswith("trf_blocks.") for k in keys):
        return "book"
    if "tok_emb.weight" in keys or any(k.replace("_orig_mod.", "").startswith("blocks.") for k in keys):
        return "native"
    raise ValueError(f"unrecognised weights (first keys: {keys[:4]}); expected Hugging Face GPT-2 "
                     "(h.N.attn.c_attn...), the book's GPTModel (trf_blocks.N...) or gptlab (blocks.N...)")


# --------------------------------------------------------------------------- configs
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


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of a GPT2LMHeadModel with ``config``'s shape."""
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
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": config.tie_weights,
        "torch_dtype": "float32",
    }


def _preset_for(emb_dim: int, n_layers: int | None = None) -> str | None:
    """The preset whose shape has this width (and depth, when given)."""
    for name, p in PRESETS.items():
        if p["emb_dim"] == emb_dim and (n_layers is None or p["n_layers"] == n_layers):
            return name
    return None


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
        preset = _preset_for(d)
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
        cfg["name"] = _preset_for(d, len(layers)) or "custom"
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


def _load_state(reader: Reader, source: str, hints: Mapping[str, Any], overrides: Mapping[str, Any],
                dtype: torch.dtype | None, kind: str | None = None) -> GPT:
    """Map ``reader``'s tensors to gptlab names, work out the config, build the model."""
    kind = kind or _detect(reader.keys())
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
    config_path = folder / "config.json"
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        reader: Reader = SafetensorsReader([folder / "model.safetensors"])
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        reader = SafetensorsReader([folder / s for s in shards])
    elif (folder / "pytorch_model.bin").is_file():
        reader = MappingReader(torch_load(folder / "pytorch_model.bin"))
    else:
        raise FileNotFoundError(f"{folder} holds no model.safetensors (or model.safetensors.index.json, "
                                f"pytorch_model.bin); files there: {sorted(p.name for p in folder.iterdir())}")
    hints: dict[str, Any] = {}
    if config_path.is_file():
        hints = config_from_hf(json.loads(config_path.read_text()), str(config_path))
    kind = _detect(reader.keys())
    if kind == "hf" and not hints:
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face GPT-2 folder needs its config.json")
    return _load_state(reader, source, hints, overrides, dtype, kind)


def _lightning_checkpoint(ckpt: Mapping[str, Any], path: Path, overrides: Mapping[str, Any],
                          dtype: torch.dtype | None) -> GPT:
    """The backbone of a gptlab Lightning checkpoint (state-dict keys under ``model.``)."""
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise ValueError(f"{path} is a Lightning checkpoint without 'model.*' weights; not a gptlab checkpoint")
    if any(".lora_A" in k or ".lora_B" in k for k in state):
        return _merged_lora_backbone(path, overrides, dtype)
    hints = dict(ckpt.get("gptlab_model_config") or {})
    hp = ckpt.get("hyper_parameters") or {}
    if not hints and hp.get("model") and not hp.get("init_from"):
        hints = GPTConfig.from_dict(dict(hp["model"])).to_dict()
    return _load_state(MappingReader(state), str(path), hints, overrides, dtype, kind="native")


def _merged_lora_backbone(path: Path, overrides: Mapping[str, Any], dtype: torch.dtype | None) -> GPT:
    """A LoRA-trained checkpoint: rebuild its task, fold the adapter into the weights."""
    from gptlab.tasks.base import load_task

    model = load_task(str(path)).model
    sd = plain_state_dict(model)
    return _load_state(MappingReader(sd), str(path), model.config.to_dict(), overrides, dtype, kind="native")


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype | None = torch.float32,
                    **overrides: Any) -> GPT:
    """A :class:`GPT` with pretrained weights, in train mode (call ``.eval()`` for inference).

    ``name_or_path``:
      * ``gpt2-small|gpt2-medium|gpt2-large|gpt2-xl`` (aliases ``gpt2``, ``124M``, ``355M``, ``774M``,
        ``1558M``, or the ``openai-community/...`` repo id): OpenAI's GPT-2, fetched once into the
        cache by :func:`gptlab.data.download.fetch_hf_model`;
      * a Hugging Face GPT-2 folder (``config.json`` + ``model.safetensors``), or one ``.safetensors``
        file (a ``config.json`` beside it is read when present);
      * a ``.pt``/``.pth``/``.bin`` state dict in the book's ``GPTModel`` naming, in gptlab's naming,
        or in Hugging Face's (a ``{"model_state_dict": ...}`` wrapper as the book saves it is fine);
      * a gptlab Lightning checkpoint (``.ckpt``): its backbone (LoRA merged in), not the task.

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
            return _load_state(SafetensorsReader([path]), source, hints, overrides, dtype)
        if path.suffix in _TORCH_SUFFIXES:
            obj = torch_load(path)
            if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
                return _lightning_checkpoint(obj, path, overrides, dtype)
            if isinstance(obj, Mapping) and isinstance(obj.get("model_state_dict"), Mapping):
                obj = obj["model_state_dict"]
            if not isinstance(obj, Mapping):
                raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
            return _load_state(MappingReader(obj), source, {}, overrides, dtype)
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected a folder, .safetensors "
                         f"or one of {list(_TORCH_SUFFIXES)}")
    preset = resolve_pretrained_name(str(name_or_path))
    if preset is None:
        raise FileNotFoundError(f"{name_or_path!r} is neither an existing file or folder ({path.resolve()} "
                                f"does not exist) nor a pretrained model name; valid names: {pretrained_names()}")
    from gptlab.data.download import fetch_hf_model

    folder = fetch_hf_model(HF_REPOS[preset])
    return _hf_folder(folder, {"name": preset, **overrides}, dtype, f"{preset} ({folder})")


# --------------------------------------------------------------------------- going back out
def plain_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The backbone's state dict with any LoRA update folded into its base weight (the model is
    not modified) and the LoRA factors left out: what a model without LoRA would hold."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_A" not in k and ".lora_B" not in k}
    from gptlab.model.lora import lora_layers

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
        m = _NATIVE_KEY.match(name)
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
        m = _NATIVE_KEY.match(name)
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


def export_hf(model: GPT, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 folder ``transformers.GPT2LMHeadModel.from_pretrained``
    and ``AutoTokenizer`` read: ``config.json``, ``model.safetensors`` (``dtype``: cast, e.g. to
    float16; default the model's), ``generation_config.json`` and the GPT-2 tokenizer
    (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``).
    Returns ``out_dir``."""
    import shutil

    from safetensors.torch import save_file

    from gptlab.tokenizer import ASSETS, EOT_ID, EOT_TOKEN

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config_to_hf(model.config)
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json", {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID})
    for hf_name, ours in TOKENIZER_FILES.items():
        shutil.copyfile(ASSETS / ours, out / hf_name)
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model.config.context_length,
        "add_prefix_space": False, "errors": "replace", **special,
        "added_tokens_decoder": {str(EOT_ID): {"content": EOT_TOKEN, "lstrip": False, "normalized": True,
                                               "rstrip": False, "single_word": False, "special": True}},
    })
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


__all__ = ["HF_REPOS", "HF_TOP", "HF_BLOCK", "HF_CONV1D", "BOOK_TOP", "BOOK_BLOCK", "BOOK_QKV",
           "load_pretrained", "export_hf", "to_hf_state_dict", "to_book_state_dict", "save_book_state_dict",
           "plain_state_dict", "config_from_hf", "config_to_hf", "pretrained_names",
           "resolve_pretrained_name", "SafetensorsReader", "torch_load"]
