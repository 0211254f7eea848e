"""Example-weighted means of named metrics over a whole validation/test epoch (preference tasks)."""

from __future__ import annotations

from typing import Mapping, Sequence

import lightning as L
import torch
import torch.nn as nn
import torchmetrics


class StageMeans(nn.Module):
    """One ``MeanMetric`` per (stage, metric name): the mean over examples, not over batches, synced
    across ranks; logged as ``<stage>/<name>`` (names may hold slashes: ``rewards/chosen``).

    Call :meth:`reset` at the start of every epoch: the states are then created in that loop's grad
    mode (a ``validate()`` runs under inference mode, whose tensors a later fit's no-grad validation
    could not update in place).
    """

    def __init__(self, names: Sequence[str], stages: Sequence[str] = ("val", "test")):
        super().__init__()
        self.names = tuple(names)
        self.means = nn.ModuleDict({stage: nn.ModuleDict({_key(n): torchmetrics.MeanMetric() for n in self.names})
                                    for stage in stages})

    def reset(self, stage: str) -> None:
        for metric in self.means[stage].values():
            metric.reset()

    def update(self, stage: str, values: Mapping[str, torch.Tensor], weight: int) -> None:
        for name, value in values.items():
            self.means[stage][_key(name)].update(value.detach(), weight=weight)

    def log(self, module: L.LightningModule, stage: str, prog_bar: Sequence[str] = ()) -> None:
        """Log every metric that got values this epoch, then reset."""
        for name in self.names:
            metric = self.means[stage][_key(name)]
            if metric.update_count:
                module.log(f"{stage}/{name}", metric.compute(), prog_bar=name in prog_bar, sync_dist=True)
            metric.reset()


def _key(name: str) -> str:
    """A ModuleDict key for a metric name (no dots or slashes)."""
    return name.replace("/", "__").replace(".", "_")
