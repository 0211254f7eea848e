"""The fixed registry of gptlab's tasks, and :func:`load_task`, which rebuilds a task from its
checkpoint. A checkpoint names its task by registry name (``gptlab_task``); the class is looked up
here, never imported from a name stored in a file. A new task registers by one entry in
:data:`TASKS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptlab.tasks.base import GPTTask
from gptlab.tasks.classify import ClassificationTask
from gptlab.tasks.dpo import DPOTask
from gptlab.tasks.grpo import GRPOTask
from gptlab.tasks.instruct import InstructionTask
from gptlab.tasks.ppo import PPOTask
from gptlab.tasks.pretrain import PretrainTask
from gptlab.tasks.reward import RewardModelTask
from gptlab.weights.checkpoint import checkpoint_tokenizer, read_checkpoint, task_name

TASKS: dict[str, type[GPTTask]] = {cls.task_name: cls for cls in (PretrainTask, ClassificationTask, InstructionTask,
                                                                  DPOTask, RewardModelTask, PPOTask, GRPOTask)}
"""Registry name -> task class."""



def task_class(name: str, source: str | Path = "checkpoint") -> type[GPTTask]:
    """The gptlab task class registered as ``name`` (or under its pre-registry class path); anything
    else raises :class:`~gptlab.weights.checkpoint.CheckpointError`."""
    return TASKS[task_name(name, source, known=TASKS)]


def load_task(ckpt_path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any) -> GPTTask:
    """Rebuild the task saved in a gptlab checkpoint, with its weights, on ``map_location``.

    The class comes from :data:`TASKS` by the name the checkpoint records. Pretrained ``init_from``
    weights are not fetched again: the checkpoint holds every weight, so the backbone is built from
    the stored config; the tokenizer is the one the checkpoint records. ``overrides``: constructor
    arguments to change (e.g. ``compile=False``).
    """
    ckpt = read_checkpoint(ckpt_path)
    cls = task_class(ckpt["gptlab_task"], ckpt_path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if hp.get("init_from"):
        keep = ("drop_rate", "activation_checkpointing")
        hp["model"] = {**ckpt["gptlab_model_config"], **{k: v for k, v in (hp.get("model") or {}).items() if k in keep}}
        hp["init_from"] = None
    hp.update(overrides)
    task = cls(**hp, tokenizer=checkpoint_tokenizer(ckpt, ckpt_path))
    task.load_state_dict(ckpt["state_dict"])
    return task.to(map_location)


__all__ = ["TASKS", "task_class", "load_task"]
