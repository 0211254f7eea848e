"""Instruction fine-tuning data (book chapter 7): the masking collate and
:class:`InstructionDataModule` for Alpaca-format JSON (``[{"instruction", "input", "output"}, ...]``).

Sequence layout. Every entry becomes ``prompt + response`` where the *prompt* is the instruction,
the input and the response header (``"...\\n\\n### Response:\\n"``), and the *response* is the
``output``. Both parts are tokenized once, up front, and concatenated, so the prompt length is known
exactly (prompt masking needs no re-tokenization) and generation at test time starts from the very
same prompt ids the model was trained on. (On the book's 1,100 entries the concatenated ids equal
the ids of the joined text.) How an entry is written as text is its prompt style
(:mod:`gptlab.data.prompt_styles`).

``<|endoftext|>`` is **not** appended to the entries, exactly as in the book: the collate pads every
sequence by at least one ``<|endoftext|>`` and keeps the first pad as a target, so the model learns
to emit ``<|endoftext|>`` after each response (unless ``allowed_max_length`` truncates it away).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from gptlab.checks import boolean, integer
from gptlab.data.prompt_styles import (PROMPT_STYLES, PromptStyle, extract_response, format_input, format_prompt,
                                       get_prompt_style, left_pad)
from gptlab.data.records import (DEFAULT_MAX_RECORD_BYTES, SPLIT_NAMES, DataFileError, RecordDataModule,
                                 read_json_records, starts_beyond)
from gptlab.tokenizer import ASSETS, EOT_ID, get_tokenizer

DEFAULT_INSTRUCTION_DATA = ASSETS / "instruction-data.json"
REQUIRED_KEYS = ("instruction", "input", "output")


class InstructionDataError(DataFileError):
    """A malformed instruction file or entry (the message names the file and the entry index)."""


# ----------------------------------------------------------------------------- loading
def load_instruction_data(path: str | Path | None = None,
                          max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> list[dict[str, str]]:
    """Entries of an Alpaca-format JSON (or JSON-lines ``.jsonl``) file (default: the book's 1,100
    entries shipped in ``gptlab/assets``). Raises :class:`InstructionDataError` naming the file, and
    the entry index or the line/column of a JSON syntax error (or the byte that is not UTF-8, or an
    entry longer than ``max_record_bytes``)."""
    records = read_json_records(path or DEFAULT_INSTRUCTION_DATA, "instruction data", InstructionDataError,
                                max_record_bytes)
    for i, entry in enumerate(records.entries):
        validate_entry(entry, i, records.path, where=records.where(i))
    return records.entries


def validate_entry(entry: Any, index: int, path: str | Path = "<data>", where: str | None = None) -> None:
    """Raise :class:`InstructionDataError` unless ``entry`` has string ``instruction``, ``input``
    and ``output`` fields. Messages start with ``where`` (default ``"<path>: entry <index>"``)."""
    where = where or f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise InstructionDataError(f"{where} must be an object with keys {list(REQUIRED_KEYS)}, "
                                   f"got {type(entry).__name__}")
    for key in REQUIRED_KEYS:
        if key not in entry:
            raise InstructionDataError(f"{where} has no {key!r} key (it has {sorted(entry)})")
        if not isinstance(entry[key], str):
            raise InstructionDataError(f"{where}: {key!r} must be a string, "
                                       f"got {type(entry[key]).__name__} ({entry[key]!r:.60})")


# ----------------------------------------------------------------------------- dataset + collate
class InstructionDataset(Dataset):
    """Entries tokenized once (tiktoken batch encode): item ``i`` is
    ``{"input_ids": prompt + response ids, "prompt_length": int, "index": i}``."""

    def __init__(self, entries: Sequence[Mapping[str, str]], tokenizer: Any = None,
                 prompt_style: str | PromptStyle = "alpaca"):
        self.entries = list(entries)
        self.style = get_prompt_style(prompt_style)
        tok = tokenizer or get_tokenizer()
        # ordinary encoding: a literal "<|endoftext|>" in the data is text, never the special id
        prompts = tok.encode_ordinary_batch([self.style.prompt(e) for e in self.entries])
        responses = tok.encode_ordinary_batch([e["output"] for e in self.entries])
        self.prompt_ids = prompts
        self.input_ids = [p + r for p, r in zip(prompts, responses)]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "prompt_length": len(self.prompt_ids[i]), "index": i}


def instruction_collate(batch: Sequence[Mapping[str, Any] | Sequence[int]], pad_id: int = EOT_ID,
                        ignore_index: int = -100, allowed_max_length: int | None = None,
                        mask_prompt: bool = False) -> dict[str, torch.Tensor]:
    """The book's ``custom_collate_fn``, vectorised.

    ``batch``: items ``{"input_ids": ids, "prompt_length": int}`` (or plain id lists when
    ``mask_prompt`` is off). Each sequence is padded with ``pad_id`` to the batch's longest length
    plus one; ``input_ids`` drop the last position, ``labels`` the first (shift by one). In
    ``labels`` every pad but the first is ``ignore_index`` (the first pad is the end-of-text target),
    and with ``mask_prompt`` so is every position that predicts a prompt token, leaving only the
    response (and its end-of-text) to learn. ``allowed_max_length`` truncates both.

    Returns ``input_ids``, ``labels`` (B, T) long and ``attention_mask`` (B, T) long (1 = real token).
    """
    if not batch:
        raise ValueError("instruction_collate got an empty batch")
    mapped = isinstance(batch[0], Mapping)
    seqs = [torch.as_tensor(item["input_ids"] if mapped else item, dtype=torch.long) for item in batch]
    lengths = torch.tensor([len(s) for s in seqs])[:, None]  # (B, 1)
    B, T = len(seqs), int(lengths.max())
    # (B, T + 1): every row gets at least one pad, which becomes the end-of-text target
    padded = torch.cat([pad_sequence(seqs, batch_first=True, padding_value=pad_id),
                        torch.full((B, 1), pad_id, dtype=torch.long)], dim=1)
    input_ids = padded[:, :-1]
    labels = padded[:, 1:].clone()
    pos = torch.arange(T)[None, :]  # (1, T); labels[:, j] is token j + 1
    labels[pos >= lengths] = ignore_index  # pads after the first (which sits at j = length - 1)
    if mask_prompt:
        if not mapped:
            raise ValueError("mask_prompt=True needs items with a 'prompt_length'")
        prompt_lengths = torch.tensor([int(item["prompt_length"]) for item in batch])[:, None]
        labels[pos < prompt_lengths - 1] = ignore_index  # targets that are prompt tokens
    attention_mask = (pos < lengths).long()
    if allowed_max_length is not None:
        input_ids, labels = input_ids[:, :allowed_max_length], labels[:, :allowed_max_length]
        attention_mask = attention_mask[:, :allowed_max_length]
    return {"input_ids": input_ids.contiguous(), "labels": labels.contiguous(),
            "attention_mask": attention_mask.contiguous()}


class InstructionTestCollate:
    """Test batches: the training fields (for ``test/loss``) plus what generation needs:
    left-padded ``prompt_ids`` / ``prompt_attention_mask``, the entries' ``index`` and the raw
    ``entries`` (a list of dicts).

    ``dataset`` needs ``prompt_ids`` and ``entries``; ``collate_fn`` builds the training fields
    (default :func:`instruction_collate`; preference data passes its own).
    """

    def __init__(self, dataset: Dataset, max_prompt_length: int | None = None,
                 collate_fn: Callable[..., dict[str, Any]] = instruction_collate, **collate_kwargs: Any):
        self.dataset = dataset
        self.max_prompt_length = max_prompt_length
        self.collate_fn = collate_fn
        self.collate_kwargs = collate_kwargs

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = self.collate_fn(items, **self.collate_kwargs)
        idx = [int(it["index"]) for it in items]
        pad_id = self.collate_kwargs.get("pad_id", EOT_ID)
        out["prompt_ids"], out["prompt_attention_mask"] = left_pad(
            [self.dataset.prompt_ids[i] for i in idx], pad_id, self.max_prompt_length)
        out["index"] = torch.tensor(idx)
        out["entries"] = [self.dataset.entries[i] for i in idx]
        return out


# ----------------------------------------------------------------------------- data module
class InstructionDataModule(RecordDataModule):
    """Alpaca-format instruction data, split and batched as in the book's chapter 7 (1,100 entries:
    935 train / 55 val / 110 test; training batches shuffled with the last partial batch dropped).

    Args:
        mask_prompt: ignore the prompt positions in ``labels`` (learn only the responses).
        allowed_max_length: truncate batches to this many positions (None = no limit).
        ignore_index: the label of positions without a loss.
        **kwargs: :class:`~gptlab.data.records.RecordDataModule` arguments (``path``: a JSON file of
            ``{instruction, input, output}`` entries, None = the book's; ``prompt_style``, the split
            and loader settings).
    """

    what, unit, default_path = "instruction data", "entries", DEFAULT_INSTRUCTION_DATA

    RULES = {"mask_prompt": boolean(), "allowed_max_length": integer(ge=1, optional=True), "ignore_index": integer()}

    def __init__(self, mask_prompt: bool = True, allowed_max_length: int | None = None, ignore_index: int = -100,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.collate_kwargs = dict(pad_id=self.pad_id, ignore_index=ignore_index,
                                   allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)

    def load_entries(self) -> list[dict[str, str]]:
        return load_instruction_data(self.path, self.max_record_bytes)

    def make_dataset(self, entries: list[dict[str, str]]) -> InstructionDataset:
        return InstructionDataset(entries, self.tokenizer, self.prompt_style)

    def after_split(self, note: str = "") -> None:
        mask = self.collate_kwargs["mask_prompt"]
        super().after_split(", loss on responses only (mask_prompt=true)" if mask else
                            ", loss on prompts AND responses (mask_prompt=false, as in the book)")
        if mask:
            self.check_learnable()

    def check_learnable(self) -> None:
        """With masked prompts, an entry whose prompt alone is longer than ``allowed_max_length``
        has every label masked (its loss is 0/0 = NaN, and the non-finite guard would blame the
        learning rate): refused when every training entry is such, one warning with the counts
        when some are (:meth:`~gptlab.data.records.RecordDataModule.report_unlearnable`)."""
        limit = self.collate_kwargs["allowed_max_length"]
        splits = dict(zip(SPLIT_NAMES, (self.train_set, self.val_set, self.test_set)))
        useless = {name: sum(starts_beyond([len(p) for p in ds.prompt_ids], limit)) for name, ds in splits.items()}
        longest = max((len(p) for ds in splits.values() for p in ds.prompt_ids), default=0)
        self.report_unlearnable(
            useless,
            f"their prompts (up to {longest} tokens) are longer than data.allowed_max_length={limit} tokens "
            "(model.context_length by default), so with data.mask_prompt=true every label is masked and the "
            "loss is 0/0 = NaN",
            "raise data.allowed_max_length (at most model.context_length), shorten the prompts, or set "
            "data.mask_prompt=false", InstructionDataError)

    def collate_fn(self, stage: str) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
        """Training and validation batches: :func:`instruction_collate`; test batches add what
        generation needs (:class:`InstructionTestCollate`)."""
        if stage == "test":
            return InstructionTestCollate(self.test_set, self.max_prompt_length, **self.collate_kwargs)
        return partial(instruction_collate, **self.collate_kwargs)


__all__ = ["DEFAULT_INSTRUCTION_DATA", "InstructionDataError", "load_instruction_data", "validate_entry",
           "InstructionDataset", "instruction_collate", "InstructionTestCollate", "InstructionDataModule",
           # prompt styles, kept importable from here (gptlab.data.prompt_styles is their home)
           "PROMPT_STYLES", "PromptStyle", "get_prompt_style", "format_input", "format_prompt", "extract_response",
           "left_pad"]
