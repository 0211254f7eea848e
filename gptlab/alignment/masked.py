"""Statistics over the real tokens of padded (B, R) tensors: ``mask`` (B, R) bool marks them (a
response's tokens up to and including its first end-of-text; everything after is padding)."""

from __future__ import annotations

import torch


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


__all__ = ["masked_mean", "masked_var", "masked_whiten"]
