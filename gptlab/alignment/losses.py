"""The objectives of preference tuning and RLHF, on plain tensors.

* :func:`dpo_loss`: Direct Preference Optimization (Rafailov et al. 2023) and its ipo / hinge /
  conservative variants;
* :func:`bradley_terry_loss`: the pairwise loss of reward models (TRL's RewardTrainer);
* :func:`clipped_policy_loss`, :func:`clipped_value_loss`: PPO's objectives (Schulman et al. 2017).

Settings are validated once, where a task is built (:data:`DPO_RULES`), never per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from gptlab.alignment.masked import masked_mean
from gptlab.checks import Problem, choice, number

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
DPO_RULES = {"beta": number(gt=0), "loss_type": choice(*DPO_LOSS_TYPES, name="DPO loss_type"),
             "label_smoothing": number(ge=0, lt=0.5)}
"""The settings of :func:`dpo_loss`, as DPO's config names them."""


def dpo_relations(node: Mapping[str, Any]) -> list[Problem]:
    """What is wrong between :func:`dpo_loss`'s settings: conservative DPO's ε with another loss."""
    smoothing, loss_type = node.get("label_smoothing"), node.get("loss_type")
    if smoothing and loss_type != "sigmoid" and loss_type in DPO_LOSS_TYPES:
        return [Problem(f"{{node}}label_smoothing={smoothing!r}: expected 0 with {{node}}loss_type={loss_type!r} "
                        "(label smoothing applies to loss_type=sigmoid only)",
                        f"label_smoothing applies to loss_type=sigmoid only (got loss_type={loss_type!r})")]
    return []


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, reward_scale: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and implicit rewards, all (B,).

    Δ = [log π(y⁺) − log π_ref(y⁺)] − [log π(y⁻) − log π_ref(y⁻)].

    Args:
        policy_*_logps, ref_*_logps: (B,) sequence log-probs of the chosen / rejected responses.
        beta: β > 0, how far the policy may move from the reference (higher = closer).
        loss_type: ``sigmoid`` −log σ(βΔ) (the paper, the book); ``ipo`` (Δ − 1/(2β))² (Azar et al.;
            TRL computes Δ from per-token means: ``logp_reduction=mean``); ``hinge`` relu(1 − βΔ) (SLiC).
        label_smoothing: ε in [0, 0.5) of conservative DPO (sigmoid only): the preference labels are
            taken to be flipped with probability ε: −(1 − ε) log σ(βΔ) − ε log σ(−βΔ).

    Settings are not checked here (once per batch would be once too often): a task validates them
    when it is built (:data:`DPO_RULES`, :func:`dpo_relations`).

    Returns ``(losses, chosen_rewards, rejected_rewards)``; rewards are ``reward_scale``·(log π −
    log π_ref), detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * delta)
    scale = beta if reward_scale is None else reward_scale
    return losses, scale * chosen_logratios.detach(), scale * rejected_logratios.detach()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Mean pairwise Bradley–Terry loss −log σ(r⁺ − r⁻ − margin) of rewards (B,), plus
    ``center_rewards_coefficient`` · mean((r⁺ + r⁻)²) when set (TRL's RewardTrainer)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


@dataclass
class PolicyLossStats:
    """What :func:`clipped_policy_loss` reports besides the loss (detached scalars)."""

    clipfrac: torch.Tensor
    """Share of tokens where the clipped term was the one used."""
    approxkl: torch.Tensor
    """½·mean((log π − log π_old)²): how far this update moved the policy from the rollout's."""
    ratio: torch.Tensor
    """Mean probability ratio π/π_old (≈ 1 while updates stay small)."""


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO's clipped surrogate, as a loss: mean over real tokens of
    max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(log π − log π_old); all inputs (B, R)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = PolicyLossStats(clipfrac=masked_mean((clipped > unclipped).to(loss.dtype), mask),
                                approxkl=0.5 * masked_mean(log_ratio ** 2, mask),
                                ratio=masked_mean(ratio, mask))
    return loss, stats


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip_range: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """½·mean over real tokens of max((V − R)², (clip(V, V_old ± ε_v) − R)²) and the share of
    tokens where the clipped term was larger (``val/clipfrac``). ``clip_range`` None: no clipping."""
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(loss.dtype), mask)
    return loss, clipfrac


__all__ = ["DPO_LOSS_TYPES", "DPO_RULES", "dpo_relations", "dpo_loss", "bradley_terry_loss", "PolicyLossStats",
           "clipped_policy_loss", "clipped_value_loss"]
