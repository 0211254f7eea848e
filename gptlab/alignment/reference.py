"""The reference model π_ref of DPO, PPO and GRPO: the policy's starting point, which the loss (or the
KL penalty) measures the policy against. It comes one of three ways (:data:`REFERENCE_MODES`):

* ``copy``: a frozen copy of the starting policy (the book; twice the weights in memory);
* ``adapters_off``: the policy itself with its LoRA updates switched off
  (:func:`gptlab.model.lora.disable_lora`; PEFT's ``disable_adapter``): no second copy;
* ``precomputed``: the reference's numbers computed once before training and looked up by example
  (TRL's ``precompute_ref_log_probs``): no reference model at all.

:class:`Reference` holds whichever of these a run uses and its whole checkpoint state, which a
task stores under the one key :data:`CHECKPOINT_KEY`; checkpoints written before that key (DPO's
``dpo_ref_logps`` / ``dpo_reference_state``, PPO's ``ppo_reference_state``) still load
(:meth:`Reference.checkpoint_state`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from safetensors import safe_open

from gptlab.model.gpt import CausalSelfAttention
from gptlab.model.lora import disable_lora, remove_lora, save_safetensors

REFERENCE_MODES = ("copy", "adapters_off", "precomputed")
CHECKPOINT_KEY = "gptlab_reference"
"""The checkpoint entry holding a task's reference state (:meth:`Reference.state_dict`)."""
LOGPS_FILE_FORMAT = "gptlab-ref-logps-1"
_LEGACY_MODEL_KEYS = ("dpo_reference_state", "ppo_reference_state")
_LEGACY_LOGPS_KEY = "dpo_ref_logps"


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) inside the block, its own mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@contextmanager
def reference_view(model: nn.Module, adapters_off: bool = False) -> Iterator[nn.Module]:
    """``model`` computing as a reference inside the block: without gradients, in eval mode and, with
    ``adapters_off``, with its LoRA updates switched off (the starting policy, for every mode)."""
    with torch.no_grad(), eval_mode(model), (disable_lora(model) if adapters_off else nullcontext()):
        yield model


def switch_off_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout of ``model`` to 0 (TRL's ``disable_dropout=True``): the policy's log-probs
    then match the reference's exactly at step 0, and PPO's ratio is exactly 1 on its first minibatch."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, CausalSelfAttention):
            module.dropout = 0.0
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` as it is now, without LoRA layers (``reference: copy``)."""
    ref = copy.deepcopy(model)
    if getattr(ref, "lora_config", None) is not None:
        remove_lora(ref)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base weights (LoRA factors left out): name, shape and two sums of
    every parameter. Reference numbers cached on disk are reused only for the same weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        t = p.detach().double()
        h.update(f"{name}{tuple(p.shape)}{float(t.sum()):.10e}{float(t.abs().sum()):.10e}".encode())
    return h.hexdigest()


class Reference:
    """The reference of one run (see the module docstring).

    ``mode`` is ``copy``, ``adapters_off`` or ``precomputed`` (:meth:`resolve` turns ``auto`` into
    one of them). ``copy`` keeps the frozen model in :attr:`model` (not a submodule of the task: kept
    out of its ``state_dict`` and ``parameters()``; the task moves it along through :meth:`apply_`);
    ``precomputed`` keeps per-split tables in :attr:`logps`: ``{split: {name: tensor (N,), ...,
    "fingerprint": str}}`` indexed by example, tagged with what the numbers are (:attr:`logps_tag`,
    e.g. DPO's log-prob reduction).
    """

    def __init__(self, mode: str, logps_tag: str | None = None):
        if mode not in REFERENCE_MODES:
            raise ValueError(f"unknown reference {mode!r}; valid choices: {list(REFERENCE_MODES)}")
        self.mode = mode
        self.logps_tag = logps_tag
        self.model: nn.Module | None = None
        self.logps: dict[str, dict[str, Any]] = {}
        self.policy_trained = False
        """True after the policy's first optimizer step (or a restored checkpoint): from then on
        the policy is no longer the reference, so a copy or table cannot be made from it."""

    @staticmethod
    def resolve(mode: str, has_adapter: bool) -> str:
        """``auto`` -> ``adapters_off`` with an adapter, else ``copy``; other modes as they are."""
        if mode == "auto":
            return "adapters_off" if has_adapter else "copy"
        return mode

    # ----------------------------------------------------------------- the model
    def build(self, policy: nn.Module) -> None:
        """Make the frozen copy of ``policy`` (``copy`` mode, once). Call it before a checkpoint is
        restored, so the copy holds the STARTING weights, never trained ones."""
        if self.mode == "copy" and self.model is None:
            if self.policy_trained:
                raise RuntimeError("the reference copy was never built and the policy has been trained")
            self.model = frozen_copy(policy)

    @contextmanager
    def active(self, policy: nn.Module) -> Iterator[nn.Module]:
        """The module that computes as the reference, inside the block: without gradients, in eval
        mode, and for ``adapters_off`` with the policy's LoRA switched off. ``copy`` builds the copy
        now when nobody did (the policy used outside a Trainer), unless the policy has been trained."""
        if self.mode == "precomputed":
            raise RuntimeError("reference=precomputed keeps no model; look its numbers up with lookup()")
        if self.mode == "copy":
            self.build(policy)
        with reference_view(self.model if self.mode == "copy" else policy, self.mode == "adapters_off") as model:
            yield model

    def apply_(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """``nn.Module._apply`` on the copy: ``.to(device)`` and precision casts of the task reach it."""
        if self.model is not None:
            self.model._apply(fn, *args, **kwargs)

    # ----------------------------------------------------------------- precomputed numbers
    def lookup(self, split: str, index: torch.Tensor, names: Sequence[str], device: torch.device
               ) -> tuple[torch.Tensor, ...]:
        """The precomputed ``names`` of the examples ``index`` (B,) of ``split``, on ``device``."""
        table = self.logps.get(split)
        if table is None:
            raise RuntimeError(f"no precomputed reference log-probs for the {split!r} split")
        # the small table goes to the index's device and is gathered there: no copy back, no host sync
        return tuple(table[name].to(index.device, non_blocking=True)[index].to(device) for name in names)

    def missing_splits(self, fingerprints: Mapping[str, str]) -> list[str]:
        """The splits of ``fingerprints`` (split -> data fingerprint) without a table for that data."""
        return [s for s, fp in fingerprints.items() if self.logps.get(s, {}).get("fingerprint") != fp]

    def save_logps_file(self, path: str | Path, weights: str, **metadata: str) -> Path:
        """Every table in a safetensors file, with the weights' fingerprint, :attr:`logps_tag` and
        ``metadata`` (strings) in its header; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{s}.{name}": t.contiguous() for s, table in self.logps.items()
                   for name, t in table.items() if isinstance(t, torch.Tensor)}
        meta = {"format": "pt", "gptlab_ref_logps": LOGPS_FILE_FORMAT, "logp_reduction": str(self.logps_tag),
                "weights": weights, **metadata,
                "fingerprints": json.dumps({s: t["fingerprint"] for s, t in self.logps.items()})}
        return save_safetensors(tensors, path, meta)

    def load_logps_file(self, path: str | Path, wanted: Mapping[str, str], weights: str,
                        names: Sequence[str]) -> tuple[list[str], str | None]:
        """Take the splits of ``wanted`` (split -> data fingerprint) that the file at ``path`` holds
        for these ``weights`` and this :attr:`logps_tag`. Returns the splits still missing and, when
        the file exists but does not fit, why (for the caller to say)."""
        path = Path(path)
        if not path.is_file():
            return list(wanted), None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("gptlab_ref_logps") != LOGPS_FILE_FORMAT or meta.get("weights") != weights or \
                    meta.get("logp_reduction") != str(self.logps_tag):
                return list(wanted), f"{path}: cached reference log-probs are for other weights or settings; recomputing"
            fingerprints = json.loads(meta.get("fingerprints", "{}"))
            reused = [s for s, fp in wanted.items() if fingerprints.get(s) == fp]
            for s in reused:
                self.logps[s] = {**{n: f.get_tensor(f"{s}.{n}") for n in names}, "fingerprint": wanted[s]}
        return [s for s in wanted if s not in reused], None

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self, keep_model: bool) -> dict[str, Any]:
        """What a checkpoint keeps: the mode, the copy's weights when ``keep_model`` (a reference built
        from scratch cannot be rebuilt from ``init_from`` on resume) and the precomputed tables."""
        state: dict[str, Any] = {"mode": self.mode}
        if keep_model and self.model is not None:
            state["model"] = self.model.state_dict()
        if self.logps:
            state["logps"] = {"tag": self.logps_tag, "splits": self.logps}
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None, policy: nn.Module) -> None:
        """Restore :meth:`state_dict` (or :meth:`checkpoint_state` of an older checkpoint); the
        policy is then a trained one. Tables of another tag are ignored."""
        self.policy_trained = True
        if not state:
            return
        logps = state.get("logps")
        if logps and logps.get("tag") == self.logps_tag:
            self.logps = {s: dict(t) for s, t in logps["splits"].items()}
        weights = state.get("model")
        if weights is not None and self.mode == "copy":
            if self.model is None:
                self.model = frozen_copy(policy)
            self.model.load_state_dict(weights)

    @staticmethod
    def checkpoint_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
        """The reference state in a checkpoint: its :data:`CHECKPOINT_KEY` entry, or the same built
        from the keys gptlab wrote before it (``dpo_ref_logps``, ``dpo_reference_state``,
        ``ppo_reference_state``); None when it holds none."""
        if CHECKPOINT_KEY in checkpoint:
            return dict(checkpoint[CHECKPOINT_KEY])
        state: dict[str, Any] = {}
        for key in _LEGACY_MODEL_KEYS:
            if key in checkpoint:
                state["model"] = checkpoint[key]
        old = checkpoint.get(_LEGACY_LOGPS_KEY)
        if old:
            state["logps"] = {"tag": old.get("logp_reduction"), "splits": old.get("splits", {})}
        return state or None


__all__ = ["REFERENCE_MODES", "CHECKPOINT_KEY", "Reference", "eval_mode", "reference_view", "switch_off_dropout",
           "frozen_copy",
           "weights_fingerprint"]
