"""Direct Preference Optimization (Rafailov et al. 2023; the book's chapter 7 DPO bonus).

The policy (the model being tuned) learns to raise the log-probability of the chosen response
over the rejected one *relative to a reference model* (the starting point, usually the SFT model):

    Δ = [log π(y⁺|x) − log π_ref(y⁺|x)] − [log π(y⁻|x) − log π_ref(y⁻|x)]
    sigmoid (paper, book):  −log σ(βΔ)          ipo: (Δ − 1/(2β))²          hinge: relu(1 − βΔ)

Chosen and rejected go through the model in ONE forward pass on the stacked [chosen; rejected]
batch (TRL's concatenated forward). The reference comes one of three ways (``reference``):

* ``copy``: a frozen copy of the starting model (the book; twice the weights in memory);
* ``adapters_off``: with ``adapter=lora``, the policy itself with its LoRA updates switched off
  (:func:`gptlab.model.lora.disable_lora`): no second copy (PEFT's ``disable_adapter``);
* ``precomputed``: one pass before training stores the reference log-probs of every pair (TRL's
  ``precompute_ref_log_probs``), cached in ``ref_logps.safetensors`` beside the run and inside
  every checkpoint (a resumed run reuses them); no reference model is kept at all.

``auto`` picks ``adapters_off`` with an adapter, else ``copy``. All three give the same loss.

Metrics use TRL's names under ``train/``, ``val/``, ``test/``: ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (share of pairs with chosen reward > rejected: 0 at
step 0), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from gptlab.data.instruct import get_prompt_style
from gptlab.model.gpt import CausalSelfAttention
from gptlab.model.lora import disable_lora, remove_lora
from gptlab.tasks.base import GPTTask
from gptlab.tasks.instruct import ResponseGenerationMixin
from gptlab.tasks.metrics import StageMeans

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
LOGP_REDUCTIONS = ("sum", "mean")
"""How a response's token log-probs become one number: ``sum`` (the paper, TRL, torchtune) or
``mean`` over its scored tokens (the book's ``compute_logprobs``; β then acts on another scale)."""
REFERENCES = ("auto", "copy", "adapters_off", "precomputed")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")
PROGRESS_BAR = ("loss", "rewards/accuracies")
REF_LOGPS_FORMAT = "gptlab-ref-logps-1"


# ----------------------------------------------------------------------------- the loss
def validate_dpo_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ValueError naming the setting unless β > 0, ``loss_type`` is known and ε fits it."""
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid choices: {list(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type=sigmoid only (got loss_type={loss_type!r})")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and implicit rewards, all (B,).

    Args:
        policy_*_logps, ref_*_logps: (B,) sequence log-probs of the chosen / rejected responses.
        beta: β, how far the policy may move from the reference (higher = closer).
        loss_type: ``sigmoid`` −log σ(βΔ) (the paper, the book); ``ipo`` (Δ − 1/(2β))² (Azar et
            al.; TRL computes Δ from per-token means: ``logp_reduction=mean``); ``hinge``
            relu(1 − βΔ) (SLiC).
        label_smoothing: ε of conservative DPO (sigmoid only): the preference labels are taken to
            be flipped with probability ε: −(1 − ε) log σ(βΔ) − ε log σ(−βΔ).

    Returns ``(losses, chosen_rewards, rejected_rewards)``; rewards are β·(log π − log π_ref),
    detached.
    """
    validate_dpo_settings(beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * delta)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------- log-probs
def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Log-probability of every target token, (B, T) float32; 0 where ``labels`` is ``ignore_index``.

    ``logits`` (B, T, V) and ``labels`` (B, T) are aligned (labels already shifted). Computed by
    ``cross_entropy(reduction="none")``, which never materialises a second (B, T, V) tensor for the gather.
    """
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T), ignore_index=ignore_index,
                          reduction="none")
    return -nll.view(B, T)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum",
                   ignore_index: int = -100) -> torch.Tensor:
    """One log-prob per sequence (B,): the ``sum`` or the ``mean`` over its scored tokens
    (a sequence without any scored token gets 0)."""
    if reduction not in LOGP_REDUCTIONS:
        raise ValueError(f"unknown logp_reduction {reduction!r}; valid choices: {list(LOGP_REDUCTIONS)}")
    total = token_logps(logits, labels, ignore_index).sum(dim=-1)
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum(dim=-1).clamp(min=1)


def stacked_pair(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels`` (2B, T): the chosen rows, then the rejected rows."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return ids, labels


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor], reduction: str = "sum"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probs (B,) each, from ONE forward pass over both."""
    ids, labels = stacked_pair(batch)
    return sequence_logps(model(ids), labels, reduction).chunk(2)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) inside the block, its own mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def reference_logps(reference: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    reduction: str | None = "sum", adapters_off: bool = False) -> torch.Tensor:
    """Log-probs of ``labels`` under the reference model: per token (B, T) when ``reduction`` is
    None, else per sequence (B,). Runs in eval mode without gradients; ``adapters_off`` runs
    ``reference`` with its LoRA updates switched off (the policy as its own reference)."""
    with eval_mode(reference), (disable_lora(reference) if adapters_off else nullcontext()):
        logits = reference(input_ids)
    if reduction is None:
        return token_logps(logits, labels)
    return sequence_logps(logits, labels, reduction)


def switch_off_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout of ``model`` to 0 (TRL's ``disable_dropout=True``): the policy's
    log-probs then match the reference's exactly at step 0."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, CausalSelfAttention):
            module.dropout = 0.0
    return model


def weights_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base weights (LoRA factors left out): name, shape and two sums of
    every parameter. Reference log-probs cached on disk are reused only for the same weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        t = p.detach().double()
        h.update(f"{name}{tuple(p.shape)}{float(t.sum()):.10e}{float(t.abs().sum()):.10e}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the task

def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` as it is now, without LoRA layers: the reference model
    of DPO and PPO (``reference: copy``)."""
    ref = copy.deepcopy(model)
    if getattr(ref, "lora_config", None) is not None:
        remove_lora(ref)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()

class DPOTask(ResponseGenerationMixin, GPTTask):
    """DPO on preference batches (``chosen_input_ids``, ``chosen_labels``, ``rejected_*``,
    ``index``: :class:`gptlab.data.preference.PreferenceDataModule`).

    Start it from the SFT model with ``init_from`` (a gptlab checkpoint or pretrained weights).

    Args:
        beta: β (TRL, the paper, the book: 0.1); higher keeps the policy closer to the reference.
        loss_type: ``sigmoid`` | ``ipo`` | ``hinge`` (see :func:`dpo_loss`).
        label_smoothing: conservative DPO's ε (sigmoid only).
        logp_reduction: ``sum`` | ``mean`` (see :data:`LOGP_REDUCTIONS`; the book: mean).
        reference: ``auto`` | ``copy`` | ``adapters_off`` | ``precomputed`` (module docstring).
        ref_logps_path: the precomputed reference log-probs file; None = ``ref_logps.safetensors``
            in the run folder. Reused when it matches the data and the starting weights.
        beta_scaled_rewards: log rewards as β·log-ratio (TRL); False logs the bare log-ratio (the book).
        disable_dropout: switch every dropout of the policy off (TRL's default).
        prompt_style, generate_on_test, max_new_tokens, temperature, top_k, top_p, responses_file,
            log_examples: test-stage generation (``responses.json``), as
            :class:`~gptlab.tasks.instruct.InstructionTask`.
        **kwargs: :class:`GPTTask` arguments (model, init_from, adapter, optimizer, ...).
    """

    task_name = "dpo"
    kind = "lm"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 logp_reduction: str = "sum", reference: str = "auto", ref_logps_path: str | None = None,
                 beta_scaled_rewards: bool = True, disable_dropout: bool = True, prompt_style: str = "alpaca",
                 generate_on_test: bool = True, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, responses_file: str = "responses.json",
                 log_examples: int = 3, **kwargs: Any):
        # validate before the (possibly large) backbone is built
        validate_dpo_settings(beta, loss_type, label_smoothing)
        if logp_reduction not in LOGP_REDUCTIONS:
            raise ValueError(f"unknown logp_reduction {logp_reduction!r}; valid choices: {list(LOGP_REDUCTIONS)}")
        if reference not in REFERENCES:
            raise ValueError(f"unknown reference {reference!r}; valid choices: {list(REFERENCES)}")
        if reference == "adapters_off" and not kwargs.get("adapter"):
            raise ValueError("task.reference=adapters_off needs an adapter (adapter=lora): without one the policy "
                             "has nothing to switch off; use reference=copy or reference=precomputed")
        get_prompt_style(prompt_style)
        super().__init__(**kwargs)
        if disable_dropout:
            switch_off_dropout(self.model)
        # not a submodule: kept out of state_dict and parameters(); moved/cast with the task (_apply)
        self.reference_model: nn.Module | None = None
        self.ref_logps: dict[str, dict[str, Any]] = {}  # split -> {"chosen", "rejected", "fingerprint"}
        self._policy_is_reference = True  # until the first optimizer step or a restored checkpoint
        self._policy_logps = None
        self.eval_metrics = StageMeans(METRICS)
        self.reset_responses()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "reference_model":  # bypass nn.Module registration on purpose
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def prediction_metadata(self) -> dict[str, Any]:
        """The prompt style, so the aligned model is prompted the way it was trained (``gptlab-chat``)."""
        return {"prompt_style": self.hparams.prompt_style}

    @property
    def reference_mode(self) -> str:
        """``copy``, ``adapters_off`` or ``precomputed`` (``auto`` resolved)."""
        mode = self.hparams.reference
        if mode == "auto":
            return "adapters_off" if self.hparams.adapter else "copy"
        return mode

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "DPOTask":
        # .to(device) / .half() / precision plugins reach the hidden reference too
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("reference_model") is not None:
            self.reference_model._apply(fn, *args, **kwargs)
        return self

    # ----------------------------------------------------------------- reference
    def setup(self, stage: str) -> None:
        # before a checkpoint is restored, so the copy holds the STARTING weights, never trained ones
        if self.reference_mode == "copy" and self.reference_model is None:
            self.reference_model = self.build_reference_copy()

    def build_reference_copy(self) -> nn.Module:
        return frozen_copy(self.model)

    def reference_pair_logps(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs (B,) of a batch of ``split``."""
        mode = self.reference_mode
        if mode == "precomputed":
            table = self.ref_logps.get(split)
            if table is None:
                raise RuntimeError(f"no precomputed reference log-probs for the {split!r} split")
            idx = batch["index"]  # the small table goes to the batch's device: no copy back, no sync
            return (table["chosen"].to(idx.device, non_blocking=True)[idx],
                    table["rejected"].to(idx.device, non_blocking=True)[idx])
        if mode == "copy" and self.reference_model is None:  # used outside a Trainer
            if not self._policy_is_reference:
                raise RuntimeError("the reference copy was never built and the policy has been trained")
            self.reference_model = self.build_reference_copy().to(self.device)
        model = self.reference_model if mode == "copy" else self.model
        ids, labels = stacked_pair(batch)
        return reference_logps(model, ids, labels, self.hparams.logp_reduction,
                               adapters_off=mode == "adapters_off").chunk(2)

    def ref_logps_file(self) -> Path:
        path = self.hparams.ref_logps_path
        return Path(path) if path else Path(self.trainer.default_root_dir) / "ref_logps.safetensors"

    def prepare_ref_logps(self, splits: tuple[str, ...]) -> None:
        """Make sure ``self.ref_logps`` holds every split in ``splits`` for the data of this run:
        from a restored checkpoint, else the cache file, else one pass of the starting model."""
        dm = getattr(self.trainer, "datamodule", None)
        if not (hasattr(dm, "fingerprint") and hasattr(dm, "ordered_dataloader")):
            raise ValueError("task.reference=precomputed needs a data module with fingerprint() and "
                             "ordered_dataloader() (data=preference)")
        wanted = {s: dm.fingerprint(s) for s in splits}
        missing = [s for s, fp in wanted.items() if self.ref_logps.get(s, {}).get("fingerprint") != fp]
        if not missing:
            return
        if not self._policy_is_reference:
            raise RuntimeError(f"reference log-probs for the {missing} split(s) of this data are not in the checkpoint, "
                               "and the policy has been trained, so they cannot be computed again; resume with the "
                               "same data settings, or start from the reference weights")
        path = self.ref_logps_file()
        weights = weights_fingerprint(self.model)
        missing = self._load_ref_logps_file(path, {s: wanted[s] for s in missing}, weights)
        if missing:
            start = time.perf_counter()
            for split in missing:
                self.ref_logps[split] = self._compute_ref_logps(dm, split) | {"fingerprint": wanted[split]}
            rank_zero_info(f"reference log-probs of {missing} precomputed in {time.perf_counter() - start:.1f} s")
            if self.trainer.is_global_zero:
                self._save_ref_logps_file(path, weights)
                rank_zero_info(f"reference log-probs cached in {path}")

    @torch.no_grad()
    def _compute_ref_logps(self, dm: Any, split: str) -> dict[str, torch.Tensor]:
        chosen, rejected = [], []
        with self.trainer.precision_plugin.forward_context():
            for batch in dm.ordered_dataloader(split):
                batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                ids, labels = stacked_pair(batch)
                c, r = reference_logps(self.model, ids, labels, self.hparams.logp_reduction,
                                       adapters_off=True).chunk(2)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        empty = torch.zeros(0)
        return {"chosen": torch.cat(chosen) if chosen else empty, "rejected": torch.cat(rejected) if rejected else empty}

    def _save_ref_logps_file(self, path: Path, weights: str) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{s}.{side}": t[side].contiguous() for s, t in self.ref_logps.items() for side in ("chosen", "rejected")}
        meta = {"format": "pt", "gptlab_ref_logps": REF_LOGPS_FORMAT, "logp_reduction": self.hparams.logp_reduction,
                "weights": weights, "init_from": str(self.hparams.init_from),
                "fingerprints": json.dumps({s: t["fingerprint"] for s, t in self.ref_logps.items()})}
        save_file(tensors, str(path), metadata=meta)

    def _load_ref_logps_file(self, path: Path, wanted: dict[str, str], weights: str) -> list[str]:
        """Take the splits of ``wanted`` that the file at ``path`` holds for these weights, this
        reduction and the same data; returns the splits still missing."""
        if not path.is_file():
            return list(wanted)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("gptlab_ref_logps") != REF_LOGPS_FORMAT or meta.get("weights") != weights or \
                    meta.get("logp_reduction") != self.hparams.logp_reduction:
                rank_zero_info(f"{path}: cached reference log-probs are for other weights or settings; recomputing")
                return list(wanted)
            fingerprints = json.loads(meta.get("fingerprints", "{}"))
            reused = [s for s, fp in wanted.items() if fingerprints.get(s) == fp]
            for s in reused:
                self.ref_logps[s] = {"chosen": f.get_tensor(f"{s}.chosen"), "rejected": f.get_tensor(f"{s}.rejected"),
                                     "fingerprint": wanted[s]}
        if reused:
            rank_zero_info(f"reference log-probs of {reused} reused from {path}")
        return [s for s in wanted if s not in reused]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference_mode == "precomputed":
            self.prepare_ref_logps(("train", "val", "test"))

    def on_validation_start(self) -> None:
        if self.reference_mode == "precomputed":
            self.prepare_ref_logps(("val",))

    def on_test_start(self) -> None:
        if self.reference_mode == "precomputed":
            self.prepare_ref_logps(("test",))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._policy_is_reference = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ref_logps:
            checkpoint["dpo_ref_logps"] = {"logp_reduction": self.hparams.logp_reduction, "splits": self.ref_logps}
        if self.reference_model is not None and not self.hparams.init_from:
            # a reference built from scratch cannot be rebuilt from init_from on resume
            checkpoint["dpo_reference_state"] = self.reference_model.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._policy_is_reference = False
        stored = checkpoint.get("dpo_ref_logps")
        if stored and stored["logp_reduction"] == self.hparams.logp_reduction:
            self.ref_logps = {s: dict(t) for s, t in stored["splits"].items()}
        state = checkpoint.get("dpo_reference_state")
        if state is not None and self.reference_mode == "copy":
            if self.reference_model is None:
                self.reference_model = self.build_reference_copy()
            self.reference_model.load_state_dict(state)

    # ----------------------------------------------------------------- steps
    def policy_pair_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) policy log-probs (B,), one forward; compiled when ``compile=true``."""
        if not self.hparams.compile:
            return pair_logps(self.model, batch, self.hparams.logp_reduction)
        if self._policy_logps is None:
            self._policy_logps = torch.compile(pair_logps)
        return self._policy_logps(self.model, batch, self.hparams.logp_reduction)

    def dpo_metrics(self, batch: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
        """The loss (mean over the batch) and TRL's reward/log-prob metrics of one batch."""
        hp = self.hparams
        policy_chosen, policy_rejected = self.policy_pair_logps(batch)
        ref_chosen, ref_rejected = self.reference_pair_logps(batch, split)
        losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                            hp.beta, hp.loss_type, hp.label_smoothing)
        if not hp.beta_scaled_rewards:
            chosen_rewards, rejected_rewards = chosen_rewards / hp.beta, rejected_rewards / hp.beta
        return {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean()}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dpo_metrics(batch, "train")["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        metrics = self.dpo_metrics(batch, "train")
        B = batch["chosen_input_ids"].size(0)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=B,
                     prog_bar=name in PROGRESS_BAR)
        return metrics["loss"]

    def _accumulate(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        self.eval_metrics.update(stage, self.dpo_metrics(batch, stage), weight=batch["chosen_input_ids"].size(0))

    def on_validation_epoch_start(self) -> None:
        self.eval_metrics.reset("val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate("val", batch)

    def on_validation_epoch_end(self) -> None:
        self.eval_metrics.log(self, "val", prog_bar=PROGRESS_BAR)

    def on_test_epoch_start(self) -> None:
        self.eval_metrics.reset("test")
        self.reset_responses()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accumulate("test", batch)
        if self.hparams.generate_on_test:
            self.collect_responses(batch)

    def on_test_epoch_end(self) -> None:
        self.eval_metrics.log(self, "test")
        if self.hparams.generate_on_test:
            self.flush_responses()
