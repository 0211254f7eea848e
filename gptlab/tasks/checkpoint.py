"""gptlab training checkpoints (Lightning ``.ckpt`` files): read them safely, tell what they hold,
and take the backbone out of one.

A gptlab checkpoint is a plain container: tensors, numbers, strings, lists and dicts, written by
:meth:`gptlab.tasks.base.GPTTask.on_save_checkpoint` with three entries of its own:

* ``gptlab_task``: the registry name of the task that trained it (``pretrain``, ``classify``, ...);
* ``gptlab_kind``: what the model predicts (``lm`` or ``classifier``), for the inference loader;
* ``gptlab_model_config``: the backbone's :class:`~gptlab.model.config.GPTConfig` fields.

Files are read with ``torch.load(weights_only=True)`` only (:func:`gptlab.weights.safe_torch_load`);
a file that stores anything else is refused, and nothing a file names is ever imported or called.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.tasks.adapters import apply_adapter, unquantized
from gptlab.weights import (MappingReader, is_training_checkpoint, load_from_reader, load_pretrained,
                            plain_state_dict, safe_torch_load)
from gptlab.weights.checks import refuse_non_finite
from gptlab.weights.loading import TORCH_SUFFIXES, load_state_dict_object
from gptlab.weights.readers import UnreadableCheckpointError


class CheckpointError(ValueError):
    """A file that is not a (readable) gptlab checkpoint, or not of the kind the caller needs."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of the gptlab checkpoint at ``path`` (tensors memory-mapped).

    Raises FileNotFoundError, :class:`~gptlab.weights.UnsafeCheckpointError` (the file stores
    Python objects), or :class:`CheckpointError` (unreadable, or not written by gptlab)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = safe_torch_load(path)
    except UnreadableCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    check_gptlab_checkpoint(ckpt, path)
    refuse_non_finite(ckpt["state_dict"], path)
    return ckpt


def check_gptlab_checkpoint(ckpt: Any, path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` is a training checkpoint written by gptlab."""
    if not is_training_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a gptlab checkpoint (no Lightning 'state_dict'); gptlab-train "
                              "writes them to outputs/<task>/runs/<time>/checkpoints/")
    if not isinstance(ckpt.get("gptlab_task"), str):
        raise CheckpointError(f"{path} is not a gptlab checkpoint (no 'gptlab_task' entry naming the task "
                              "that wrote it)")


def checkpoint_model_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """GPTConfig fields of a checkpoint's backbone: the recorded ``gptlab_model_config``, else (for
    files of models built from scratch) the ``model`` hyperparameters."""
    recorded = ckpt.get("gptlab_model_config")
    if recorded:
        return dict(recorded)
    hp = ckpt.get("hyper_parameters") or {}
    return GPTConfig.from_dict(dict(hp.get("model") or {})).to_dict()


def backbone_from_checkpoint(ckpt: Mapping[str, Any], source: str, overrides: Mapping[str, Any] | None = None,
                             dtype: torch.dtype | None = torch.float32) -> GPT:
    """The language-model backbone stored in a gptlab checkpoint, with any LoRA folded into its
    weights (the task around it is not rebuilt). ``overrides``: GPTConfig fields to change
    (``drop_rate``, ``context_length``, ...). A classifier's backbone raises: its head is not a
    language-model head."""
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{source} has no 'model.*' weights; not a gptlab checkpoint")
    config = checkpoint_model_config(ckpt)
    if any(".lora_A" in k or ".lora_B" in k for k in state):
        refuse_non_finite(state, source)  # before folding: the message names the LoRA tensor, not its base
        state = _fold_adapter(state, config, (ckpt.get("hyper_parameters") or {}).get("adapter") or {})
    return load_from_reader(MappingReader(state), source, config, overrides, dtype, kind="native")


def _fold_adapter(state: dict[str, torch.Tensor], config: Mapping[str, Any],
                  adapter: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rebuild the adapted backbone ``state`` belongs to (on the meta device, tensors assigned) and
    return its state dict with the adapter folded into the base weights."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(dict(config)))
        head = state.get("out_head.weight")
        if head is not None and tuple(head.shape) != tuple(model.out_head.weight.shape):
            model.out_head = nn.Linear(head.shape[1], head.shape[0], bias="out_head.bias" in state)
        apply_adapter(model, unquantized(adapter))  # a QLoRA base is stored dequantized: fold into those weights
    model.load_state_dict(state, strict=True, assign=True)
    return plain_state_dict(model)


def load_backbone(name_or_path: str | Path, dtype: torch.dtype | None = torch.float32, **overrides: Any) -> GPT:
    """A :class:`GPT` from anything ``init_from=`` accepts: a pretrained name (``gpt2-small`` ...),
    a Hugging Face folder or ``.safetensors`` file, a book or gptlab state dict, or a gptlab
    training checkpoint (its backbone, LoRA folded in). Each file is read once, safely."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        obj = safe_torch_load(path)
        if is_training_checkpoint(obj):
            check_gptlab_checkpoint(obj, path)
            return backbone_from_checkpoint(obj, str(path), overrides, dtype)
        return load_state_dict_object(obj, str(path), overrides, dtype)
    return load_pretrained(name_or_path, dtype, **overrides)


__all__ = ["CheckpointError", "read_checkpoint", "check_gptlab_checkpoint", "checkpoint_model_config",
           "backbone_from_checkpoint", "load_backbone"]
