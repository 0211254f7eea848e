"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): LoRA on a frozen base stored in 4-bit NormalFloat.

Each frozen base weight of a LoRA layer is quantized with torchao's ``NF4Tensor`` (the quantizer
torchtune's QLoRA uses): blocks of ``block_size`` weights share one absmax scale and every weight
becomes the nearest of 16 NormalFloat levels (4 bits); the scales are quantized again ("double
quantization") to int8 in blocks of ``scaler_block_size``, with one float factor per such block.
Stored per weight: 0.5 byte + 1/block_size byte (+ a float per block_size * scaler_block_size), so a
GPT-2 block linear takes ~0.13x its fp32 bytes. The forward pass dequantizes the weight to
``compute_dtype`` for the matmul and keeps only the 4-bit form for backward; the LoRA A/B stay in
their own (full) precision and are the only weights that train.

    apply_qlora(model, rank=16, alpha=16, block_size=64, scaler_block_size=256)
    save_adapter(model, path)          # gptlab.model.lora: the same adapter file as LoRA's (+ settings)
    load_qlora_adapter(base, path)     # re-quantizes base like training did, then loads the adapter
    merge_lora(model)                  # dequantizes each base weight, then folds the update in

Embeddings, norms, biases and the output/task head stay full precision; a linear whose shape the
quantizer cannot split into blocks stays a full-precision LoRA layer (logged). Checkpoints hold
plain tensors: a state dict stores each quantized weight dequantized, in the original dtype, and
loading such a state dict re-quantizes it (keeping the current 4-bit weight when the stored one is
exactly its dequantization, so a resumed run continues on the very same base).

torchao is an optional dependency: ``pip install 'gptlab[qlora]'``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from gptlab.checks import Predicate, Problem, check_node, choice, integer, is_int
from gptlab.model.lora import (APPLY_KEYS, LORA_RULES, TARGETS, LoRALinear, adopt_adapter_head, apply_lora,
                               load_adapter, lora_layers, read_adapter)

log = logging.getLogger(__name__)

NF4_MODULE = "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``compute_dtype`` values: the dtype the 4-bit weights are dequantized to for the frozen matmuls.
``auto``: bfloat16 when CUDA is available (QLoRA's choice; float16 is numerically fragile there),
else float32 (CPU matmuls in bfloat16 are slower than in float32 on most CPUs)."""
QUANT_KEYS = ("block_size", "scaler_block_size", "compute_dtype")
"""The settings an adapter file carries, under ``quantization``, to re-quantize a base like training did."""
_HEADS = ("out_head",)  # task or LM heads: never quantized (small, or untiled like the 50,257-row LM head)


def _even_block(v: Any) -> bool:
    return is_int(v) and v >= 2 and v % 2 == 0


QLORA_RULES = {**LORA_RULES, "block_size": Predicate(_even_block, "an even integer >= 2 (two 4-bit codes per byte; "
                                                                  "QLoRA uses 64)"),
               "scaler_block_size": integer(ge=1, note="QLoRA uses 256"), "compute_dtype": choice(*COMPUTE_DTYPES)}
"""The rule of every QLoRA setting (the ``apply_qlora`` arguments, the ``adapter=qlora`` config node)."""


def check_qlora_config(node: Mapping[str, Any]) -> list[Problem]:
    """Every problem of a QLoRA config node (:data:`QLORA_RULES`); builds nothing."""
    return check_node(node, QLORA_RULES)


def nf4_module() -> ModuleType:
    """torchao's NF4 module (``to_nf4``, ``linear_nf4``, ``NF4Tensor``), imported quietly.

    torchao's import logs a "Failed to load ..." line per CUDA kernel library it cannot load on a
    CPU-only machine, and torch warns about one of its enums; neither concerns NF4, which is pure
    PyTorch, so both are silenced for this import only. Raises ImportError naming the extra when
    torchao is missing.
    """
    if sys.modules.get(NF4_MODULE) is not None:
        return sys.modules[NF4_MODULE]
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            # (by name: ``torchao.quantization.quantize_`` is also a function, which shadows the package)
            nf4 = importlib.import_module(NF4_MODULE)
    except ImportError as e:
        raise ImportError(f"adapter=qlora needs torchao's NF4 quantizer ({NF4_MODULE}, torchao >= 0.18): "
                          f"pip install 'gptlab[qlora]' ({e})") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return nf4


def is_nf4(t: Any) -> bool:
    """True for a torchao ``NF4Tensor`` (without importing torchao: none can exist before it is)."""
    nf4 = sys.modules.get(NF4_MODULE)
    return nf4 is not None and isinstance(t, nf4.NF4Tensor)


def resolve_compute_dtype(compute_dtype: str | torch.dtype) -> torch.dtype:
    """``auto`` -> bfloat16 on a CUDA machine, else float32; a name from :data:`COMPUTE_DTYPES` -> its dtype."""
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown QLoRA compute_dtype {compute_dtype!r}; valid choices: {list(COMPUTE_DTYPES)}")
    if compute_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return COMPUTE_DTYPES[compute_dtype]


def nf4_quantizable(shape: Sequence[int], block_size: int = 64, scaler_block_size: int = 256) -> bool:
    """Whether torchao can store a weight of ``shape`` in NF4 with these blocks: its element count
    splits into ``block_size`` blocks, and their number into ``scaler_block_size`` groups."""
    numel = 1
    for n in shape:
        numel *= int(n)
    return len(shape) <= 2 and numel % block_size == 0 and (numel // block_size) % scaler_block_size == 0


def nf4_nbytes(t: torch.Tensor) -> int:
    """Bytes a weight really occupies: the packed 4-bit codes, int8 scales, their float factors, the
    mean and the 16-level table for an NF4 weight; ``numel * element_size`` for a plain one."""
    if not is_nf4(t):
        return t.numel() * t.element_size()
    inner, _ = t.__tensor_flatten__()
    return sum(getattr(t, name).numel() * getattr(t, name).element_size() for name in inner)


def clone_nf4(t: torch.Tensor) -> torch.Tensor:
    """An exact copy of an NF4 weight (its codes, scales and factors cloned, nothing re-quantized)."""
    nf4 = nf4_module()
    inner, _ = t.__tensor_flatten__()
    return nf4.NF4Tensor(*nf4.construct_nf4_args(t, {name: getattr(t, name).clone() for name in inner}))


def _check_blocks(block_size: int, scaler_block_size: int) -> None:
    if not _even_block(block_size):
        raise ValueError(f"QLoRA block_size must be an even integer >= 2 (two 4-bit codes per byte), "
                         f"got {block_size!r}; QLoRA uses 64")
    if not QLORA_RULES["scaler_block_size"].ok(scaler_block_size):
        raise ValueError(f"QLoRA scaler_block_size must be an integer >= 1, got {scaler_block_size!r}; QLoRA uses 256")


class QLoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose frozen base weight is stored in 4-bit NF4 (double-quantized scales).

    The layer keeps LoRALinear's parameter names, forward (``F.linear`` on an NF4 weight runs torchao's
    ``linear_nf4``: dequantize, matmul, and for backward only the 4-bit weight is kept) and adapter
    state; only the base weight's storage changes. The base matmul runs in ``compute_dtype``.
    :meth:`merge` turns the base back into a full-precision weight (the dequantized one) first;
    ``remove_lora`` leaves a plain ``nn.Linear`` holding the 4-bit weight (the quantized base model).

    Args:
        base: the linear layer (or a LoRALinear, whose A/B are then adopted) whose weight is quantized.
        rank, alpha, dropout, scaling, parts: as :class:`LoRALinear` (ignored when ``base`` is one).
        block_size, scaler_block_size: NF4 block sizes (see :func:`nf4_quantizable`).
        compute_dtype: dtype the weight is dequantized to and the frozen matmul runs in.
    """

    def __init__(self, base: nn.Linear, rank: int = 16, alpha: float = 16, dropout: float = 0.0,
                 scaling: str = "rank", parts: Mapping[str, tuple[int, int]] | None = None, *,
                 block_size: int = 64, scaler_block_size: int = 256,
                 compute_dtype: str | torch.dtype = "auto"):
        _check_blocks(block_size, scaler_block_size)
        adopted = base if isinstance(base, LoRALinear) else None
        if adopted is not None:
            if adopted.merged:
                raise ValueError("cannot quantize a merged LoRA layer; unmerge it first")
            rank, alpha, scaling, parts = adopted.rank, adopted.alpha, adopted.scaling, adopted.parts
            dropout = getattr(adopted.lora_dropout, "p", 0.0)
        # adopting: the A/B built here are replaced at once, so their init must not consume the RNG
        # (a QLoRA run then draws the same random numbers as the LoRA run of the same seed)
        with torch.random.fork_rng(devices=[]) if adopted is not None else contextlib.nullcontext():
            super().__init__(base, rank, alpha, dropout, scaling, parts)
        if adopted is not None:  # the same A/B objects: their init, requires_grad and optimizer identity stay
            self.lora_A, self.lora_B = adopted.lora_A, adopted.lora_B
        if not nf4_quantizable(self.weight.shape, block_size, scaler_block_size):
            raise ValueError(f"a {tuple(self.weight.shape)} weight cannot be stored in NF4 with block_size="
                             f"{block_size}, scaler_block_size={scaler_block_size}: its size must split into "
                             f"blocks and their number into scaler blocks")
        self.block_size, self.scaler_block_size = block_size, scaler_block_size
        self.compute_dtype = resolve_compute_dtype(compute_dtype)
        self.base_dtype = self.weight.dtype  # what a state dict and a merge give back
        w = self.weight.detach().to(self.compute_dtype).contiguous()
        self.weight = nn.Parameter(nf4_module().to_nf4(w, block_size, scaler_block_size), requires_grad=False)

    @property
    def quantized(self) -> bool:
        """True while the base weight is stored in NF4 (False after :meth:`merge` / :meth:`dequantize_base`)."""
        return is_nf4(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as a plain tensor in its original dtype (what the 4-bit codes stand for)."""
        w = self.weight
        return w.get_original_weight().to(self.base_dtype) if is_nf4(w) else w.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype
        if not self.quantized or x.dtype == cd or cd == torch.float32:
            # float32 compute (or activations already in compute_dtype): the NF4 weight is
            # dequantized to the activations' dtype; under bf16-mixed autocast the matmul is bf16 anyway
            return super().forward(x)
        # half-precision compute: dequantize straight to it; autocast lets the float32 LoRA A/B meet
        # half-precision activations (their gradients stay float32)
        with torch.autocast(x.device.type, dtype=cd):
            return super().forward(x.to(cd)).to(x.dtype)

    @torch.no_grad()
    def dequantize_base(self) -> None:
        """Replace the 4-bit base by its dequantized full-precision weight (memory grows back to fp)."""
        if self.quantized:
            self.weight = nn.Parameter(self.dequantized_weight(), requires_grad=False)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the *dequantized* base weight, the one the adapter was trained
        against (not into 4 bits, which would round the update away): a full-precision layer."""
        if not self.merged:
            self.dequantize_base()
            super().merge()

    # ----------------------------------------------------------------- state dicts: plain tensors only
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # a state dict is for files (checkpoints: torch.load(weights_only=True) reads plain tensors
        # only); keep_vars=True asks for the live parameters, which are the NF4 ones
        if self.quantized and not keep_vars:
            destination[prefix + "weight"] = self.dequantized_weight()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        incoming = state_dict.get(key)
        if self.quantized and isinstance(incoming, torch.Tensor) and not is_nf4(incoming) and \
                tuple(incoming.shape) == tuple(self.weight.shape):
            w = self.weight
            if torch.equal(self.dequantized_weight().to(incoming.device, incoming.dtype), incoming):
                state_dict[key] = w  # exactly our base (a resumed run): keep these very codes
            else:  # another base: quantize it like this layer's own
                state_dict[key] = nf4_module().to_nf4(incoming.to(w.device, self.compute_dtype).contiguous(),
                                                      self.block_size, self.scaler_block_size)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def __deepcopy__(self, memo: dict) -> "QLoRALinear":
        # torchao's NF4 clone re-quantizes the dequantized weight with the default blocks: it fails
        # for other block sizes and drifts the scales otherwise. A copy gets the very same codes.
        if self.quantized and id(self.weight) not in memo:
            memo[id(self.weight)] = nn.Parameter(clone_nf4(self.weight), requires_grad=False)
        return copy._reconstruct(self, memo, *self.__reduce_ex__(4))

    # ----------------------------------------------------------------- device moves keep the 4 bits
    def _apply(self, fn, recurse: bool = True):
        """``.to(device)``/``.cuda()`` move the NF4 weight as NF4; a dtype cast (``.half()``, a
        ``bf16-true`` precision plugin) leaves it alone instead of dequantizing it. Other tensors as usual."""
        if not self.quantized:
            return super()._apply(fn, recurse)
        order = list(self._parameters)
        weight = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=weight.device)).device  # where fn sends tensors
            if device != weight.device:
                weight = nn.Parameter(weight.to(device), requires_grad=False)
            params = {**self._parameters, "weight": weight}
            self._parameters.clear()
            self._parameters.update((name, params[name]) for name in order)
        return self

    def extra_repr(self) -> str:
        quant = (f", nf4(block={self.block_size}, scaler_block={self.scaler_block_size}, "
                 f"compute={str(self.compute_dtype).removeprefix('torch.')})" if self.quantized else "")
        return super().extra_repr() + quant


# --------------------------------------------------------------------------- whole-model API
def qlora_layers(model: nn.Module) -> list[tuple[str, QLoRALinear]]:
    """``(name, layer)`` of every QLoRA layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]


def apply_qlora(model: nn.Module, rank: int = 16, alpha: float = 16, dropout: float = 0.0,
                targets: Sequence[str] = TARGETS, scaling: str = "rank", train_extra: Sequence[str] = (),
                block_size: int = 64, scaler_block_size: int = 256,
                compute_dtype: str = "auto") -> nn.Module:
    """:func:`~gptlab.model.lora.apply_lora` (same arguments, same targets, same freezing), then the
    base weight of every LoRA layer except the head is stored in NF4 (:class:`QLoRALinear`).

    A weight whose shape cannot be split into ``block_size`` blocks and ``scaler_block_size`` groups
    of blocks stays full precision, with a log line naming it (e.g. GPT-2's 1600x1600 layers with the
    default 64/256; a tiny test model's 32-wide layers). Returns ``model``; ``model.lora_config``
    gains ``adapter: qlora`` and a ``quantization`` entry, which :func:`save_adapter` stores.
    """
    _check_blocks(block_size, scaler_block_size)
    dtype = resolve_compute_dtype(compute_dtype)
    nf4_module()  # fail before touching the model when torchao is missing
    apply_lora(model, rank=rank, alpha=alpha, dropout=dropout, targets=targets, scaling=scaling,
               train_extra=train_extra)
    quantized, kept = [], []
    for name, layer in list(lora_layers(model)):
        if name in _HEADS:
            continue
        if not nf4_quantizable(layer.weight.shape, block_size, scaler_block_size):
            kept.append(f"{name} {tuple(layer.weight.shape)}")
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                QLoRALinear(layer, block_size=block_size, scaler_block_size=scaler_block_size, compute_dtype=dtype))
        quantized.append(name)
    if kept:
        log.warning("QLoRA: %d linear weight(s) stay full precision, their size does not split into NF4 "
                    "blocks of %d and scaler blocks of %d: %s", len(kept), block_size, scaler_block_size,
                    ", ".join(kept))
    log.info("QLoRA: %d linear weights stored in NF4 (compute %s)", len(quantized), dtype)
    model.lora_config = {**model.lora_config, "adapter": "qlora",
                         "quantization": {"block_size": block_size, "scaler_block_size": scaler_block_size,
                                          "compute_dtype": str(dtype).removeprefix("torch.")}}
    return model


def dequantize_qlora(model: nn.Module) -> nn.Module:
    """Give every QLoRA layer its full-precision (dequantized) base back; LoRA stays unmerged."""
    for _, layer in qlora_layers(model):
        layer.dequantize_base()
    return model


def frozen_linear_bytes(model: nn.Module) -> tuple[int, int]:
    """``(stored, fp32)``: bytes the frozen base weights of the model's (Q)LoRA layers other than the
    head occupy (quantized or kept full precision), and what they would take in float32."""
    stored = fp32 = 0
    for name, layer in lora_layers(model):
        if name in _HEADS:
            continue
        stored += nf4_nbytes(layer.weight)
        fp32 += layer.weight.numel() * 4
    return stored, fp32


def qlora_settings(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``quantization`` settings of an adapter config, or None for a plain LoRA adapter."""
    quant = config.get("quantization")
    if quant is None:
        return None
    unknown = sorted(set(quant) - set(QUANT_KEYS))
    if unknown:
        raise ValueError(f"unknown QLoRA quantization setting(s) {unknown}; valid: {list(QUANT_KEYS)}")
    return dict(quant)


def load_qlora_adapter(model: nn.Module, path: str | Path, requantize: bool = True) -> nn.Module:
    """Load a LoRA *or* QLoRA adapter file onto a full-precision base ``model``.

    A QLoRA adapter was trained against the base's NF4 rounding, not the base itself; with
    ``requantize`` (default) the base is quantized again with the file's settings (the same,
    deterministic rounding training saw) before the adapter is loaded, so the model computes what
    the trained one did. ``merge_lora`` then gives a full-precision model of that function.
    ``requantize=False`` loads it as plain LoRA onto the unrounded base. A plain LoRA file: as
    :func:`~gptlab.model.lora.load_adapter`.
    """
    tensors, config = read_adapter(path)
    quant = qlora_settings(config)
    if quant is not None and requantize and getattr(model, "lora_config", None) is None:
        adopt_adapter_head(model, tensors, path)
        apply_qlora(model, **{k: config[k] for k in APPLY_KEYS if k in config}, **quant)
    return load_adapter(model, path)


__all__ = ["QLoRALinear", "QLORA_RULES", "check_qlora_config", "apply_qlora", "load_qlora_adapter", "dequantize_qlora", "qlora_layers",
           "nf4_quantizable", "nf4_nbytes", "frozen_linear_bytes", "nf4_module", "is_nf4",
           "resolve_compute_dtype", "COMPUTE_DTYPES", "QUANT_KEYS"]
