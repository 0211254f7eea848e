"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) and its variants, on plain tensors:
DAPO's decoupled clipping and token-level aggregation (Yu et al. 2025), Dr. GRPO's unscaled advantages
and constant normaliser (Liu et al. 2025), GSPO's sequence-level importance ratio (Zheng et al. 2025).

Shapes: N = B·G completions, G per prompt in consecutive rows (``b·G … b·G + G − 1``, the layout of
:func:`gptlab.alignment.rollout.sample_completions`); R completion positions; ``mask`` (N, R) bool marks
the real completion tokens. Formulas and defaults follow TRL 1.16's ``GRPOTrainer`` except where a
docstring says otherwise.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from gptlab.alignment.kl import kl_estimate
from gptlab.alignment.masked import masked_mean
from gptlab.checks import Problem, choice, integer, number, problem

SCALE_REWARDS = ("group", "batch", "none")
"""How :func:`group_advantages` scales ``reward − group mean``: by the group's std (GRPO, TRL's default),
by the whole batch's std, or not at all (Dr. GRPO)."""
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
"""How :func:`grpo_loss` aggregates per-token losses (see there); TRL's default is ``dapo``."""
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""``token``: one ratio π/π_old per token (GRPO); ``sequence``: one per completion, the exponential of
the mean per-token log-ratio (GSPO)."""
ADVANTAGE_EPS = 1e-4
"""Added to the std before dividing (TRL)."""

GRPO_RULES = {"num_generations": integer(ge=2, name="task.num_generations",
                                         why="GRPO compares completions of the same prompt: a group of one has "
                                             "no baseline (every advantage is 0)"),
              "scale_rewards": choice(*SCALE_REWARDS, name="scale_rewards"),
              "loss_type": choice(*GRPO_LOSS_TYPES, name="GRPO loss_type"),
              "importance_sampling_level": choice(*IMPORTANCE_SAMPLING_LEVELS, name="importance_sampling_level"),
              "beta": number(ge=0), "epsilon": number(gt=0, lt=1), "epsilon_high": number(gt=0, optional=True),
              "num_iterations": integer(ge=1)}
"""The settings of :func:`group_advantages` and :func:`grpo_loss`, as GRPO's config names them."""


def group_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group",
                     eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """One advantage per completion (N,): its reward minus the mean reward of its group of
    ``num_generations`` consecutive rows, divided by ``std + eps`` where ``scale`` is ``group`` (the
    group's std) or ``batch`` (the std of all N rewards), not divided for ``none``. The std is
    Bessel-corrected (``torch.std``), as TRL's; a group whose rewards are all equal gets 0.

    ``rewards`` (N,): whole groups, N divisible by ``num_generations`` (a task repeats each prompt
    ``num_generations`` times, so its batches always are).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}; "
                         "give G completions of every prompt, in consecutive rows")
    groups = rewards.view(-1, num_generations)  # (B, G)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        return advantages / (groups.std(dim=1).repeat_interleave(num_generations) + eps)
    if scale == "batch":
        return advantages / (rewards.std() + eps)
    if scale == "none":
        return advantages
    raise ValueError(f"unknown scale_rewards {scale!r}; valid choices: {list(SCALE_REWARDS)}")


def group_reward_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """The Bessel-corrected std of each group's rewards (B,) (TRL's ``reward_std`` averages it;
    ``frac_reward_zero_std`` is the share of groups where it is 0: no learning signal)."""
    return rewards.view(-1, num_generations).std(dim=1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, loss_type: str = "dapo", max_completion_length: int | None = None,
              importance_sampling_level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of a batch of completions, and its statistics.

    Per token t of completion i: ρ = exp(log π − log π_old) (``sequence``: the same ρ_i for every token,
    exp of the masked mean log-ratio of completion i), and

        ℓ_it = −min(ρ·A_i, clip(ρ, 1 − ε_low, 1 + ε_high)·A_i) + β·k3_it,

    with k3 = exp(ref − log π) − (ref − log π) − 1 (:func:`gptlab.alignment.kl.kl_estimate`) when
    β > 0. The KL term is DeepSeekMath's, *without* TRL 1.16's importance weight ρ on it
    (``use_bias_correction_kl``): with ``num_iterations`` 1 both have the same value; their gradients
    differ by ρ's own. Aggregation by ``loss_type`` (:data:`GRPO_LOSS_TYPES`):

    * ``grpo``: mean over each completion's tokens, then mean over completions (shorter completions
      weigh more per token: the length bias Dr. GRPO names);
    * ``bnpo`` / ``dapo``: sum over all real tokens / their number (on one process with one batch per
      step they are the same; TRL's ``dapo`` counts tokens over accumulated batches and processes);
    * ``dr_grpo``: sum over all real tokens / (N × ``max_completion_length``; None = R).

    Args:
        logps: (N, R) log π of the completion tokens, with gradients.
        old_logps: (N, R) log π_old, the policy that sampled them (detached).
        advantages: (N,) one per completion (:func:`group_advantages`).
        mask: (N, R) bool, the tokens that count (a completion masked out entirely adds nothing).
        ref_logps: (N, R) log π_ref; needed when ``beta`` > 0.

    Returns ``(loss, metrics)``; metrics are detached scalars with TRL's names: ``kl`` (masked mean
    k3; only when β > 0), ``clip_ratio/low_mean`` (share of tokens with ρ < 1 − ε_low and A < 0),
    ``clip_ratio/high_mean`` (ρ > 1 + ε_high and A > 0), ``clip_ratio/region_mean`` (either).
    """
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, mask, dim=1)[:, None]  # (N, 1), broadcast over tokens
    elif importance_sampling_level != "token":
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; valid choices: "
                         f"{list(IMPORTANCE_SAMPLING_LEVELS)}")
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(ratio.dtype)  # (N, 1)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
    per_token = per_token.expand_as(logps)
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_loss with beta > 0 needs ref_logps (the reference model's log-probs)")
        kl = kl_estimate(logps, ref_logps, "k3")
        per_token = per_token + beta * kl
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    kept = torch.where(mask, per_token, zero)
    if loss_type == "grpo":
        loss = (kept.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = kept.sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = kept.sum() / (mask.size(0) * (max_completion_length or mask.size(1)))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid choices: {list(GRPO_LOSS_TYPES)}")
    with torch.no_grad():
        ratio_t = ratio.detach().expand_as(logps)
        low = (ratio_t < 1 - epsilon_low) & (adv < 0)
        high = (ratio_t > 1 + epsilon_high) & (adv > 0)
        metrics = {"clip_ratio/low_mean": masked_mean(low.float(), mask),
                   "clip_ratio/high_mean": masked_mean(high.float(), mask),
                   "clip_ratio/region_mean": masked_mean((low | high).float(), mask)}
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
    return loss, metrics


def grpo_relations(node: Mapping[str, Any]) -> list[Problem]:
    """What is wrong between GRPO's settings: ``epsilon_high`` below ``epsilon`` (DAPO's clip-higher
    raises the upper bound; a lower one would clip improvements harder than the low side)."""
    low, high = node.get("epsilon"), node.get("epsilon_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and high < low:
        return [problem("epsilon_high", high, f"a number >= {{node}}epsilon={low} (null = epsilon; DAPO uses 0.28)",
                        f"epsilon_high={high} must be >= epsilon={low} (null = epsilon; DAPO uses 0.28)")]
    return []


__all__ = ["SCALE_REWARDS", "GRPO_LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS", "ADVANTAGE_EPS", "GRPO_RULES",
           "group_advantages", "group_reward_std", "grpo_loss", "grpo_relations"]
