"""The one loader of every inference tool (generate, chat, classify, eval, export): a checkpoint or
pretrained weights, plus an optional adapter file, into a ready model and what prediction needs.

    lm = load_model(ckpt_path="outputs/.../last.ckpt")                   # any task's language model
    clf = load_model(init_from="gpt2-small", adapter_path="adapter.safetensors", expect="classifier")
    clf.model, clf.labels, clf.pooling, clf.max_length

What a file holds is read from what it records (a checkpoint's ``gptlab_task``/``gptlab_kind``,
an adapter's ``task``/``kind``), never guessed from tensor shapes; asking for the other kind is a
clear error. Files are read safely: nothing in them can run code.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Mapping

import tiktoken
import torch

from gptlab.model.gpt import GPT
from gptlab.model.lora import merge_lora, read_adapter
from gptlab.model.qlora import load_qlora_adapter
from gptlab.tasks.adapters import unquantized
from gptlab.tasks.checkpoint import CheckpointError, check_gptlab_checkpoint, load_backbone, read_checkpoint
from gptlab.tasks.registry import load_task, task_class
from gptlab.tokenizer import get_tokenizer
from gptlab.weights import is_training_checkpoint, safe_torch_load
from gptlab.weights.checks import refuse_non_finite
from gptlab.weights.loading import TORCH_SUFFIXES

KINDS = {"lm": "language model", "classifier": "classifier", "reward": "reward model"}
"""What a model can predict -> how errors name it."""
_HINTS = {
    "lm": "gptlab-generate, gptlab-chat, gptlab-eval and gptlab-export need a language model (pretraining, "
          "instruction tuning, or pretrained weights)",
    "classifier": "gptlab-classify needs a classifier: train one with gptlab-train task=classify (e.g. "
                  "experiment=ch06_spam), or give the classification run's adapter_path=",
    "reward": "gptlab-reward needs a reward model: train one with gptlab-train task=reward_model (e.g. "
              "experiment=ch08_reward_model), or give the reward-model run's adapter_path=",
}
PRECISIONS = ("auto", "32", "bf16", "bf16-mixed", "16", "keep")
_PREDICTION_KEYS = ("labels", "pooling", "max_length", "prompt_style")


class WrongModelKind(ValueError):
    """The file holds another kind of model than the tool needs (e.g. a classifier for generation)."""


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on its device, adapters merged) and what goes with it."""

    model: GPT
    kind: str
    """``lm``, ``classifier`` or ``reward`` (:data:`KINDS`)."""
    source: str
    """What was loaded, for messages: the checkpoint, or the weights (+ adapter)."""
    device: torch.device
    precision: str
    tokenizer: tiktoken.Encoding = field(repr=False)
    task: str | None = None
    """Registry name of the task that trained it (None for pretrained weights)."""
    labels: list[str] | None = None
    pooling: str | None = None
    max_length: int | None = None
    prompt_style: str | None = None

    def autocast(self) -> ContextManager[Any]:
        """bf16 autocast for ``precision=bf16-mixed`` (fp32 weights), else a no-op."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as ``torch.device`` reads it."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str | int, device: torch.device, auto: str = "bf16") -> str:
    """One of :data:`PRECISIONS`; ``auto`` becomes ``auto`` (the argument) on CUDA, ``32`` elsewhere."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid choices: {list(PRECISIONS)}")
    if precision == "auto":
        return auto if device.type == "cuda" else "32"
    return precision


def _file_kind(kind: str, source: str) -> str:
    if kind not in KINDS:
        raise CheckpointError(f"{source} holds a {kind!r} model, which no inference tool reads; kinds: {sorted(KINDS)}")
    return kind


def load_model(ckpt_path: str | Path | None = None, init_from: str | Path | None = None,
               adapter_path: str | Path | None = None, *, expect: str | None = "lm",
               device: str | torch.device = "cpu", precision: str = "32", merge: bool = True,
               overrides: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load a model for inference.

    Args:
        ckpt_path: a gptlab training checkpoint (any task); or
        init_from: pretrained weights (``gpt2-small`` ..., a Hugging Face folder or file, a book or
            gptlab state dict); a gptlab checkpoint here is read as ``ckpt_path``.
        adapter_path: a LoRA or QLoRA adapter file to load on top; it brings its task head and its
            prediction settings (class names, pooling, ...). A QLoRA adapter was trained on the
            base's 4-bit rounding: the base is re-quantized with the file's settings first (NF4 is
            deterministic), so the model is the trained one; merged, it is that model in full precision.
        expect: the kind the caller needs (``lm`` | ``classifier`` | ``reward``; None = any): another kind raises
            :class:`WrongModelKind` naming the file and what it holds.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:1`` ...
        precision: ``32`` (fp32 weights), ``bf16`` (bf16 weights), ``bf16-mixed`` (fp32 weights, use
            :meth:`LoadedModel.autocast`), ``16``, ``keep`` (the file's dtype) or ``auto`` (bf16 on
            CUDA, fp32 elsewhere).
        merge: fold LoRA into the weights (plain matmuls at inference); a QLoRA model becomes full
            precision (its dequantized base + the update). ``merge=False`` keeps a QLoRA base in 4 bits.
        overrides: GPTConfig fields for pretrained weights (e.g. ``n_heads`` for a state dict whose
            width matches no preset).
    """
    if (ckpt_path is None) == (init_from is None) or not (ckpt_path or init_from):
        raise ValueError("give exactly one of ckpt_path=... (a gptlab checkpoint) or init_from=... (pretrained weights)")
    if expect is not None and expect not in KINDS:
        raise ValueError(f"expect={expect!r}; valid choices: {sorted(KINDS)}")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    if init_from is not None and _is_gptlab_checkpoint_file(init_from):
        ckpt_path, init_from = init_from, None
    meta: dict[str, Any] = dict.fromkeys(_PREDICTION_KEYS)
    task_name: str | None = None
    if ckpt_path is not None:
        source = str(ckpt_path)
        # a QLoRA checkpoint stores its base dequantized: LoRA on exactly those weights is the trained
        # model; re-quantizing them (merge=False keeps 4 bits) rounds the scales once more
        adapter = (read_checkpoint(ckpt_path).get("hyper_parameters") or {}).get("adapter") if merge else None
        task = load_task(ckpt_path, **({"adapter": unquantized(adapter)} if adapter else {}))
        model, task_name, kind = task.model, task.task_name, _file_kind(task.kind, source)
        meta.update({k: v for k, v in task.prediction_metadata().items() if k in meta})
    else:
        source = str(init_from)
        model = load_backbone(init_from, dtype=None if precision == "keep" else torch.float32, **dict(overrides or {}))
        kind = "lm"
    if adapter_path is not None:
        source = f"{source} + {adapter_path}"
        adapter_tensors, adapter_cfg = read_adapter(adapter_path)
        refuse_non_finite(adapter_tensors, adapter_path)
        meta.update({k: adapter_cfg[k] for k in meta if adapter_cfg.get(k) is not None})
        task_name, kind = _adapter_kind(adapter_cfg, adapter_path, task_name, kind)
        load_qlora_adapter(model, adapter_path)  # a LoRA file as load_adapter; a QLoRA file on its re-quantized base
    if expect is not None and kind != expect:
        what = KINDS[kind] + (f" (task {task_name!r})" if task_name else "")
        raise WrongModelKind(f"{source} holds a {what}, not a {KINDS[expect]}; {_HINTS[expect]}")
    if merge:
        merge_lora(model)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32}.get(precision)
    model = model.to(dev) if dtype is None else model.to(dev, dtype)
    return LoadedModel(model=model.eval(), kind=kind, source=source, device=dev, precision=precision,
                       tokenizer=get_tokenizer(), task=task_name, labels=meta["labels"], pooling=meta["pooling"],
                       max_length=meta["max_length"], prompt_style=meta["prompt_style"])


def _is_gptlab_checkpoint_file(name_or_path: str | Path) -> bool:
    path = Path(name_or_path).expanduser()
    if not (path.is_file() and path.suffix in TORCH_SUFFIXES):
        return False
    obj = safe_torch_load(path)  # memory-mapped: cheap; read again by load_task
    if is_training_checkpoint(obj):
        check_gptlab_checkpoint(obj, path)
        return True
    return False


def _adapter_kind(cfg: Mapping[str, Any], path: str | Path, task_name: str | None, kind: str) -> tuple[str | None, str]:
    """The task and kind an adapter file records (its ``kind``, else its task's), or the base's."""
    name = cfg.get("task")
    if name:
        cls = task_class(str(name), path)
        task_name = cls.task_name
        kind = cfg.get("kind") or cls.kind
    elif cfg.get("kind"):
        kind = cfg["kind"]
    return task_name, _file_kind(kind, str(path))


__all__ = ["LoadedModel", "load_model", "resolve_device", "resolve_precision", "WrongModelKind", "KINDS",
           "PRECISIONS"]
