"""Task heads on the GPT backbone that read one vector per sequence: a classifier's ``num_classes``
logits (book chapter 6) and a reward model's scalar (book chapter 8, TRL's RewardTrainer). The head
replaces ``out_head`` and reads only the pooled hidden state, never all T positions."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptlab.model.gpt import GPT

POOLINGS = ("last_token", "last_position", "mean")
"""Which hidden state(s) the head reads: ``last_token`` the last real (unpadded) token, which under
causal attention is the only one that has seen the whole text; ``last_position`` the last column
(the book's ``[:, -1, :]``: a pad when a shorter text is right-padded); ``mean`` the average over
the real tokens."""


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pooling: str = "last_token") -> torch.Tensor:
    """One vector per sequence from hidden states (B, T, D) -> (B, D).

    ``attention_mask`` (B, T), 1 = real token, right padding; None = every position is real.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; valid choices: {list(POOLINGS)}")
    if pooling == "last_position" or (attention_mask is None and pooling == "last_token"):
        return hidden[:, -1]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.device)
    if pooling == "last_token":
        last = (mask.sum(dim=1) - 1).clamp(min=0)  # (B,) index of the last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def class_logits(model: GPT, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pooling: str = "last_token") -> torch.Tensor:
    """Class logits (B, num_classes) of a backbone whose ``out_head`` is a classifier: the head
    reads only the pooled vector, never all T positions."""
    return model.out_head(pool_hidden(model.hidden_states(input_ids), attention_mask, pooling))


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


__all__ = ["POOLINGS", "pool_hidden", "class_logits", "add_reward_head", "reward_scores"]
