"""The ``adapter`` config group applied to a backbone: one dispatch, used when a task is built and
when a checkpoint's adapted backbone is rebuilt to fold its adapter in."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.nn as nn

from gptlab.model.lora import apply_lora

ADAPTERS: dict[str, tuple[str, Callable[..., Any]]] = {
    "lora": ("LoRA", apply_lora),
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


__all__ = ["ADAPTERS", "apply_adapter"]
