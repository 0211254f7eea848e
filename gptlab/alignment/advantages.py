"""From rewards to advantages: PPO's per-token rewards (−β·KL on every token, the score on the last)
and generalised advantage estimation (Schulman et al. 2016), vectorised over time. Whitening is
:func:`gptlab.alignment.masked.masked_whiten`.

Shapes: B sequences, R response positions; ``mask`` (B, R) bool marks the real response tokens.
"""

from __future__ import annotations

import torch


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): −β·kl_t on every real token, plus each sequence's score (B,) on
    its last real token; 0 on padding. Returns ``(rewards, non_score_rewards)``.

    TRL adds the score one position *past* the last token (the first pad), where GAE carries it
    back with a factor γλ (trl#3750); here it lands on the last token the policy chose, which is
    where the action that earned it was taken. A row without any real token gets no score.
    """
    non_score = torch.where(mask, -beta * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    rewards = non_score.clone()
    lengths = mask.long().sum(dim=1)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    rewards[rows, lengths[rows] - 1] += scores[rows].to(rewards.dtype)
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (B, R) each.

    δ_t = r_t + γ·V_{t+1} − V_t (V past the last real token is 0: the episode ends there) and
    A_t = Σ_{s ≥ t} (γλ)^{s−t} δ_s, computed as one matmul with the (R, R) discount matrix
    instead of a Python loop over positions. Returns ``(advantages, returns = advantages + values)``,
    both 0 on padding; advantages are not whitened.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    maskf = mask.to(values.dtype)
    values = torch.where(mask, values, zero)
    rewards = torch.where(mask, rewards, zero)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = (rewards + gamma * next_values - values) * maskf  # (B, R)
    R = rewards.size(1)
    t = torch.arange(R, device=rewards.device)
    gap = (t[None, :] - t[:, None]).to(rewards.dtype)  # gap[t, s] = s − t
    # float64 powers: (γλ)^(s−t) stays exact enough for long responses
    discount = torch.where(gap >= 0, torch.pow(torch.tensor(gamma * lam, dtype=torch.float64), gap.double()),
                           torch.zeros((), dtype=torch.float64)).to(rewards.dtype)  # (R, R), upper triangular
    advantages = deltas @ discount.T  # A[b, t] = Σ_s discount[t, s] δ[b, s]
    advantages = advantages * maskf
    return advantages, (advantages + values) * maskf


__all__ = ["token_rewards", "gae"]
