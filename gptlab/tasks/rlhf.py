"""The arithmetic of RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022), on plain tensors.

Shapes: B sequences, R response positions. ``mask`` (B, R) bool marks the real response tokens
(up to and including the first end-of-text; everything after it is padding).

* :func:`response_mask` finds the real tokens of sampled responses.
* :func:`kl_estimate` gives the per-token KL estimate between policy and reference (k1, k2, k3).
* :func:`token_rewards`: r_t = −β·kl_t, plus the sequence's score on its last real token.
* :func:`gae`: generalised advantage estimation (Schulman et al. 2016), vectorised over time.
* :func:`clipped_policy_loss` and :func:`clipped_value_loss`: PPO's objectives (Schulman et al. 2017).
* :class:`KLController`: β fixed, or adapted towards a target KL (Ziegler et al. 2019).

Conventions follow TRL's PPO trainer (``trl/experimental/ppo``) where it is sound; where gptlab
differs it says so (the score is added on the last real token, not one past it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
"""``k1`` log π − log π_ref (unbiased, can be negative per token; TRL's default); ``k2`` ½(log π −
log π_ref)² ; ``k3`` (ρ − 1) − log ρ with ρ = π_ref/π (unbiased and never negative; Schulman's
"Approximating KL divergence" note)."""


# ----------------------------------------------------------------------------- masked statistics
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (over ``dim``, or all); 0 if none."""
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))  # NaN/inf in padding stay out
    count = mask.to(x.dtype)
    if dim is None:
        return kept.sum() / count.sum().clamp(min=1)
    return kept.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``x`` scaled to unit variance over the masked positions, and (``shift_mean``) centred on 0;
    positions outside the mask are set to 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask, 0.0)


# ----------------------------------------------------------------------------- responses
def response_mask(tokens: torch.Tensor, stop_id: int | None) -> torch.Tensor:
    """(B, R) bool: the response tokens up to and including the first ``stop_id`` of each row
    (every position when ``stop_id`` is None or never sampled).

    Computed from positions, never by comparing with a pad id: with GPT-2 the pad *is* the
    end-of-text token, and masking it away would hide from the policy that it may stop.
    """
    if stop_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_stop = tokens == stop_id
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stop tokens strictly before t
    return stops_before == 0


# ----------------------------------------------------------------------------- KL and rewards
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of the sampled tokens (B, R); see
    :data:`KL_ESTIMATORS`. Zero wherever policy and reference agree."""
    log_ratio = logprobs - ref_logprobs  # log π − log π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (ρ − 1) − log ρ, ρ = π_ref / π
    raise ValueError(f"unknown kl_estimator {estimator!r}; valid choices: {list(KL_ESTIMATORS)}")


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


# ----------------------------------------------------------------------------- advantages
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (B, R) each.

    δ_t = r_t + γ·V_{t+1} − V_t (V past the last real token is 0: the episode ends there) and
    A_t = Σ_{s ≥ t} (γλ)^{s−t} δ_s, computed as one matmul with the (R, R) discount matrix
    instead of a Python loop over positions. Returns ``(advantages, returns = advantages + values)``,
    both 0 on padding; advantages are not whitened (see :func:`masked_whiten`).
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


# ----------------------------------------------------------------------------- PPO objectives
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
    max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) with ρ = exp(log π − log π_old)."""
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


# ----------------------------------------------------------------------------- KL coefficient
class KLController:
    """The KL coefficient β: fixed (``target`` None), or adaptive (Ziegler et al. 2019, TRL ≤ 0.11):
    after each batch of ``n`` rollouts with mean KL ``kl``,

        β ← β · (1 + clip(kl / target − 1, −0.2, 0.2) · n / horizon)

    so β grows while the policy drifts past the target KL and shrinks below it.
    """

    def __init__(self, init: float, target: float | None = None, horizon: float = 10000):
        if init < 0:
            raise ValueError(f"kl_coef={init} must be >= 0")
        if target is not None and target <= 0:
            raise ValueError(f"kl_target={target} must be > 0 (or null for a fixed kl_coef)")
        if horizon <= 0:
            raise ValueError(f"kl_horizon={horizon} must be > 0")
        self.value, self.target, self.horizon = float(init), target, float(horizon)

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float, n: int) -> float:
        """Adapt β to the observed mean KL of ``n`` rollouts (no-op when fixed); returns the new β."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value


__all__ = ["KL_ESTIMATORS", "masked_mean", "masked_var", "masked_whiten", "response_mask", "kl_estimate",
           "token_rewards", "gae", "PolicyLossStats", "clipped_policy_loss", "clipped_value_loss", "KLController"]
