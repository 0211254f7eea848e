"""Reward models (the book's chapter 8; TRL's RewardTrainer): the GPT backbone with its
language-model head swapped for a scalar head (:func:`gptlab.model.heads.add_reward_head`), read at
the last real token of ``prompt + response``, trained on preference pairs with the pairwise
Bradley–Terry loss (:func:`gptlab.alignment.losses.bradley_terry_loss`)

    loss = −log σ(r(x, y⁺) − r(x, y⁻) − margin)  [+ c · mean((r⁺ + r⁻)²)]

where ``margin`` is an optional per-pair column of the data and c is ``center_rewards_coefficient``
(TRL's; it keeps the rewards centred on 0). Logs ``loss``, ``accuracy`` (share of pairs with
r⁺ > r⁻), ``rewards/chosen``, ``rewards/rejected`` and ``margin`` (mean r⁺ − r⁻) under ``train/``,
``val/``, ``test/``. With ``adapter=lora`` the new head trains fully and is saved in the adapter file.
Scoring responses with a trained reward model: :func:`gptlab.inference.score_responses`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from gptlab.alignment.logprobs import stacked_pair
from gptlab.alignment.losses import bradley_terry_loss
from gptlab.checks import choice, number
from gptlab.data.prompt_styles import PROMPT_STYLES
from gptlab.model.heads import add_reward_head, reward_scores
from gptlab.model.lora import TARGETS
from gptlab.tasks.base import PairwiseTask


def reward_adapter(adapter: Mapping[str, Any]) -> dict[str, Any]:
    """The ``adapter`` config for a reward model: LoRA on the backbone, while the new scalar head
    trains fully (``train_extra``) so the adapter file holds it (TRL's ``modules_to_save=["score"]``);
    LoRA on the head itself is dropped."""
    adapter = dict(adapter)
    targets = [t for t in adapter.get("targets", TARGETS) if t != "head"]
    if not targets:
        raise ValueError("adapter.targets names only the head; a reward model's head trains fully, "
                         "give LoRA targets in the backbone (q, k, v, attn_proj, mlp_fc, mlp_proj)")
    adapter["targets"] = targets
    adapter["train_extra"] = list(dict.fromkeys([*adapter.get("train_extra", ()), "out_head"]))
    return adapter


class RewardModelTask(PairwiseTask):
    """A reward model on preference batches (:class:`gptlab.data.preference.PreferenceDataModule`;
    an optional ``margin`` per pair is used when the data has one).

    Start it from the SFT model (``init_from`` a gptlab checkpoint or pretrained weights); every
    weight trains, or with ``adapter=lora`` the LoRA weights and the new head.

    Args:
        center_rewards_coefficient: weight of mean((r⁺ + r⁻)²) (TRL's; None/0 = off, TRL's docs
            suggest 0.01).
        prompt_style: the data's prompt style, stored for scoring responses later (``gptlab-reward``).
        **kwargs: :class:`GPTTask` arguments (model, init_from, adapter, optimizer, ...).
    """

    task_name = "reward_model"
    kind = "reward"
    metrics = ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin")
    progress_bar = ("loss", "accuracy")
    RULES = {"center_rewards_coefficient": number(ge=0, optional=True),
             "prompt_style": choice(*PROMPT_STYLES, name="prompt style")}

    def __init__(self, center_rewards_coefficient: float | None = None, prompt_style: str = "alpaca",
                 **kwargs: Any):
        if kwargs.get("adapter"):
            # the effective settings go into hparams, so a checkpoint's adapter is rebuilt the same way
            kwargs["adapter"] = reward_adapter(kwargs["adapter"])
        super().__init__(**kwargs)

    def configure_backbone(self) -> None:
        add_reward_head(self.model)
        for p in self.model.parameters():
            p.requires_grad_(True)

    def prediction_metadata(self) -> dict[str, Any]:
        """How ``gptlab-reward`` writes a response after its prompt (also in adapter files)."""
        return {"prompt_style": self.hparams.prompt_style, "pooling": "last_token"}

    # ----------------------------------------------------------------- steps
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of right-padded sequences (B, T)."""
        return reward_scores(self.model, input_ids, attention_mask)

    def pair_rewards(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards (B,) of a preference batch, from ONE forward pass over both."""
        ids, mask = stacked_pair(batch, "attention_mask")
        return reward_scores(self.model, ids, mask).chunk(2)

    def pair_metrics(self, batch: Mapping[str, Any], split: str) -> dict[str, torch.Tensor]:
        chosen, rejected = self.pair_rewards(batch)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"), self.hparams.center_rewards_coefficient)
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        return {"loss": loss, "accuracy": (chosen > rejected).float().mean(), "rewards/chosen": chosen.mean(),
                "rewards/rejected": rejected.mean(), "margin": (chosen - rejected).mean()}


__all__ = ["RewardModelTask", "reward_adapter"]
