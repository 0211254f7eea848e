"""A run's hyperparameters for the loggers: TensorBoard's HPARAMS tab gets them with the run's real
final metrics."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": value} with TensorBoard-friendly scalar values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)):
        out[prefix[:-1]] = str(list(d))
    else:
        out[prefix[:-1]] = d if isinstance(d, (int, float, str, bool)) else str(d)
    return out


def log_hparams(loggers: list[Any], hparams: dict[str, Any], final: dict[str, float], step: int) -> None:
    """Hyperparameters to every logger; TensorBoard also gets ``final`` as the session's metrics.

    TensorBoard's HPARAMS tab reads each metric from the scalar series of the same tag, so the final
    values are written as scalars at the last step (not at step 0, where they would bend the curves
    back to the start).
    """
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger) and final:
            lg.log_hyperparams(hparams, metrics=final, step=step)
        else:
            lg.log_hyperparams(hparams)


__all__ = ["flatten", "log_hparams"]
