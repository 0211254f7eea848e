"""What a weights loader refuses (:class:`InvalidWeightsError`), and the check every loader runs on
the weights it read: a file whose checksums are fine can still hold
NaN or infinite weights (a run that diverged and was saved anyway, a hand-edited file). Such a
model computes NaN from its first step, so it is refused where it is read, naming the tensor."""

from __future__ import annotations

import os
from typing import Mapping

import torch

from gptlab.errors import InvalidInput

_CHUNK = 1 << 22
"""Elements checked at a time: the check's scratch memory stays at a few MiB whatever the tensor."""


class InvalidWeightsError(InvalidInput):
    """Weights a loader refuses: a file that is malformed, lies about its tensors, or does not fit
    the model asked for (the message names the file, and the tensor or field)."""


class NonFiniteWeightsError(InvalidWeightsError):
    """A checkpoint or weights file holds NaN or infinite values (the message names file and tensor)."""


def count_non_finite(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, infinity count)`` of a tensor; ``(0, 0)`` for integer and boolean tensors."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return 0, 0
    t = tensor.detach()
    # the fast test: a NaN or an infinity makes the sum non-finite, and a finite sum proves there is
    # none (a float32 sum is ~10x faster than torch.isfinite on CPU and allocates nothing); only a sum
    # that is not finite (or overflowed) pays for the exact count below
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    if bool(torch.isfinite(total).all()):
        return 0, 0
    # a contiguous tensor is counted a slice at a time: no scratch copy the size of the tensor
    chunks = t.reshape(-1).split(_CHUNK) if t.is_contiguous() else (t,)
    nan = sum(int(torch.isnan(c).sum()) for c in chunks)
    inf = sum(int(torch.isinf(c).sum()) for c in chunks)
    return nan, inf


def refuse_non_finite(tensors: Mapping[str, object], source: str | os.PathLike) -> None:
    """Raise :class:`NonFiniteWeightsError` naming ``source`` and the first tensor of ``tensors``
    (name -> tensor; other values are skipped) that holds a NaN or an infinity."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        nan, inf = count_non_finite(tensor)
        if nan or inf:
            what = " and ".join(f"{n:,} {w}" for n, w in ((nan, "NaN"), (inf, "infinite")) if n)
            raise NonFiniteWeightsError(
                f"{os.fspath(source)}: tensor {name!r} holds {what} value(s) of {tensor.numel():,}: the weights "
                "are not usable (a diverged run saved anyway?); use an earlier checkpoint")


__all__ = ["InvalidWeightsError", "NonFiniteWeightsError", "count_non_finite", "refuse_non_finite"]
