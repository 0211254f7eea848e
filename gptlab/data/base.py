"""What every gptlab data module shares: its arguments kept as ``hparams`` and one way to make
loaders, which can resume in the middle of an epoch.

Loaders are torchdata's :class:`~torchdata.stateful_dataloader.StatefulDataLoader`: a drop-in
``DataLoader`` with ``state_dict()`` / ``load_state_dict()``. Its shuffling sampler keeps its own
generator (seeded from torch's global RNG when the loader is built, so ``seed`` decides it) and saves
that generator's state and how many samples it has handed out. Lightning stores the training
loader's state in every checkpoint (``loops.fit_loop.state_dict.combined_loader``) and gives it back
on resume, so a run resumed mid-epoch sees the very batches, in the very order, that the
uninterrupted run would have seen. (A plain ``DataLoader`` draws a new permutation from the global RNG
at every epoch, which a resume resets: the resumed epoch used to repeat some windows and skip others.)
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import lightning as L
import torch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from gptlab.checks import ConfigRules, Problem, boolean, integer, raise_problems
from gptlab.errors import ConfigError


def ignore_torchdata_deprecation() -> None:
    """torchdata 0.11 calls ``torch.set_vital``, deprecated in torch 2.13, each time a loader is made:
    by gptlab, and again where Lightning remakes it with a DistributedSampler (``trainer=ddp``), once
    per loader and process. That warning alone, from torchdata alone, is left out of this process's
    warnings (it says nothing a user can act on); installed once, by the first loader made."""
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning, module=r"torchdata\.")


STAGES = ("train", "val", "test")


class GPTDataModule(ConfigRules, L.LightningDataModule):
    """Base of gptlab's data modules.

    A subclass calls ``self.save_hyperparameters(ignore=["tokenizer"], logger=False)`` in its
    ``__init__`` (its arguments become ``self.hparams``; the run's config is logged by
    ``gptlab-train`` itself), fills ``train_set`` / ``val_set`` / ``test_set`` in ``setup`` and may
    return a collate function per stage from :meth:`collate_fn`. Loader settings come from the
    hparams ``batch_size`` (per device), or ``global_batch_size`` (optional: the effective batch, split
    over devices × nodes × gradient accumulation, see :meth:`per_device_batch_size`), ``val_batch_size``
    (None = the per-device training batch), ``num_workers``, ``shuffle``
    and ``drop_last`` (training loader only) and ``pin_memory`` (only when CUDA is there).

    Each data module states its arguments' rules in ``RULES`` (:class:`~gptlab.checks.ConfigRules`)
    and calls :meth:`check_hparams` right after saving them: a ``data`` node is checked the same way
    before anything is built (``gptlab-train``'s pre-flight).
    """

    RULES = {"batch_size": integer(ge=1), "global_batch_size": integer(ge=1, optional=True),
             "val_batch_size": integer(ge=1, optional=True),
             "num_workers": integer(ge=0), "shuffle": boolean(), "drop_last": boolean(), "pin_memory": boolean()}

    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    @classmethod
    def resume_problems(cls, saved: Mapping[str, Any], node: Mapping[str, Any]) -> list[Problem]:
        """What in a ``data`` node keeps the training loader's saved position (``saved``: the data
        module's hyperparameters in the checkpoint being resumed) from being restored: another number
        of worker processes (the position is saved per worker)."""
        before, now = int(saved.get("num_workers") or 0), node.get("num_workers")
        if now is None or int(now) == before:
            return []
        return [Problem(f"{{node}}num_workers={now!r}: expected {before}, the checkpoint's (the loader's position "
                        f"is saved per worker process and restores only into {before} of them)",
                        f"num_workers={now!r} differs from the checkpoint's {before}")]

    def check_hparams(self) -> None:
        """Raise a :class:`~gptlab.errors.ConfigError` naming every argument out of its rule."""
        raise_problems(type(self).check_config(self.hparams), "data setting")

    def per_device_batch_size(self, world_size: int = 1, accumulate: int = 1) -> int:
        """The training batch of one process for ``world_size`` processes (devices × nodes) that
        each accumulate ``accumulate`` batches per optimizer step: ``global_batch_size`` divided by
        both when it is set (so a sweep over ``trainer.devices`` keeps the effective batch), else
        ``batch_size``. Raises :class:`~gptlab.errors.ConfigError` when it does not divide."""
        total = self.hparams.get("global_batch_size")
        if not total:
            return int(self.hparams.batch_size)
        share = world_size * accumulate
        if total % share:
            raise ConfigError(f"data.global_batch_size={total} is not a multiple of devices x nodes x "
                              f"accumulate_grad_batches = {world_size} x {accumulate} = {share}; use a multiple of "
                              f"{share}, or set data.batch_size (per device) instead")
        return total // share

    @property
    def batch_size(self) -> int:
        """The per-device training batch (:meth:`per_device_batch_size` for the attached trainer)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self.per_device_batch_size()
        return self.per_device_batch_size(trainer.world_size, trainer.accumulate_grad_batches)

    @property
    def val_batch_size(self) -> int:
        return int(self.hparams.get("val_batch_size") or self.batch_size)

    def collate_fn(self, stage: str) -> Callable[[list[Any]], Any] | None:
        """The collate function of ``stage`` (``train``, ``val`` or ``test``); None = torch's default."""
        return None

    def _loader(self, dataset: Dataset | None, batch_size: int, train: bool,
                collate_fn: Callable[[list[Any]], Any] | None = None) -> StatefulDataLoader:
        """A resumable loader over ``dataset``: shuffled and dropping the last partial batch when
        ``train`` (as configured), in order and complete otherwise."""
        if dataset is None:
            raise ValueError(f"{type(self).__name__}: this split is empty (check the data's split ratios)")
        hp = self.hparams
        workers = int(hp.get("num_workers") or 0)
        shuffle = train and bool(hp.get("shuffle", True))
        sampler = None
        distributed = getattr(getattr(self, "trainer", None), "distributed_sampler_kwargs", None)
        if train and not shuffle and distributed:
            # Lightning's own distributed sampler always shuffles the training set: keep the
            # configured order, each rank taking every world_size-th example
            sampler = DistributedSampler(dataset, shuffle=False, **distributed)
        ignore_torchdata_deprecation()  # before Lightning may remake the loader (trainer=ddp)
        return StatefulDataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler,
            drop_last=train and bool(hp.get("drop_last", False)), num_workers=workers,
            persistent_workers=workers > 0, collate_fn=collate_fn,
            pin_memory=bool(hp.get("pin_memory", False)) and torch.cuda.is_available())

    def train_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.train_set, self.batch_size, True, self.collate_fn("train"))

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, self.val_batch_size, False, self.collate_fn("val"))

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.test_set, self.val_batch_size, False, self.collate_fn("test"))
