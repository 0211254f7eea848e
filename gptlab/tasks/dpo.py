"""Direct Preference Optimization (Rafailov et al. 2023; the book's chapter 7 DPO bonus).

The policy (the model being tuned) learns to raise the log-probability of the chosen response
over the rejected one *relative to a reference model* (the starting point, usually the SFT model):

    Δ = [log π(y⁺|x) − log π_ref(y⁺|x)] − [log π(y⁻|x) − log π_ref(y⁻|x)]
    sigmoid (paper, book):  −log σ(βΔ)          ipo: (Δ − 1/(2β))²          hinge: relu(1 − βΔ)

Chosen and rejected go through the model in ONE forward pass on the stacked [chosen; rejected]
batch (TRL's concatenated forward). The reference comes one of three ways (``reference``,
:mod:`gptlab.alignment.reference`):

* ``copy``: a frozen copy of the starting model (the book; twice the weights in memory);
* ``adapters_off``: with ``adapter=lora``, the policy itself with its LoRA updates switched off:
  no second copy (PEFT's ``disable_adapter``);
* ``precomputed``: one pass before training stores the reference log-probs of every pair (TRL's
  ``precompute_ref_log_probs``), cached in ``ref_logps.safetensors`` beside the run and inside
  every checkpoint (a resumed run reuses them); no reference model is kept at all.

``auto`` picks ``adapters_off`` with an adapter, else ``copy``. All three give the same loss. The
arithmetic (log-probs, the loss) is :mod:`gptlab.alignment`'s.

Metrics use TRL's names under ``train/``, ``val/``, ``test/``: ``loss``, ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (share of pairs with chosen reward > rejected: 0 at
step 0), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gptlab.alignment.logprobs import LOGP_REDUCTIONS, pair_logps
from gptlab.alignment.losses import DPO_RULES, dpo_loss, dpo_relations
from gptlab.alignment.reference import REFERENCE_MODES, reference_view, switch_off_dropout, weights_fingerprint
from gptlab.checks import Problem, boolean, choice, text
from gptlab.tasks.base import PairwiseTask
from gptlab.tasks.mixins import ReferenceMixin, ResponseGenerationMixin

REFERENCES = ("auto", *REFERENCE_MODES)
SIDES = ("chosen", "rejected")


class DPOTask(ResponseGenerationMixin, ReferenceMixin, PairwiseTask):
    """DPO on preference batches (``chosen_input_ids``, ``chosen_labels``, ``rejected_*``,
    ``index``: :class:`gptlab.data.preference.PreferenceDataModule`).

    Start it from the SFT model with ``init_from`` (a gptlab checkpoint or pretrained weights).

    Args:
        beta: β (TRL, the paper, the book: 0.1); higher keeps the policy closer to the reference.
        loss_type: ``sigmoid`` | ``ipo`` | ``hinge`` (see :func:`gptlab.alignment.losses.dpo_loss`).
        label_smoothing: conservative DPO's ε (sigmoid only).
        logp_reduction: ``sum`` | ``mean`` (see :data:`gptlab.alignment.logprobs.LOGP_REDUCTIONS`;
            the book: mean).
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
    metrics = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
    progress_bar = ("loss", "rewards/accuracies")
    RULES = {**DPO_RULES, "logp_reduction": choice(*LOGP_REDUCTIONS, name="logp_reduction"),
             "reference": choice(*REFERENCES, name="reference"), "ref_logps_path": text(optional=True),
             "beta_scaled_rewards": boolean(), "disable_dropout": boolean()}

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        return super().check_relations(node) + dpo_relations(node)

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 logp_reduction: str = "sum", reference: str = "auto", ref_logps_path: str | None = None,
                 beta_scaled_rewards: bool = True, disable_dropout: bool = True, prompt_style: str = "alpaca",
                 generate_on_test: bool = True, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, responses_file: str = "responses.json",
                 log_examples: int = 3, **kwargs: Any):
        super().__init__(**kwargs)  # checks every argument (RULES) before the backbone is built
        if loss_type == "ipo" and logp_reduction == "sum":
            rank_zero_warn("task.loss_type=ipo with task.logp_reduction=sum: IPO's target margin 1/(2*beta) is set "
                           "for per-token mean log-probs (TRL averages them for ipo); over summed log-probs the "
                           "margin grows with response length. Set task.logp_reduction=mean to follow TRL")
        if disable_dropout:
            switch_off_dropout(self.model)
        self.init_reference(reference, logps_tag=logp_reduction)
        self.reset_responses()

    @property
    def ref_logps(self) -> dict[str, dict[str, Any]]:
        """The precomputed reference log-probs: split -> {``chosen``, ``rejected``, ``fingerprint``}."""
        return self.reference.logps

    # ----------------------------------------------------------------- reference
    def setup(self, stage: str) -> None:
        self.build_reference()

    def reference_pair_logps(self, batch: Mapping[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs (B,) of a batch of ``split``."""
        if self.reference_mode == "precomputed":
            return self.reference.lookup(split, batch["index"], SIDES, self.device)
        with self.reference.active(self.model) as model:
            return pair_logps(model, batch, self.hparams.logp_reduction)

    def ref_logps_file(self) -> Path:
        path = self.hparams.ref_logps_path
        return Path(path) if path else Path(self.trainer.default_root_dir) / "ref_logps.safetensors"

    def prepare_ref_logps(self, splits: tuple[str, ...]) -> None:
        """Make sure the reference holds the log-probs of every split in ``splits`` for the data of
        this run: from a restored checkpoint, else the cache file, else one pass of the starting model."""
        dm = getattr(self.trainer, "datamodule", None)
        if not (hasattr(dm, "fingerprint") and hasattr(dm, "ordered_dataloader")):
            raise ValueError("task.reference=precomputed needs a data module with fingerprint() and "
                             "ordered_dataloader() (data=preference)")
        wanted = {s: dm.fingerprint(s) for s in splits}
        missing = self.reference.missing_splits(wanted)
        if not missing:
            return
        if self.reference.policy_trained:
            raise RuntimeError(f"reference log-probs for the {missing} split(s) of this data are not in the checkpoint, "
                               "and the policy has been trained, so they cannot be computed again; resume with the "
                               "same data settings, or start from the reference weights")
        path = self.ref_logps_file()
        weights = weights_fingerprint(self.model)
        still, why = self.reference.load_logps_file(path, {s: wanted[s] for s in missing}, weights, SIDES)
        if why:
            rank_zero_info(why)
        reused = [s for s in missing if s not in still]
        if reused:
            rank_zero_info(f"reference log-probs of {reused} reused from {path}")
        if still:
            start = time.perf_counter()
            for split in still:
                self.reference.logps[split] = self._compute_ref_logps(dm, split) | {"fingerprint": wanted[split]}
            rank_zero_info(f"reference log-probs of {still} precomputed in {time.perf_counter() - start:.1f} s")
            if self.trainer.is_global_zero:
                self.reference.save_logps_file(path, weights, init_from=str(self.hparams.init_from))
                rank_zero_info(f"reference log-probs cached in {path}")

    @torch.no_grad()
    def _compute_ref_logps(self, dm: Any, split: str) -> dict[str, torch.Tensor]:
        """One pass of the starting policy (its adapters off) over ``split``, in order."""
        chosen, rejected = [], []
        with self.trainer.precision_plugin.forward_context():
            for batch in dm.ordered_dataloader(split):
                batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                c, r = self.starting_pair_logps(batch)
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
        empty = torch.zeros(0)
        return {"chosen": torch.cat(chosen) if chosen else empty, "rejected": torch.cat(rejected) if rejected else empty}

    def starting_pair_logps(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probs (B,) of the starting policy: the policy in eval mode, its LoRA
        switched off (what the reference of every mode computes before training)."""
        with reference_view(self.model, adapters_off=True) as model:
            return pair_logps(model, batch, self.hparams.logp_reduction)

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

    # ----------------------------------------------------------------- steps
    def pair_metrics(self, batch: Mapping[str, Any], split: str) -> dict[str, torch.Tensor]:
        """The loss (mean over the batch) and TRL's reward/log-prob metrics of one batch."""
        hp = self.hparams
        policy_chosen, policy_rejected = self.compiled(pair_logps)(self.model, batch, hp.logp_reduction)
        ref_chosen, ref_rejected = self.reference_pair_logps(batch, split)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, hp.beta, hp.loss_type, hp.label_smoothing,
            reward_scale=None if hp.beta_scaled_rewards else 1.0)
        return {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean()}

    # ----------------------------------------------------------------- test: metrics + answers
    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.reset_responses()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        if self.hparams.generate_on_test:
            self.collect_responses(batch)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.hparams.generate_on_test:
            self.flush_responses()


__all__ = ["DPOTask", "REFERENCES"]
