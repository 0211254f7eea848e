"""Every use of Lightning's private API in gptlab, in one module.

Lightning has no public way to do three things gptlab needs:

* save what a ``ModelCheckpoint`` saves after a step, at the end of training (:func:`save_now`);
* apply a restored data loader position on resume (Lightning issue #20550: the position is dropped
  when the loader is rebuilt; :func:`restore_loader_position`);
* choose the command line of the processes its DDP launcher starts inside a Hydra job
  (:func:`replace_ddp_child_command`).

Each goes through names Lightning keeps private. They are used here only, for the Lightning versions
``pyproject.toml`` allows (``lightning>=2.4,<2.7``: 2.4.0, 2.5.6, 2.6.0 and 2.6.6 were read for these
names and signatures); ``tests/test_lightning_internals.py`` fails for an installed Lightning outside
that range or without one of the names, before a user's run does.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies.launchers import subprocess_script as pl_launcher

PRIVATE_NAMES: dict[Any, tuple[str, ...]] = {
    ModelCheckpoint: ("_should_skip_saving_checkpoint", "_monitor_candidates", "_save_topk_checkpoint",
                      "_save_last_checkpoint"),
    fabric_launcher: ("_hydra_subprocess_cmd",),
    pl_launcher: ("_hydra_subprocess_cmd",),
}
"""The private names used here, by their owner (the fit loop's are instance attributes, checked by
the test on a running trainer)."""


def save_now(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Save what ``callback`` saves after a training step (its top-k and ``last`` checkpoints),
    now, unless Lightning would skip saving at this point (sanity check, a checkpoint of this very
    step already written, ...)."""
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


def restore_loader_position(trainer: L.Trainer) -> bool:
    """Apply the training loaders' states that a resumed checkpoint holds and start a new iterator
    from that position (what Lightning's resume path does, but also after the loaders were rebuilt);
    returns whether there was one to apply."""
    fit_loop = trainer.fit_loop
    pending = getattr(fit_loop, "_combined_loader_states_to_load", None)
    if not (pending and fit_loop._combined_loader is not None and fit_loop._data_fetcher is not None):
        return False
    fit_loop._combined_loader._load_state_dicts(pending)
    fit_loop._combined_loader_states_to_load = []
    iter(fit_loop._data_fetcher)  # a new iterator from the restored position
    return True


def replace_ddp_child_command(command: Callable[[int], tuple[list[str], str]]) -> Callable[[], None]:
    """Make Lightning's DDP launchers (PyTorch and Fabric) build the command line and working folder
    of child process ``local_rank`` with ``command(local_rank)`` when run inside Hydra; returns the
    function that puts Lightning's own back."""
    modules = (pl_launcher, fabric_launcher)
    originals = [m._hydra_subprocess_cmd for m in modules]
    for m in modules:
        m._hydra_subprocess_cmd = command

    def restore() -> None:
        for m, original in zip(modules, originals):
            m._hydra_subprocess_cmd = original
    return restore


__all__ = ["PRIVATE_NAMES", "save_now", "restore_loader_position", "replace_ddp_child_command"]
