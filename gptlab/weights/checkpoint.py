"""gptlab training checkpoints (Lightning ``.ckpt`` files): read them safely, tell what they hold, and
build the model one holds, without the task (or Lightning) around it.

A gptlab checkpoint is a plain container: tensors, numbers, strings, lists and dicts, written by
:meth:`gptlab.tasks.base.GPTTask.on_save_checkpoint` with entries of its own:

* ``gptlab_task``: the registry name of the task that trained it (``pretrain``, ``classify``, ...);
* ``gptlab_kind``: what the model predicts (``lm``, ``classifier`` or ``reward``);
* ``gptlab_model_config``: the backbone's :class:`~gptlab.model.config.GPTConfig` fields;
* ``gptlab_prediction``: what prediction needs besides the weights (class names, prompt style, ...);
* ``gptlab_tokenizer``: the tokenizer (:func:`gptlab.tokenizer.tokenizer_record`: name and hash, and for
  a trained tokenizer its manifest and ranks, so the file decodes on any machine; absent = GPT-2).

Files are read with ``torch.load(weights_only=True)`` only (:func:`gptlab.weights.safe_torch_load`);
a file that stores anything else is refused, and nothing a file names is ever imported or called.
Every reader here takes the already loaded checkpoint, so one load serves them all.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from gptlab.checks import Problem, problem
from gptlab.errors import InvalidInput
from gptlab.model.adapters import apply_adapter, unquantized
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.tokenizer import check_same_tokenizer, get_tokenizer, tokenizer_from_record
from gptlab.weights.export import plain_state_dict
from gptlab.weights.loading import (TORCH_SUFFIXES, is_training_checkpoint, load_from_reader, load_pretrained,
                                    load_state_dict_object)
from gptlab.weights.formats import pretrained_names, resolve_pretrained_name
from gptlab.weights.readers import MappingReader, UnreadableCheckpointError, safe_torch_load, verify_checkpoint

LEGACY_TASK_KINDS = {"pretrain": "lm", "classify": "classifier", "instruct": "lm", "dpo": "lm",
                     "reward_model": "reward", "ppo": "lm"}
"""What the model of each task that existed before checkpoints recorded ``gptlab_kind`` predicts."""
LEGACY_TASK_NAMES = {"gptlab.tasks.pretrain.PretrainTask": "pretrain",
                     "gptlab.tasks.classify.ClassificationTask": "classify",
                     "gptlab.tasks.instruct.InstructionTask": "instruct", "gptlab.tasks.dpo.DPOTask": "dpo",
                     "gptlab.tasks.reward.RewardModelTask": "reward_model", "gptlab.tasks.ppo.PPOTask": "ppo"}
"""``gptlab_task`` as checkpoints recorded it before the task registry (the class path of gptlab's own
task; looked up here, never imported) -> the registry name."""
PREDICTION_KEYS = ("labels", "pooling", "max_length", "prompt_style")
"""What inference reads besides the weights (a classifier's class names, the prompt style, ...)."""
TOKENIZER_KEY = "gptlab_tokenizer"
"""The checkpoint entry that records the tokenizer."""


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
    return ckpt


def check_gptlab_checkpoint(ckpt: Any, path: str | Path) -> None:
    """Raise :class:`CheckpointError` unless ``ckpt`` is a training checkpoint written by gptlab."""
    if not is_training_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a gptlab checkpoint (no Lightning 'state_dict'); gptlab-train "
                              "writes them to outputs/<task>/runs/<time>/checkpoints/")
    if not isinstance(ckpt.get("gptlab_task"), str):
        raise CheckpointError(f"{path} is not a gptlab checkpoint (no 'gptlab_task' entry naming the task "
                              "that wrote it)")


def task_name(recorded: str, source: str | Path = "checkpoint", known: Mapping[str, Any] = LEGACY_TASK_KINDS) -> str:
    """The registry name of a recorded ``gptlab_task`` (a pre-registry class path is mapped); a name
    outside ``known`` raises :class:`CheckpointError`."""
    name = LEGACY_TASK_NAMES.get(recorded, recorded)
    if name not in known:
        raise CheckpointError(f"{source}: task {recorded!r} is not one of gptlab's tasks {sorted(known)}; gptlab "
                              "only loads checkpoints of its own tasks and never imports a name stored in a file")
    return name


def recorded_task(ckpt: Mapping[str, Any], source: str | Path = "checkpoint") -> str:
    """The registry name of the task a checkpoint records. A file that records its kind may name any
    task (a newer one); one that does not must name a task of that older time."""
    if ckpt.get("gptlab_kind"):
        return LEGACY_TASK_NAMES.get(ckpt["gptlab_task"], ckpt["gptlab_task"])
    return task_name(ckpt["gptlab_task"], source)


def checkpoint_kind(ckpt: Mapping[str, Any], source: str | Path = "checkpoint") -> str:
    """What a checkpoint's model predicts: the recorded ``gptlab_kind``, else (older files) its task's."""
    kind = ckpt.get("gptlab_kind")
    if kind:
        return str(kind)
    return LEGACY_TASK_KINDS[task_name(ckpt["gptlab_task"], source)]


def checkpoint_tokenizer(ckpt: Mapping[str, Any], source: str | Path = "checkpoint") -> Any:
    """The ``tiktoken.Encoding`` a gptlab checkpoint was trained with (GPT-2's for files written
    before checkpoints recorded it), rebuilt from the checkpoint alone."""
    return tokenizer_from_record(ckpt.get(TOKENIZER_KEY), source)


def prediction_settings(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """What prediction needs from a checkpoint (:data:`PREDICTION_KEYS`): the recorded
    ``gptlab_prediction``, else (older files) the task's hyperparameters of those names."""
    recorded = ckpt.get("gptlab_prediction")
    source = recorded if recorded is not None else (ckpt.get("hyper_parameters") or {})
    return {k: source.get(k) for k in PREDICTION_KEYS}


def checkpoint_model_config(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """GPTConfig fields of a checkpoint's backbone: the recorded ``gptlab_model_config``, else (for
    files of models built from scratch) the ``model`` hyperparameters."""
    recorded = ckpt.get("gptlab_model_config")
    if recorded:
        return dict(recorded)
    hp = ckpt.get("hyper_parameters") or {}
    return GPTConfig.from_dict(dict(hp.get("model") or {})).to_dict()


def checkpoint_adapter(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``adapter`` node the checkpoint's model was trained with, or None."""
    adapter = (ckpt.get("hyper_parameters") or {}).get("adapter")
    return dict(adapter) if adapter else None


def _is_lora_key(key: str) -> bool:
    return ".lora_A" in key or ".lora_B" in key


def _model_state(ckpt: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"{source} has no 'model.*' weights; not a gptlab checkpoint")
    return state


def checkpoint_model(ckpt: Mapping[str, Any], source: str, adapter: Mapping[str, Any] | None = None) -> GPT:
    """The model a gptlab checkpoint holds, in train mode: its backbone with the head the task gave it
    (a language-model head, a classifier's or a reward model's scalar head: rebuilt from the stored
    shape) and, with ``adapter`` (the checkpoint's own node, :func:`checkpoint_adapter`, or its
    :func:`~gptlab.model.adapters.unquantized` form), its LoRA layers as trained, unmerged.

    The base weights are assigned, not copied (built on the meta device); the adapter is applied to
    them, then its factors are loaded. Every stored ``model.*`` tensor must find its place."""
    state = _model_state(ckpt, source)
    config = GPTConfig.from_dict(checkpoint_model_config(ckpt))
    with torch.device("meta"):
        model = GPT(config)
    head = state.get("out_head.weight")
    lm_head = head is None or tuple(head.shape) == tuple(model.out_head.weight.shape)
    if not lm_head:  # a task's own head (classifier, reward model)
        model.out_head = nn.Linear(head.shape[1], head.shape[0], bias="out_head.bias" in state, device="meta")
    base = {k: v for k, v in state.items() if not _is_lora_key(k)}
    lora = {k: v for k, v in state.items() if _is_lora_key(k)}
    if lora and not adapter:
        raise CheckpointError(f"{source} holds LoRA weights but no 'adapter' settings to rebuild their layers")
    result = model.load_state_dict(base, strict=False, assign=True)
    _refuse(source, result.missing_keys, result.unexpected_keys)
    if config.tie_weights and lm_head:  # assign=True gave the pair two parameters: share them again
        model.out_head.weight = model.tok_emb.weight
    if adapter:
        with torch.random.fork_rng(devices=[]):  # the new factors' init is overwritten: leave the RNG as it was
            apply_adapter(model, adapter)
        result = model.load_state_dict(lora, strict=False)
        _refuse(source, [k for k in result.missing_keys if _is_lora_key(k)], result.unexpected_keys)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no stored tensor for {left[:5]}")
    return model


def _refuse(source: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise CheckpointError(f"{source}: its weights do not fit the model it records (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")


def backbone_from_checkpoint(ckpt: Mapping[str, Any], source: str, overrides: Mapping[str, Any] | None = None,
                             dtype: torch.dtype | None = torch.float32) -> GPT:
    """The language-model backbone stored in a gptlab checkpoint, with any LoRA folded into its
    weights (the task around it is not rebuilt). ``overrides``: GPTConfig fields to change
    (``drop_rate``, ``context_length``, ...). A classifier's backbone raises: its head is not a
    language-model head."""
    state = _model_state(ckpt, source)
    config = checkpoint_model_config(ckpt)
    adapter = checkpoint_adapter(ckpt)
    if adapter and any(_is_lora_key(k) for k in state):
        # a QLoRA base is stored dequantized: fold LoRA into exactly those weights
        state = plain_state_dict(checkpoint_model(ckpt, source, unquantized(adapter)))
    return load_from_reader(MappingReader(state), source, config, overrides, dtype, kind="native")


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


# ----------------------------------------------------------------------------- checks of a file before any run
def checkpoint_file_problems(key: str, path: Any, resumable: bool = False) -> list[Problem]:
    """The problems of a checkpoint file given as ``key``: it must exist and be intact (its
    checksums), and, when ``resumable``, hold the optimizer and loop state a resume needs."""
    if path is None:
        return []
    p = Path(str(path)).expanduser()
    if not p.is_file():
        return [problem(key, str(path), f"a checkpoint file that exists (cwd: {os.getcwd()})")]
    try:
        if resumable:
            ckpt = safe_torch_load(p)  # checksums verified, weights_only=True
            if "optimizer_states" not in ckpt or "loops" not in ckpt:
                return [Problem(f"{{node}}{key}={str(path)!r}: holds weights only (a best-* checkpoint), not the "
                                "training state a resume needs; resume from last.ckpt, or start from these weights "
                                "with init_from=", f"{path} holds weights only, not the training state a resume needs")]
        elif p.suffix == ".ckpt" or _starts_like_zip(p):
            verify_checkpoint(p)
    except InvalidInput as e:
        return [Problem(f"{{node}}{key}: {e}", str(e))]
    return []


def _starts_like_zip(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def init_from_problems(key: str, value: Any) -> list[Problem]:
    """The problems of an ``init_from`` value: a pretrained model name, or a file (checked as
    :func:`checkpoint_file_problems`) or folder that exists."""
    if value is None or not isinstance(value, str):
        return []
    path = Path(value).expanduser()
    if path.exists():
        return checkpoint_file_problems(key, value) if path.is_file() else []
    if resolve_pretrained_name(value) is None:
        return [problem(key, value, f"a pretrained model name ({', '.join(pretrained_names())}) or a file or folder "
                                    f"that exists (cwd: {os.getcwd()})")]
    return []


def trained_tokenizer(value: Any) -> Any:
    """The tokenizer (a ``tiktoken.Encoding``) the weights at ``value`` (an ``init_from`` or
    ``ckpt_path``) were trained with: a gptlab checkpoint's record, GPT-2's for a named GPT-2 model;
    None when the weights do not say (a state dict, a Hugging Face folder) or cannot be read (the
    file checks report that)."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        try:
            ckpt = safe_torch_load(path)
        except Exception:  # noqa: BLE001 - an unreadable file is reported by checkpoint_file_problems
            return None
        return checkpoint_tokenizer(ckpt, path) if is_training_checkpoint(ckpt) else None
    return get_tokenizer("gpt2") if not path.exists() and resolve_pretrained_name(value) else None


def tokenizer_problems(key: str, value: Any, tokenizer: Any, tokenizer_value: Any) -> list[Problem]:
    """The problem of training from (or resuming) the weights at ``key=value`` with ``tokenizer``
    (given as ``tokenizer=tokenizer_value``) when the weights were trained with another one: both
    named with their hashes."""
    try:
        recorded = trained_tokenizer(value)
        if recorded is not None:
            check_same_tokenizer(recorded, tokenizer, f"{key}={value}", f"tokenizer={tokenizer_value}",
                                 f"train with tokenizer= set to the tokenizer {key} was trained with")
    except InvalidInput as e:
        return [Problem(f"{{node}}{key}: {e}", str(e))]
    return []


__all__ = ["CheckpointError", "LEGACY_TASK_KINDS", "LEGACY_TASK_NAMES", "PREDICTION_KEYS", "TOKENIZER_KEY", "read_checkpoint",
           "check_gptlab_checkpoint", "task_name", "recorded_task", "checkpoint_kind", "checkpoint_tokenizer", "prediction_settings", "checkpoint_model_config",
           "checkpoint_adapter", "checkpoint_model", "backbone_from_checkpoint", "load_backbone",
           "checkpoint_file_problems", "init_from_problems",
           "trained_tokenizer", "tokenizer_problems"]
