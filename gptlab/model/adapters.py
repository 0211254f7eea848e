"""The ``adapter`` config group applied to a backbone: one dispatch, used when a task is built and
when a checkpoint's adapted backbone is rebuilt; and the check of an ``adapter`` node (by the rules
of the adapter it names), callable before anything is built."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.nn as nn

from gptlab.checks import Problem, check_node, choice, unknown_keys
from gptlab.model.lora import LORA_RULES, apply_lora
from gptlab.model.qlora import QLORA_RULES, QUANT_KEYS, apply_qlora  # torchao is imported only when applied

ADAPTERS: dict[str, tuple[str, Callable[..., Any], Mapping[str, Any]]] = {
    "lora": ("LoRA", apply_lora, LORA_RULES),
    "qlora": ("QLoRA", apply_qlora, QLORA_RULES),  # LoRA on a 4-bit NF4 base
}
"""Adapter config name (``adapter=<name>``) -> (display name, function applying it to a model, the
rules of its settings: the function's keyword arguments)."""


def apply_adapter(model: nn.Module, adapter: Mapping[str, Any]) -> str:
    """Apply an ``adapter`` config node (``name`` + the applier's keyword arguments) to ``model``;
    returns the adapter's display name. Raises ValueError naming the valid adapters."""
    settings = dict(adapter)
    name = settings.pop("name", "lora")
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; valid choices: {sorted(ADAPTERS)}")
    label, apply, _ = ADAPTERS[name]
    apply(model, **settings)
    return label


def check_adapter_config(node: Mapping[str, Any]) -> list[Problem]:
    """Every problem of an ``adapter`` config node: its ``name``, then its settings by that adapter's
    rules (unknown settings are named). Builds nothing."""
    settings = {k: v for k, v in dict(node).items() if not k.startswith("_")}
    name = settings.pop("name", "lora")
    found = choice(*ADAPTERS).problem("name", name)
    if found is not None:
        return [found]
    label, _, rules = ADAPTERS[name]
    return unknown_keys(settings, rules, f"the {label} adapter") + check_node(settings, rules)


def unquantized(adapter: Mapping[str, Any]) -> dict[str, Any]:
    """The same adapter on a full-precision base: a ``qlora`` node becomes the ``lora`` node with its
    LoRA settings (any other node is returned as is). A checkpoint stores a QLoRA base dequantized,
    so LoRA on those stored weights is the trained model exactly, without re-quantizing them."""
    settings = dict(adapter)
    if settings.get("name") == "qlora":
        settings = {k: v for k, v in settings.items() if k not in QUANT_KEYS}
        settings["name"] = "lora"
    return settings


__all__ = ["ADAPTERS", "apply_adapter", "check_adapter_config", "unquantized"]
