"""Low-rank adaptation (LoRA, Hu et al. 2021; the book's appendix E) for the GPT backbone.

A frozen ``nn.Linear`` with weight W (out, in) gets a trainable update ``scale * A @ B`` with
A (in, r) and B (r, out):  y = x W^T + b + scale * dropout(x) @ A @ B.  B starts at zero, so a fresh
adapter leaves the model's outputs unchanged.

The backbone's attention uses one fused ``qkv`` layer (D -> 3D). It gets one A/B pair per chosen
part (``q``, ``k``, ``v``), each acting on its third of the output, so the adapter is the same as
LoRA on the book's separate W_query / W_key / W_value (same parameter count, same function).

    apply_lora(model, rank=16, alpha=16)        # wrap layers in place, freeze everything else
    save_adapter(model, "adapter.safetensors")  # LoRA weights (+ train_extra / task head) + config
    load_adapter(base_model, "adapter.safetensors")   # the fine-tuned model again, exactly
    merge_lora(model) / unmerge_lora(model) / remove_lora(model)
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gptlab.checks import Problem, check_node, choice, integer, number, raise_problems, require, strings

log = logging.getLogger(__name__)

TARGETS = ("q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj", "head")
"""Every layer kind LoRA can adapt: the three parts of the fused attention input projection, the
attention output projection, both MLP layers, and the output head."""
SCALINGS = ("rank", "plain", "rslora")
"""How ``alpha`` becomes the update's scale: ``rank`` alpha / r (Hu et al.; changing r keeps the
update's size), ``plain`` alpha (the book's appendix E), ``rslora`` alpha / sqrt(r) (Kalajdzievski 2023)."""
APPLY_KEYS = ("rank", "alpha", "dropout", "targets", "scaling", "train_extra")
"""The settings an adapter file must carry to rebuild its layers (the ``apply_lora`` arguments)."""
ADAPTER_FORMAT = "gptlab-lora"
LORA_RULES = {"rank": integer(ge=1), "alpha": number(gt=0), "dropout": number(ge=0, lt=1),
              "scaling": choice(*SCALINGS, name="LoRA scaling"), "targets": strings(TARGETS, nonempty=True),
              "train_extra": strings()}
"""The rule of every LoRA setting (the ``apply_lora`` arguments, the ``adapter=lora`` config node)."""

# module-name suffix in the GPT backbone -> target name(s)
_FUSED_QKV = "attn.qkv"
_SINGLE = {"attn.proj": "attn_proj", "mlp.fc": "mlp_fc", "mlp.proj": "mlp_proj"}


def lora_scale(rank: int, alpha: float, scaling: str = "rank") -> float:
    """The factor in front of ``A @ B`` for ``scaling`` (see :data:`SCALINGS`)."""
    if scaling == "rank":
        return alpha / rank
    if scaling == "plain":
        return float(alpha)
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"unknown LoRA scaling {scaling!r}; valid choices: {list(SCALINGS)}")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight gets a trainable low-rank update.

    It *is* a Linear sharing the wrapped layer's ``weight`` and ``bias``, so parameter names stay
    (``blocks.0.mlp.fc.weight``) and code that reads ``in_features``/``out_features`` keeps working.

    Args:
        base: the layer to adapt; its parameters are reused, not copied.
        rank: r, the inner dimension of the update.
        alpha: numerator of the scale (see ``scaling``).
        dropout: dropout on the LoRA input path only (the frozen path sees the clean input).
        scaling: ``rank`` | ``plain`` | ``rslora``, see :data:`SCALINGS`.
        parts: for fused layers, ``{name: (start, stop)}`` output slices that get their own A/B
            pair (e.g. ``{"q": (0, 768), "v": (1536, 2304)}``); rows outside every part are not
            adapted. None: one pair over the whole output, stored as ``lora_A`` / ``lora_B``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, scaling: str = "rank",
                 parts: Mapping[str, tuple[int, int]] | None = None):
        # build on the meta device (no memory), then adopt the base layer's own parameters
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        require("rank", rank, LORA_RULES["rank"])
        self.rank, self.alpha, self.scaling = rank, alpha, scaling
        self.scale = lora_scale(rank, alpha, scaling)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        if parts is None:
            self.parts = None
            self.lora_A = nn.Parameter(torch.empty(self.in_features, rank, **kw))  # (in, r)
            self.lora_B = nn.Parameter(torch.zeros(rank, self.out_features, **kw))  # (r, out)
        else:
            for name, (start, stop) in parts.items():
                if not 0 <= start < stop <= self.out_features:
                    raise ValueError(f"LoRA part {name!r} slice {start}:{stop} outside 0:{self.out_features}")
            self.parts = {name: (int(s), int(e)) for name, (s, e) in parts.items()}
            self.lora_A = nn.ParameterDict({n: nn.Parameter(torch.empty(self.in_features, rank, **kw))
                                            for n in self.parts})
            self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(rank, e - s, **kw))
                                            for n, (s, e) in self.parts.items()})
        self.reset_lora_parameters()
        self.train(base.training)  # a model in eval mode stays in eval mode (no LoRA dropout)

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform as in the book (``kaiming_uniform_(A, a=sqrt(5))`` on the (in, r)
        tensor); B: zeros, so the update starts at exactly zero."""
        for A, B in self._pairs():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def _pairs(self) -> Iterator[tuple[nn.Parameter, nn.Parameter]]:
        if self.parts is None:
            yield self.lora_A, self.lora_B
        else:
            for name in self.parts:
                yield self.lora_A[name], self.lora_B[name]

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as one product: A (in, P*r) @ B (P*r, out), P = number of parts.

        For a fused layer each part's B is zero-padded to the full output width, so the product
        writes each part's update into its own slice and leaves the other rows at zero.
        """
        if self.parts is None:
            return self.lora_A, self.lora_B
        A = torch.cat([self.lora_A[n] for n in self.parts], dim=1)
        B = torch.cat([F.pad(self.lora_B[n], (s, self.out_features - e)) for n, (s, e) in self.parts.items()])
        return A, B

    def delta_weight(self) -> torch.Tensor:
        """The dense update in ``weight``'s layout (out, in): ``scale * (A @ B)^T``."""
        A, B = self._factors()
        return self.scale * (A @ B).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        A, B = self._factors()
        return y + self.scale * ((self.lora_dropout(x) @ A) @ B)  # (..., in) -> (..., r) -> (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (inference without the extra matmuls). Idempotent."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of ``weight`` again (equal up to float rounding). Idempotent."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the (unmerged) base parameters."""
        self.unmerge()
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def extra_repr(self) -> str:
        parts = "" if self.parts is None else f", parts={list(self.parts)}"
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}{parts}, merged={self.merged}"


# --------------------------------------------------------------------------- whole-model API
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, layer)`` of every LoRA layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_layers(model))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _matches(name: str, pattern: str) -> bool:
    """``out_head`` matches ``out_head.weight``; glob patterns (``blocks.11.*``) match too."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 16, dropout: float = 0.0,
               targets: Sequence[str] = TARGETS, scaling: str = "rank",
               train_extra: Sequence[str] = ()) -> nn.Module:
    """Replace the ``targets`` linear layers of a GPT backbone by :class:`LoRALinear` in place and
    freeze every other parameter, except those whose names match a ``train_extra`` pattern
    (e.g. ``["out_head"]`` to train a new classifier head fully, ``["final_norm"]``).

    ``targets``: any of :data:`TARGETS`. A head tied to the token embedding is skipped with a
    warning: merging an update into it would change the embedding too.
    Returns ``model``; its settings are kept in ``model.lora_config`` (what :func:`save_adapter` stores).
    """
    targets = list(targets)
    raise_problems(check_lora_config(dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, scaling=scaling,
                                          train_extra=list(train_extra))), "LoRA setting")
    if has_lora(model):
        raise ValueError("LoRA is already applied to this model; call remove_lora(model) first")
    qkv_parts = [t for t in ("q", "k", "v") if t in targets]
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parts = None
        if name.endswith(_FUSED_QKV) and qkv_parts:
            D = module.out_features // 3  # fused layout: q | k | v, D output rows each
            parts = {p: (i * D, (i + 1) * D) for i, p in enumerate(("q", "k", "v")) if p in qkv_parts}
        elif not any(name.endswith(s) and _SINGLE[s] in targets for s in _SINGLE) and \
                not (name == "out_head" and "head" in targets):
            continue
        if name == "out_head" and getattr(model, "tok_emb", None) is not None and \
                module.weight is model.tok_emb.weight:
            warnings.warn("out_head is tied to tok_emb: LoRA skips the head (an update merged into it "
                          "would change the token embedding too)", stacklevel=2)
            continue
        _set_module(model, name, LoRALinear(module, rank, alpha, dropout, scaling, parts))
        replaced.append(name)
    if not replaced:
        raise ValueError(f"no layer of {type(model).__name__} matches LoRA targets {targets}")

    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        for A, B in layer._pairs():
            A.requires_grad_(True)
            B.requires_grad_(True)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for pattern in train_extra:
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise ValueError(f"train_extra pattern {pattern!r} matches no parameter; names look like "
                             f"{names[:3]} ... {names[-2:]}")
        for n in hits:
            model.get_parameter(n).requires_grad_(True)
    model.lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets, scaling=scaling,
                             train_extra=list(train_extra))
    log.debug("LoRA rank %d on %d layers: %s trainable parameters", rank, len(replaced),
             f"{trainable_parameters(model):,}")
    return model


def check_lora_config(node: Mapping[str, Any]) -> list[Problem]:
    """Every problem of a LoRA config node (:data:`LORA_RULES`); builds nothing."""
    return check_node(node, LORA_RULES)


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (a tied one counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight; a no-op without LoRA, idempotent."""
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (base weights back up to float rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put plain ``nn.Linear`` layers back (unmerging first): the base model's outputs again.

    Weights an adapter brought besides LoRA (``train_extra``, a task head) stay as they are, and
    parameters stay frozen.
    """
    for name, layer in list(lora_layers(model)):
        _set_module(model, name, layer.to_linear())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model`` computes its base function: every LoRA update is switched off
    (scale 0; an update merged into a weight is taken out first and put back after). Without LoRA
    layers nothing changes. The base model for free, e.g. the DPO/PPO reference model without a
    second copy in memory (PEFT's ``disable_adapter``)::

        with torch.no_grad(), disable_lora(policy):
            ref_logits = policy(input_ids)
    """
    layers = [layer for _, layer in lora_layers(model)]
    merged = [layer for layer in layers if layer.merged]
    scales = [layer.scale for layer in layers]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.scale = 0.0
    try:
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale
        for layer in merged:
            layer.merge()


# --------------------------------------------------------------------------- adapter files
def _is_lora_key(key: str) -> bool:
    return ".lora_A" in key or ".lora_B" in key


def _task_head_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """``out_head.*`` keys when the head is not a language-model head (a classifier swapped in by
    the task): no pretrained checkpoint holds it, so the adapter must."""
    head, config = getattr(model, "out_head", None), getattr(model, "config", None)
    if head is None or config is None or head.out_features in (config.vocab_size, config.padded_vocab_size):
        return []
    return [k for k in state if k.startswith("out_head.") and not _is_lora_key(k)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter holds, by state-dict name: every LoRA A/B, the parameters ``train_extra``
    made trainable, and a task head (e.g. a classifier). Base weights are taken unmerged."""
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("this model has no LoRA applied (apply_lora or load_adapter first)")
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    try:
        # the live tensors, not a copy of the whole model (nor a dequantized copy of a QLoRA base)
        state = model.state_dict(keep_vars=True)
        keep = {k for k in state if _is_lora_key(k)}
        keep |= {k for k in state for p in config["train_extra"] if _matches(k, p)}
        keep |= set(_task_head_keys(model, state))
        return {k: state[k].detach().clone() for k in sorted(keep)}
    finally:
        for layer in merged:
            layer.merge()


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, then the permissions any new file gets (``0666 & ~umask``):
    safetensors creates its files readable by the owner only, which hides them from group members
    sharing a run folder."""
    path = Path(path)
    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def save_adapter(model: nn.Module, path: str | Path, config: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`lora_state_dict` to a safetensors file; the LoRA settings (rank, alpha, targets,
    scaling, ...) and any extra ``config`` entries (e.g. ``init_from``) go into its metadata.
    Returns the path."""
    if getattr(model, "lora_config", None) is None:
        raise ValueError("this model has no LoRA applied: nothing to save as an adapter")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_config = {**dict(config or {}), **model.lora_config}  # the model's own LoRA settings win
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    save_safetensors(tensors, path, metadata={"format": "pt", "gptlab_adapter": ADAPTER_FORMAT,
                                            "config": json.dumps(meta_config, default=str)})
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the config stored in an adapter file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("gptlab_adapter") != ADAPTER_FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not a gptlab LoRA adapter (no '{ADAPTER_FORMAT}' metadata)")
    return load_file(str(path)), json.loads(meta["config"])


def adopt_adapter_head(model: nn.Module, tensors: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Give ``model`` a new ``out_head`` of the adapter's shape when the adapter brings a head of
    another shape (a classifier adapter on a plain pretrained model); otherwise leave it."""
    head_w = tensors.get("out_head.weight")
    head = getattr(model, "out_head", None)
    if head_w is not None and head is not None and tuple(head_w.shape) != tuple(head.weight.shape):
        log.info("adapter %s brings a %s head; replacing the model's %s head", path,
                 tuple(head_w.shape), tuple(head.weight.shape))
        model.out_head = nn.Linear(head_w.shape[1], head_w.shape[0], bias="out_head.bias" in tensors,
                                   device=head.weight.device, dtype=head.weight.dtype)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter file onto ``model`` (unmerged): applies LoRA with the stored settings unless
    the model already has the same LoRA layers, then loads the weights. A classifier head stored in
    the adapter replaces a head of another shape first, so a plain pretrained model + adapter gives
    the fine-tuned model. Raises ValueError naming the key on a missing key or a shape mismatch."""
    tensors, config = read_adapter(path)
    settings = {k: config[k] for k in APPLY_KEYS if k in config}
    current = getattr(model, "lora_config", None)
    if current is None:
        adopt_adapter_head(model, tensors, path)
        apply_lora(model, **settings)
    else:
        differ = {k: (current.get(k), v) for k, v in settings.items() if _norm(current.get(k)) != _norm(v)}
        if differ:
            raise ValueError(f"{path}: adapter settings differ from the LoRA already on the model "
                             f"(model, file): {differ}")
        unmerge_lora(model)
    own = model.state_dict(keep_vars=True)  # the live tensors: no copy (nor dequantized QLoRA base)
    for key, value in tensors.items():
        if key not in own:
            raise ValueError(f"{path}: adapter key {key!r} has no counterpart in the model")
        if own[key].shape != value.shape:
            raise ValueError(f"{path}: shape mismatch for {key!r}: adapter {tuple(value.shape)}, "
                             f"model {tuple(own[key].shape)}")
    missing = [k for k in own if _is_lora_key(k) and k not in tensors]
    if missing:
        raise ValueError(f"{path}: adapter lacks LoRA weights for {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    model.load_state_dict(tensors, strict=False)
    return model


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


__all__ = ["LoRALinear", "TARGETS", "SCALINGS", "LORA_RULES", "check_lora_config", "apply_lora", "merge_lora", "unmerge_lora", "remove_lora",
           "disable_lora", "lora_state_dict", "save_safetensors", "save_adapter", "load_adapter", "read_adapter",
           "adopt_adapter_head", "lora_layers", "has_lora", "trainable_parameters", "lora_scale"]
