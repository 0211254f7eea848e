"""A loaded model measured on data: the token-weighted mean cross-entropy (and perplexity) over every
batch of a loader, as ``gptlab-eval`` reports it for each split."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from gptlab.inference import LoadedModel


@torch.no_grad()
def evaluate_loader(lm: LoadedModel, loader: DataLoader, max_batches: int | None = None, progress: bool = True,
                    desc: str = "eval") -> dict[str, float]:
    """Token-weighted mean cross-entropy of ``lm`` over ``loader`` (batches of ``input_ids``/``labels``,
    ``(B, T)`` each, ``-100`` labels ignored), over at most ``max_batches`` batches:
    ``{"loss", "ppl", "tokens", "batches"}``. ValueError when there is no target token at all."""
    device = lm.device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    for i, batch in enumerate(tqdm(loader, total=n_batches, desc=desc, disable=not progress, leave=False)):
        if i >= n_batches:
            break
        x = batch["input_ids"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        with lm.autocast():
            loss = lm.model.loss(x, y)
        n = int((y != -100).sum())
        total_loss += loss.double() * n
        total_tokens += n
    if total_tokens == 0:
        raise ValueError(f"{desc}: no windows to evaluate (the split is shorter than data.max_length + 1)")
    mean = float(total_loss / total_tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": total_tokens, "batches": n_batches}


__all__ = ["evaluate_loader"]
