"""How far the policy is from its reference: per-token KL estimates from the log-probs of the
sampled tokens, and PPO's KL coefficient β (fixed, or adapted towards a target KL)."""

from __future__ import annotations

import torch

from gptlab.checks import check_node, number, raise_problems

KL_ESTIMATORS = ("k1", "k2", "k3")
"""``k1`` log π − log π_ref (unbiased, can be negative per token; TRL's default); ``k2`` ½(log π −
log π_ref)² ; ``k3`` (ρ − 1) − log ρ with ρ = π_ref/π (unbiased and never negative; Schulman's
"Approximating KL divergence" note; GRPO's per-token KL)."""
KL_CONTROLLER_RULES = {"kl_coef": number(ge=0), "kl_target": number(gt=0, optional=True, note="null = a fixed kl_coef"),
                       "kl_horizon": number(gt=0)}
"""The settings of :class:`KLController`, as PPO's config names them."""


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


class KLController:
    """The KL coefficient β: fixed (``target`` None), or adaptive (Ziegler et al. 2019, TRL ≤ 0.11):
    after each batch of ``n`` rollouts with mean KL ``kl``,

        β ← β · (1 + clip(kl / target − 1, −0.2, 0.2) · n / horizon)

    so β grows while the policy drifts past the target KL and shrinks below it.
    """

    def __init__(self, init: float, target: float | None = None, horizon: float = 10000):
        raise_problems(check_node({"kl_coef": init, "kl_target": target, "kl_horizon": horizon}, KL_CONTROLLER_RULES))
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


__all__ = ["KL_ESTIMATORS", "KL_CONTROLLER_RULES", "kl_estimate", "KLController"]
