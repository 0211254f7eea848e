"""The optimizer and the learning-rate schedule of every task, built from plain config nodes.

``task.optimizer`` is a Hydra-style node (``conf/task/optimizer/adamw.yaml``)::

    _target_: torch.optim.AdamW
    _partial_: true
    lr: 5.0e-5
    betas: [0.9, 0.999]
    ...

It stays a plain dict in the task's hyperparameters (checkpoints load with
``torch.load(weights_only=True)``; a ``functools.partial`` would not) and becomes an optimizer only in
``configure_optimizers``, through :func:`build_optimizer`. ``_target_`` may name any optimizer class
of ``torch.optim`` and nothing else: a node read back from a checkpoint never imports or calls a name
of its choosing.

``task.lr_schedule`` (``conf/task/lr_schedule/warmup_decay.yaml``): ``name`` (``constant``,
``cosine``, ``linear``), ``warmup_steps`` and ``min_lr``; stepped every optimizer step.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from gptlab.checks import Predicate, boolean, check_node, choice, is_number, number, raise_problems, unknown_keys
from gptlab.errors import ConfigError

DEFAULT_OPTIMIZER: dict[str, Any] = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 5e-5,
                                     "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "fused": None}
"""The optimizer of a task built without one: ``conf/task/optimizer/adamw.yaml``'s values
(``tests/test_configs.py`` keeps the two equal)."""
DEFAULT_LR_SCHEDULE: dict[str, Any] = {"name": "constant", "warmup_steps": 0, "min_lr": 0.0}
"""``conf/task/lr_schedule/warmup_decay.yaml``'s values (kept equal by the same test)."""
LR_SCHEDULES = ("constant", "cosine", "linear")
WEIGHT_DECAY_ON = ("matrices", "all")
"""Which trainable parameters get the optimizer's ``weight_decay``: ``matrices`` the weight matrices
of linear layers only (biases, norms, embeddings and a head tied to them get 0: gptlab's default, as
GPT-2/nanoGPT); ``all`` every one (the book's ``AdamW(model.parameters(), weight_decay=0.1)``)."""


MAX_LR = 10
"""The largest ``task.optimizer.lr`` accepted: no optimizer of torch.optim trains a network above it,
and a value such as 1e38 overflows float32 inside the optimizer's step (a raw traceback) instead of
being refused before the run."""


def _warmup_ok(v: Any) -> bool:
    return is_number(v) and v >= 0 and (v < 1 or float(v).is_integer())


OPTIMIZER_RULES = {"_target_": Predicate(lambda v: _is_optimizer_class(_named_class(v)),
                                         "an optimizer of torch.optim (e.g. torch.optim.AdamW, torch.optim.SGD)"),
                   "_partial_": Predicate(lambda v: v is True, "true (the task passes the parameter groups itself)"),
                   "lr": number(gt=0, le=MAX_LR), "weight_decay": number(ge=0), "eps": number(gt=0),
                   "fused": boolean(optional=True)}
"""The rule of the ``task.optimizer`` node's keys (others are the optimizer class's own arguments)."""
LR_SCHEDULE_RULES = {"name": choice(*LR_SCHEDULES, name="task.lr_schedule.name"),
                     "warmup_steps": Predicate(_warmup_ok, "an integer >= 0 (steps) or a number in [0, 1) (a fraction "
                                                           "of all steps)"),
                     "min_lr": number(ge=0)}
"""The rule of every ``task.lr_schedule`` key."""


def _named_class(target: Any) -> Any:
    module, _, name = str(target).rpartition(".")
    return getattr(torch.optim, name, None) if module == "torch.optim" else None


def optimizer_class(target: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim`` optimizer class ``target`` names (``torch.optim.AdamW``); anything else
    raises, naming the valid choices."""
    cls = _named_class(target)
    if not _is_optimizer_class(cls):
        valid = sorted(f"torch.optim.{n}" for n, c in vars(torch.optim).items() if _is_optimizer_class(c))
        raise ValueError(f"task.optimizer._target_={target!r} is not an optimizer of torch.optim; "
                         f"valid choices: {valid}")
    return cls


def _is_optimizer_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer


def optimizer_config(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """A complete optimizer node: ``None`` = :data:`DEFAULT_OPTIMIZER`; a node without ``_target_``
    = those AdamW settings updated by it; a node with ``_target_`` is taken as it is. Raises for an
    unknown ``_target_`` or ``_partial_: false`` (the parameters are given in ``configure_optimizers``)."""
    node = dict(node or {})
    if "_target_" not in node:
        node = {**DEFAULT_OPTIMIZER, **node}
    optimizer_class(node["_target_"])
    if not node.get("_partial_", True):
        raise ValueError("task.optimizer._partial_ must be true: the task passes the parameter groups itself")
    if "lr" not in node:
        raise ValueError(f"task.optimizer has no lr: {node}")
    raise_problems(check_node(node, OPTIMIZER_RULES), "task.optimizer setting")
    return node


def lr_schedule_config(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """A complete LR-schedule node (:data:`DEFAULT_LR_SCHEDULE` updated by ``node``), validated."""
    node = {**DEFAULT_LR_SCHEDULE, **dict(node or {})}
    raise_problems(check_lr_schedule_config(node), "task.lr_schedule setting")
    return node


def check_lr_schedule_config(node: Mapping[str, Any]) -> list:
    """Every problem of a ``task.lr_schedule`` node (:data:`LR_SCHEDULE_RULES`, unknown keys)."""
    return unknown_keys(node, LR_SCHEDULE_RULES, "task.lr_schedule") + check_node(node, LR_SCHEDULE_RULES)


def parameter_groups(module: nn.Module, weight_decay: float, weight_decay_on: str = "matrices") -> list[dict[str, Any]]:
    """Optimizer groups of ``module``'s trainable parameters (each once, tied weights included).

    ``weight_decay_on`` (:data:`WEIGHT_DECAY_ON`): ``matrices`` gives a ``decay`` group (weight
    matrices of linear layers, ``weight_decay``) and a ``no_decay`` group (biases, norms, embeddings
    and a head tied to them, 0); ``all`` gives one ``decay`` group of every parameter. The names
    make ``LearningRateMonitor`` log ``lr-AdamW/decay`` (and ``lr-AdamW/no_decay``).
    """
    if weight_decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"unknown task.weight_decay_on {weight_decay_on!r}; valid choices: {list(WEIGHT_DECAY_ON)}")
    params = list({id(p): p for p in module.parameters() if p.requires_grad}.values())
    if weight_decay_on == "all":
        return [{"params": params, "weight_decay": weight_decay, "name": "decay"}]
    no_decay_ids = {id(p) for m in module.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))
                    for p in m.parameters(recurse=False)}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in no_decay_ids]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in params if id(p) not in decay_ids]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
"""Optimizers whose ``fused: null`` becomes ``fused=True`` where torch has the kernel."""
IMPLEMENTATION_KEYS = ("fused", "foreach")
"""Param-group keys that choose an optimizer's kernel, not its maths: a resume keeps the run's own."""


def fused_kernel_available(params: Iterable[torch.Tensor]) -> bool:
    """Whether torch has a fused optimizer kernel for every one of ``params`` (floating point, on a
    device in torch's list: CUDA and CPU in torch >= 2.4, also MPS/XPU)."""
    try:  # torch's own list; private, so a torch without it falls back to CUDA only
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        devices = {"cuda"}
    params = list(params)
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def build_optimizer(node: Mapping[str, Any], groups: Iterable[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer ``node`` describes (see :func:`optimizer_config`) over parameter ``groups``.

    Lists become tuples (``betas``). ``fused: null`` means the fused kernel wherever torch has one
    for every parameter (Adam/AdamW/SGD on CUDA and CPU; measured faster on both,
    ``experiments/peers``), unless ``foreach: true`` asks for the other kernel. The kernel is an
    implementation choice, not part of the state: a checkpoint written with either setting resumes
    with the one this run chose (:func:`keep_implementation_on_load`).
    """
    node = optimizer_config(node)
    cls = optimizer_class(node["_target_"])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in node.items() if not k.startswith("_")}
    groups = list(groups)
    if "fused" in kwargs and kwargs["fused"] is None:
        del kwargs["fused"]
        params = [p for g in groups for p in g["params"]]
        if (cls in FUSED_OPTIMIZERS and not kwargs.get("foreach") and not kwargs.get("differentiable")
                and fused_kernel_available(params)):
            kwargs["fused"] = True
    return keep_implementation_on_load(cls(groups, **kwargs))


def keep_implementation_on_load(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.load_state_dict`` keep this optimizer's kernel choice (``fused``,
    ``foreach``): torch takes every group setting from the saved state, so a checkpoint written with
    ``fused=True`` would otherwise resume fused even where this run asked for ``fused=false`` (or
    where there is no fused kernel). The ``step`` counters are moved where the kept kernel expects
    them (the parameter's device for fused/capturable, else the CPU). Returns ``optimizer``."""
    chosen = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]

    def restore(opt: torch.optim.Optimizer) -> None:
        for group, keep in zip(opt.param_groups, chosen):
            group.update(keep)
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                step = opt.state.get(p, {}).get("step")
                if torch.is_tensor(step):
                    opt.state[p]["step"] = step.to(p.device if on_device else "cpu", torch.float32)

    optimizer.register_load_state_dict_post_hook(restore)
    return optimizer


# hyperparameters of checkpoints written before the optimizer became a node -> their new place
_LEGACY_OPTIMIZER_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "betas": "betas", "eps": "eps",
                          "fused_adamw": "fused"}
_LEGACY_SCHEDULE_KEYS = {"lr_schedule": "name", "warmup_steps": "warmup_steps", "min_lr": "min_lr"}


def fold_legacy_keys(kwargs: dict[str, Any], optimizer: Mapping[str, Any] | None,
                     lr_schedule: Mapping[str, Any] | str | None) -> tuple[dict[str, Any] | None, Any]:
    """Move the flat optimizer keys of older checkpoints' hyperparameters (``lr``, ``betas``,
    ``lr_schedule="cosine"``, ...) out of ``kwargs`` into the ``optimizer`` / ``lr_schedule`` nodes."""
    legacy_opt = {new: kwargs.pop(old) for old, new in _LEGACY_OPTIMIZER_KEYS.items() if old in kwargs}
    legacy_sched = {new: kwargs.pop(old) for old, new in _LEGACY_SCHEDULE_KEYS.items() if old in kwargs}
    if isinstance(lr_schedule, str):  # lr_schedule="cosine" was the schedule's name
        legacy_sched["name"], lr_schedule = lr_schedule, None
    if legacy_opt:
        optimizer = {**dict(optimizer or {}), **legacy_opt}
    if legacy_sched:
        lr_schedule = {**dict(lr_schedule or {}), **legacy_sched}
    return optimizer, lr_schedule


RESUME_MAY_CHANGE = ("_partial_", *IMPLEMENTATION_KEYS)
"""Optimizer keys a resume may change: the kernel choice, which the resumed optimizer keeps from this
run (:func:`keep_implementation_on_load`), not from the checkpoint."""


def resume_changes(saved_hparams: Mapping[str, Any], optimizer: Mapping[str, Any] | None,
                   lr_schedule: Mapping[str, Any] | None, weight_decay_on: str = "matrices") -> list[str]:
    """What a resume from a checkpoint whose task hyperparameters are ``saved_hparams`` would not
    apply as asked: ``"task.optimizer.lr=0.001 (the checkpoint's: 0.0004)"`` for each differing value.

    A resume restores the optimizer's state, and with it every value of its parameter groups (``lr``,
    ``betas``, ``eps``, ``weight_decay``, ...): a new value would be silently ignored, while the LR
    schedule (rebuilt from the config) would follow part of it (its floor ``min_lr / lr``, its
    warmup, its shape), so the learning rate would jump and the new checkpoint would record a rate
    never used. ``weight_decay_on`` changes the parameter groups the state belongs to. The kernel
    choice (:data:`RESUME_MAY_CHANGE`) may change. Raises ``ValueError`` for a node that is not valid.
    """
    saved = dict(saved_hparams)
    saved_opt, saved_sched = fold_legacy_keys(saved, saved.pop("optimizer", None), saved.pop("lr_schedule", None))
    pairs = [("task.optimizer", optimizer_config(saved_opt), optimizer_config(optimizer)),
             ("task.lr_schedule", lr_schedule_config(saved_sched), lr_schedule_config(lr_schedule))]
    changes = []
    for prefix, before, now in pairs:
        for key in sorted(set(before) | set(now)):
            if key in RESUME_MAY_CHANGE:
                continue
            old, new = _plain(before.get(key)), _plain(now.get(key))
            if old != new:
                changes.append(f"{prefix}.{key}={new} (the checkpoint's: {old})")
    old_on = saved.get("weight_decay_on", "matrices")
    if old_on != weight_decay_on:
        changes.append(f"task.weight_decay_on={weight_decay_on} (the checkpoint's: {old_on})")
    return changes


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def refuse_resume_changes(changes: list[str], ckpt_path: Any) -> None:
    """Raise :class:`ConfigError` listing ``changes`` (from :func:`resume_changes`), if any."""
    if changes:
        raise ConfigError(
            f"ckpt_path={ckpt_path}: a resume continues the checkpoint's optimizer and LR schedule, which would "
            f"ignore or only half-apply {'; '.join(changes)}. Resume with the checkpoint's values (see its run's "
            f".hydra/config.yaml), or start a new run from its weights with init_from={ckpt_path}")


def lr_lambda(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR multiplier at ``step``: linear warmup from 0 over ``warmup_steps``, then ``schedule``:
    ``constant``, ``cosine`` (to ``min_lr_ratio``) or ``linear`` (to ``min_lr_ratio``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"unknown lr schedule {schedule!r}; valid choices: {list(LR_SCHEDULES)}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any], lr: float,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` for ``schedule`` (see :func:`lr_schedule_config`); ``warmup_steps``
    below 1 is a fraction of ``total_steps``; the decay ends at ``min_lr`` (absolute, relative to
    the peak ``lr``)."""
    schedule = lr_schedule_config(schedule)
    warmup = schedule["warmup_steps"]
    warmup = int(warmup * total_steps) if 0 < warmup < 1 else int(warmup)
    min_ratio = schedule["min_lr"] / lr if lr else 0.0
    name = schedule["name"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total_steps, warmup, name, min_ratio))
