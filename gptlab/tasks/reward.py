"""Reward models (the book's chapter 8; TRL's RewardTrainer): the GPT backbone with its
language-model head swapped for a scalar head, read at the last real token of ``prompt + response``
(the classification pooling of :mod:`gptlab.tasks.classify`), trained on preference pairs with the
pairwise Bradley–Terry loss

    loss = −log σ(r(x, y⁺) − r(x, y⁻) − margin)  [+ c · mean((r⁺ + r⁻)²)]

where ``margin`` is an optional per-pair column of the data and c is ``center_rewards_coefficient``
(TRL's; it keeps the rewards centred on 0). Logs ``loss``, ``accuracy`` (share of pairs with
r⁺ > r⁻), ``rewards/chosen``, ``rewards/rejected`` and ``margin`` (mean r⁺ − r⁻) under ``train/``,
``val/``, ``test/``. With ``adapter=lora`` the new head trains fully and is saved in the adapter file.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from gptlab.data.instruct import get_prompt_style
from gptlab.model.gpt import GPT
from gptlab.model.lora import TARGETS
from gptlab.tasks.base import GPTTask
from gptlab.tasks.classify import class_logits
from gptlab.tasks.metrics import StageMeans
from gptlab.tokenizer import get_tokenizer

METRICS = ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin")


def add_reward_head(model: GPT) -> GPT:
    """Replace ``model.out_head`` by a scalar head (D -> 1, with a bias), initialised as in
    OpenAI's reward models: weight ~ N(0, 1/sqrt(D + 1)), bias 0. Returns ``model``."""
    old = model.out_head
    D = model.config.emb_dim
    head = nn.Linear(D, 1, device=old.weight.device, dtype=old.weight.dtype)
    nn.init.normal_(head.weight, std=1 / math.sqrt(D + 1))
    nn.init.zeros_(head.bias)
    model.out_head = head
    return model


def reward_scores(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One scalar reward per sequence (B,) from a backbone with a scalar head (:func:`add_reward_head`),
    read at the last real token of each right-padded sequence (``attention_mask`` 1 = real)."""
    return class_logits(model, input_ids, attention_mask, "last_token").squeeze(-1)


def pair_rewards(model: GPT, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards (B,) of a preference batch, from ONE forward pass over both."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    return reward_scores(model, ids, mask).chunk(2)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Mean pairwise Bradley–Terry loss −log σ(r⁺ − r⁻ − margin), plus
    ``center_rewards_coefficient`` · mean((r⁺ + r⁻)²) when set (TRL's RewardTrainer)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


@torch.no_grad()
def score_responses(model: GPT, entries: Sequence[Mapping[str, Any]], prompt_style: str = "alpaca",
                    response_key: str = "model_response", batch_size: int = 16, max_length: int | None = None,
                    pad_id: int | None = None, tokenizer: Any = None) -> list[float]:
    """Rewards of ``entry[response_key]`` as the answer to each entry's prompt (its ``instruction``
    and ``input`` in ``prompt_style``), tokenized exactly as in training (prompt ids + response ids),
    keeping the first ``max_length`` tokens (None = the model's context length); ``pad_id`` None =
    the tokenizer's ``<|endoftext|>``."""
    style = get_prompt_style(prompt_style)
    tok = tokenizer or get_tokenizer()
    pad_id = tok.eot_token if pad_id is None else pad_id
    device = next(model.parameters()).device
    limit = min(max_length or model.config.context_length, model.config.context_length)
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(entries), batch_size):
            part = entries[start:start + batch_size]
            prompts = tok.encode_ordinary_batch([style.prompt(e) for e in part])
            answers = tok.encode_ordinary_batch([e[response_key] for e in part])
            rows = [torch.tensor((p + a)[:limit], dtype=torch.long) for p, a in zip(prompts, answers)]
            ids = pad_sequence(rows, batch_first=True, padding_value=pad_id).to(device)  # (B, T)
            lengths = torch.tensor([len(r) for r in rows], device=device)
            mask = (torch.arange(ids.size(1), device=device)[None, :] < lengths[:, None]).long()
            scores += reward_scores(model, ids, mask).float().cpu().tolist()
    finally:
        model.train(was_training)
    return scores


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


class RewardModelTask(GPTTask):
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

    def __init__(self, center_rewards_coefficient: float | None = None, prompt_style: str = "alpaca",
                 **kwargs: Any):
        if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient={center_rewards_coefficient} must be >= 0")
        get_prompt_style(prompt_style)
        if kwargs.get("adapter"):
            # the effective settings go into hparams, so a checkpoint's adapter is rebuilt the same way
            kwargs["adapter"] = reward_adapter(kwargs["adapter"])
        super().__init__(**kwargs)
        self.eval_metrics = StageMeans(METRICS)

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

    def reward_metrics(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        chosen, rejected = pair_rewards(self.model, batch)
        loss = reward_loss(chosen, rejected, batch.get("margin"), self.hparams.center_rewards_coefficient)
        chosen, rejected = chosen.detach().float(), rejected.detach().float()
        return {"loss": loss, "accuracy": (chosen > rejected).float().mean(), "rewards/chosen": chosen.mean(),
                "rewards/rejected": rejected.mean(), "margin": (chosen - rejected).mean()}

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.reward_metrics(batch)["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        metrics = self.reward_metrics(batch)
        B = batch["chosen_input_ids"].size(0)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=B,
                     prog_bar=name in ("loss", "accuracy"))
        return metrics["loss"]

    def _accumulate(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        self.eval_metrics.update(stage, self.reward_metrics(batch), weight=batch["chosen_input_ids"].size(0))

    def on_validation_epoch_start(self) -> None:
        self.eval_metrics.reset("val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate("val", batch)

    def on_validation_epoch_end(self) -> None:
        self.eval_metrics.log(self, "val", prog_bar=("loss", "accuracy"))

    def on_test_epoch_start(self) -> None:
        self.eval_metrics.reset("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accumulate("test", batch)

    def on_test_epoch_end(self) -> None:
        self.eval_metrics.log(self, "test")
