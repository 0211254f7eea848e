"""The ``adapter`` config group applied to a backbone: one dispatch, used when a task is built and
when a checkpoint's adapted backbone is rebuilt to fold its adapter in."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.nn as nn

from gptlab.model.lora import apply_lora
from gptlab.model.qlora import QUANT_KEYS, apply_qlora  # torchao itself is imported only when qlora is applied

ADAPTERS: dict[str, tuple[str, Callable[..., Any]]] = {
    "lora": ("LoRA", apply_lora),
    "qlora": ("QLoRA", apply_qlora),  # LoRA on a 4-bit NF4 base
}
"""Adapter config name (``adapter=<name>``) -> (display name, function applying it to a model)."""


def apply_adapter(model: nn.Module, adapter: Mapping[str, Any]) -> str:
    """Apply an ``adapter`` config node (``name`` + the applier's keyword arguments) to ``model``;
    returns the adapter's display name. Raises ValueError naming the valid adapters."""
    settings = dict(adapter)
    name = settings.pop("name", "lora")
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; valid choices: {sorted(ADAPTERS)}")
    label, apply = ADAPTERS[name]
    apply(model, **settings)
    return label


def unquantized(adapter: Mapping[str, Any]) -> dict[str, Any]:
    """The same adapter on a full-precision base: a ``qlora`` node becomes the ``lora`` node with its
    LoRA settings (any other node is returned as is). A checkpoint stores a QLoRA base dequantized,
    so LoRA on those stored weights is the trained model exactly, without re-quantizing them."""
    settings = dict(adapter)
    if settings.get("name") == "qlora":
        settings = {k: v for k, v in settings.items() if k not in QUANT_KEYS}
        settings["name"] = "lora"
    return settings


__all__ = ["ADAPTERS", "apply_adapter", "unquantized"]
