"""The one loader of every inference tool (generate, chat, classify, eval, export, respond, reward, the
PPO reward model): a checkpoint or pretrained weights, plus an optional adapter file, into a ready
model and what prediction needs, its tokenizer included (a checkpoint's own, rebuilt from the
checkpoint alone); and the batched prediction those tools share.

    lm = load_model(ckpt_path="outputs/.../last.ckpt")                   # any task's language model
    clf = load_model(init_from="gpt2-small", adapter_path="adapter.safetensors", expect="classifier")
    clf.model, clf.labels, clf.pooling, clf.max_length

What a file holds is read from what it records (a checkpoint's ``gptlab_task``/``gptlab_kind``,
an adapter's ``task``/``kind``), never guessed from tensor shapes; asking for the other kind is a
clear error. Files are read safely (nothing in them can run code), each once. The model is built
from the checkpoint alone (:func:`gptlab.weights.checkpoint.checkpoint_model`): no task, no
Lightning, so the tools start fast and the training tasks can load a model through here too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Mapping, Sequence

import tiktoken
import torch
from torch.nn.utils.rnn import pad_sequence

from gptlab.checks import choice
from gptlab.data.prompt_styles import extract_response, get_prompt_style, left_pad
from gptlab.model.adapters import unquantized
from gptlab.model.generation import generate
from gptlab.model.gpt import GPT
from gptlab.model.heads import class_logits, reward_scores
from gptlab.model.lora import merge_lora, read_adapter
from gptlab.model.qlora import load_qlora_adapter
from gptlab.tokenizer import check_same_tokenizer, get_tokenizer
from gptlab.weights import is_training_checkpoint, safe_torch_load
from gptlab.weights.checkpoint import (LEGACY_TASK_KINDS, PREDICTION_KEYS, CheckpointError, check_gptlab_checkpoint,
                                       checkpoint_adapter, checkpoint_kind, checkpoint_model, checkpoint_tokenizer,
                                       load_backbone, prediction_settings, read_checkpoint, recorded_task, task_name)
from gptlab.weights.formats import resolve_pretrained_name
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


def check_device(v: Any) -> str | None:
    """The rule of a ``device=`` value: None when this machine has it, else what is allowed."""
    allowed = "auto, cpu, cuda, cuda:<index> or mps"
    if not isinstance(v, str):
        return allowed
    if v in ("auto", "cpu"):
        return None
    if v == "mps":
        return None if torch.backends.mps.is_available() else "auto or cpu (no MPS device is available here)"
    if v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
        if not torch.cuda.is_available():
            return "auto or cpu (no CUDA device is available here)"
        if ":" in v and int(v[5:]) >= torch.cuda.device_count():
            return f"cuda:0 ... cuda:{torch.cuda.device_count() - 1} (the CUDA devices here)"
        return None
    return allowed


PRECISION_RULE = choice(*PRECISIONS, 32, 16)
"""The rule of a ``precision=`` value (YAML may give 32 and 16 as numbers)."""


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
               overrides: Mapping[str, Any] | None = None,
               tokenizer: str | Path | tiktoken.Encoding | None = None) -> LoadedModel:
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
        tokenizer: None = the one the model was trained with (a checkpoint records it; GPT-2 for
            pretrained weights); a name (``gpt2``), a trained tokenizer's folder or an encoding: must
            be that same tokenizer (:class:`~gptlab.tokenizer.TokenizerMismatch` names both hashes),
            except for weights that record none (a Hugging Face folder, a state dict), which it then
            decodes.
    """
    if (ckpt_path is None) == (init_from is None) or not (ckpt_path or init_from):
        raise ValueError("give exactly one of ckpt_path=... (a gptlab checkpoint) or init_from=... (pretrained weights)")
    if expect is not None and expect not in KINDS:
        raise ValueError(f"expect={expect!r}; valid choices: {sorted(KINDS)}")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    ckpt = _gptlab_checkpoint_at(init_from) if init_from is not None else None
    if ckpt is not None:
        ckpt_path, init_from = init_from, None
    meta: dict[str, Any] = dict.fromkeys(PREDICTION_KEYS)
    task: str | None = None
    if ckpt_path is not None:
        source = str(ckpt_path)
        ckpt = ckpt if ckpt is not None else read_checkpoint(ckpt_path)
        kind = _file_kind(checkpoint_kind(ckpt, source), source)
        task = recorded_task(ckpt, source)
        # a QLoRA checkpoint stores its base dequantized: LoRA on exactly those weights is the trained
        # model; re-quantizing them (merge=False keeps 4 bits) rounds the scales once more
        adapter = checkpoint_adapter(ckpt)
        model = checkpoint_model(ckpt, source, unquantized(adapter) if adapter and merge else adapter)
        meta.update(prediction_settings(ckpt))
        trained_with = checkpoint_tokenizer(ckpt, source)
    else:
        source = str(init_from)
        model = load_backbone(init_from, dtype=None if precision == "keep" else torch.float32, **dict(overrides or {}))
        kind = "lm"
        trained_with = get_tokenizer("gpt2") if resolve_pretrained_name(str(init_from)) and \
            not Path(init_from).expanduser().exists() else None
    given = None if tokenizer is None else tokenizer if isinstance(tokenizer, tiktoken.Encoding) \
        else get_tokenizer(tokenizer)
    if trained_with is not None and given is not None:
        check_same_tokenizer(trained_with, given, source, f"tokenizer={tokenizer}",
                             "leave tokenizer= unset: the model decodes with its own")
    tok = trained_with or given or get_tokenizer("gpt2")
    if adapter_path is not None:
        source = f"{source} + {adapter_path}"
        _, adapter_cfg = read_adapter(adapter_path)
        meta.update({k: adapter_cfg[k] for k in meta if adapter_cfg.get(k) is not None})
        task, kind = _adapter_kind(adapter_cfg, adapter_path, task, kind)
        load_qlora_adapter(model, adapter_path)  # a LoRA file as load_adapter; a QLoRA file on its re-quantized base
    if expect is not None and kind != expect:
        what = KINDS[kind] + (f" (task {task!r})" if task else "")
        raise WrongModelKind(f"{source} holds a {what}, not a {KINDS[expect]}; {_HINTS[expect]}")
    if merge:
        merge_lora(model)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32}.get(precision)
    model = model.to(dev) if dtype is None else model.to(dev, dtype)
    return LoadedModel(model=model.eval(), kind=kind, source=source, device=dev, precision=precision,
                       tokenizer=tok, task=task, labels=meta["labels"], pooling=meta["pooling"],
                       max_length=meta["max_length"], prompt_style=meta["prompt_style"])


def tokenizer_for_checkpoint(ckpt_path: str | Path) -> tiktoken.Encoding:
    """The tokenizer a gptlab checkpoint was trained with, rebuilt from the checkpoint alone (GPT-2's
    for checkpoints written before they recorded one), without building the model."""
    return checkpoint_tokenizer(read_checkpoint(ckpt_path), ckpt_path)


def _gptlab_checkpoint_at(name_or_path: str | Path) -> dict[str, Any] | None:
    """The contents of ``name_or_path`` when it is a gptlab training checkpoint (read once), else None."""
    path = Path(name_or_path).expanduser()
    if not (path.is_file() and path.suffix in TORCH_SUFFIXES):
        return None
    obj = safe_torch_load(path)  # memory-mapped: cheap
    if is_training_checkpoint(obj):
        check_gptlab_checkpoint(obj, path)
        return obj
    return None


def _adapter_kind(cfg: Mapping[str, Any], path: str | Path, task: str | None, kind: str) -> tuple[str | None, str]:
    """The task and kind an adapter file records (its ``kind``, else its task's), or the base's."""
    name = cfg.get("task")
    if name:
        if cfg.get("kind"):
            task, kind = str(name), str(cfg["kind"])
        else:
            task = task_name(str(name), path)
            kind = LEGACY_TASK_KINDS[task]
    elif cfg.get("kind"):
        kind = cfg["kind"]
    return task, _file_kind(kind, str(path))


# ----------------------------------------------------------------------------- batched prediction
def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (B, T) ``ids`` and ``attention_mask`` (1 = real) on ``device``."""
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = pad_sequence(tensors, batch_first=True, padding_value=pad_id).to(device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    mask = (torch.arange(ids.size(1), device=device)[None, :] < lengths[:, None]).long()
    return ids, mask


@torch.no_grad()
def predict_texts(model: GPT, texts: Sequence[str], pooling: str = "last_token", max_length: int | None = None,
                  batch_size: int = 32, pad_id: int | None = None, tokenizer: Any = None,
                  progress: bool = False) -> torch.Tensor:
    """Class probabilities (N, num_classes) of ``texts`` from a classifier backbone (float32, CPU).

    Each text keeps its first ``max_length`` tokens (None = the model's context length), as the
    book's ``classify_review``; batches are right-padded to their longest text with ``pad_id``
    (None = the tokenizer's ``<|endoftext|>``; ``tokenizer`` None = GPT-2's).
    """
    from tqdm.auto import tqdm

    tok = tokenizer or get_tokenizer()
    pad_id = tok.eot_token if pad_id is None else pad_id
    device = next(model.parameters()).device
    limit = min(max_length or model.config.context_length, model.config.context_length)
    out = []
    with tqdm(total=len(texts), unit="text", disable=not progress, desc="classify") as bar:
        for start in range(0, len(texts), batch_size):
            ids = [e[:limit] or [pad_id] for e in tok.encode_ordinary_batch(list(texts[start:start + batch_size]))]
            input_ids, mask = right_pad(ids, pad_id, device)
            out.append(class_logits(model, input_ids, mask, pooling).float().softmax(dim=-1).cpu())
            bar.update(len(ids))
    if not out:
        return torch.empty(0, model.out_head.out_features)
    return torch.cat(out)


@torch.no_grad()
def generate_answers(model: torch.nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                     prompt_style: str = "alpaca", max_new_tokens: int = 256, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, tokenizer: Any = None) -> list[str]:
    """Answers to a left-padded batch of prompts (B, T): batched KV-cache generation (greedy at
    temperature 0), stopped at ``<|endoftext|>``, cut at the prompt style's stop markers, decoded
    with ``tokenizer`` (the model's ``tiktoken.Encoding``; None = GPT-2's)."""
    tok = tokenizer or get_tokenizer()
    eot = tok.eot_token
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eot, attention_mask=attention_mask)
    new = out[:, prompt_ids.size(1):].tolist()  # the prompt is stripped by position
    answers = []
    for ids in new:
        ids = ids[: ids.index(eot)] if eot in ids else ids
        answers.append(extract_response(tok.decode(ids), prompt_style))
    return answers


def answer_entries(model: torch.nn.Module, entries: Sequence[Mapping[str, Any]], prompt_style: str = "alpaca",
                   max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, batch_size: int = 8, max_prompt_length: int | None = None,
                   progress: bool = False, tokenizer: Any = None) -> list[str]:
    """Answers to every entry's instruction (+ input) in ``prompt_style``, generated in batches of
    ``batch_size`` left-padded prompts exactly as the test stage of a training run does
    (``tokenizer``: the model's; None = GPT-2's)."""
    from tqdm.auto import tqdm

    style = get_prompt_style(prompt_style)
    tok = tokenizer or get_tokenizer()
    device = next(model.parameters()).device
    answers: list[str] = []
    with tqdm(total=len(entries), unit="entry", desc="generating", disable=not progress) as bar:
        for start in range(0, len(entries), batch_size):
            part = entries[start:start + batch_size]
            ids, mask = left_pad(tok.encode_ordinary_batch([style.prompt(e) for e in part]), tok.eot_token,
                                 max_prompt_length)
            answers += generate_answers(model, ids.to(device), mask.to(device), prompt_style, max_new_tokens,
                                        temperature, top_k, top_p, tok)
            bar.update(len(part))
    return answers


@torch.no_grad()
def score_responses(model: GPT, entries: Sequence[Mapping[str, Any]], prompt_style: str = "alpaca",
                    response_key: str = "model_response", batch_size: int = 16, max_length: int | None = None,
                    pad_id: int | None = None, tokenizer: Any = None) -> list[float]:
    """Rewards of ``entry[response_key]`` as the answer to each entry's prompt (its ``instruction``
    and ``input`` in ``prompt_style``) from a reward model, tokenized exactly as in training (prompt
    ids + response ids), keeping the first ``max_length`` tokens (None = the model's context length);
    ``pad_id`` None = the tokenizer's ``<|endoftext|>``."""
    style = get_prompt_style(prompt_style)
    tok = tokenizer or get_tokenizer()
    pad_id = tok.eot_token if pad_id is None else pad_id
    device = next(model.parameters()).device
    limit = min(max_length or model.config.context_length, model.config.context_length)
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(entries), batch_size):
            part = entries[start:start + batch_size]
            prompts = tok.encode_ordinary_batch([style.prompt(e) for e in part])
            answers = tok.encode_ordinary_batch([e[response_key] for e in part])
            ids, mask = right_pad([(p + a)[:limit] for p, a in zip(prompts, answers)], pad_id, device)
            scores += reward_scores(model, ids, mask).float().cpu().tolist()
    finally:
        model.train(was_training)
    return scores


__all__ = ["LoadedModel", "load_model", "tokenizer_for_checkpoint", "resolve_device", "resolve_precision", "WrongModelKind", "KINDS",
           "PRECISIONS", "check_device", "PRECISION_RULE", "right_pad", "predict_texts", "generate_answers",
           "answer_entries", "score_responses"]
