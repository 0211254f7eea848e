"""Preference pairs for DPO (book chapter 7 bonus) and reward models: Alpaca-format entries with a
``chosen`` and a ``rejected`` response (``instruction-data-with-preference.json`` in the book).

Each side is tokenized as ``prompt + response`` exactly like :mod:`gptlab.data.instruct`, and
batched by :func:`instruction_collate` with the prompt masked, so ``chosen_labels`` /
``rejected_labels`` select the response tokens whose log-probabilities DPO compares.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from gptlab.data.base import GPTDataModule
from gptlab.data.instruct import (InstructionDataError, get_prompt_style, instruction_collate, split_entries,
                                  validate_entry)
from gptlab.tokenizer import EOT_ID, get_tokenizer

PREFERENCE_KEYS = ("chosen", "rejected")


def load_preference_data(path: str | Path) -> list[dict[str, str]]:
    """Entries with string ``instruction``, ``input``, ``output``, ``chosen`` and ``rejected``;
    errors name the file and the entry index (JSON syntax errors: line and column)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InstructionDataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list) or not data:
        raise InstructionDataError(f"{path}: expected a non-empty JSON list of entries")
    for i, entry in enumerate(data):
        validate_entry(entry, i, path)
        for key in PREFERENCE_KEYS:
            if not isinstance(entry.get(key), str):
                raise InstructionDataError(f"{path}: entry {i} needs a string {key!r}")
    return data


class PreferenceDataset(Dataset):
    """Item ``i``: ``{"chosen": {"input_ids", "prompt_length"}, "rejected": {...}, "index": i}``."""

    def __init__(self, entries: Sequence[Mapping[str, str]], tokenizer: Any = None, prompt_style: str = "alpaca"):
        self.entries = list(entries)
        style = get_prompt_style(prompt_style)
        tok = tokenizer or get_tokenizer()
        self.prompt_ids = tok.encode_ordinary_batch([style.prompt(e) for e in self.entries])
        self.response_ids = {k: tok.encode_ordinary_batch([e[k] for e in self.entries]) for k in PREFERENCE_KEYS}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.prompt_ids[i]
        item: dict[str, Any] = {k: {"input_ids": p + self.response_ids[k][i], "prompt_length": len(p)}
                                for k in PREFERENCE_KEYS}
        item["index"] = i
        return item


def preference_collate(batch: Sequence[Mapping[str, Any]], pad_id: int = EOT_ID, ignore_index: int = -100,
                       allowed_max_length: int | None = None, mask_prompt: bool = True) -> dict[str, torch.Tensor]:
    """``chosen_input_ids``, ``chosen_labels``, ``chosen_attention_mask`` and the same for
    ``rejected_``: each side batched by :func:`instruction_collate` (prompt masked by default)."""
    out: dict[str, torch.Tensor] = {}
    for side in PREFERENCE_KEYS:
        part = instruction_collate([item[side] for item in batch], pad_id, ignore_index, allowed_max_length,
                                   mask_prompt)
        out.update({f"{side}_{k}": v for k, v in part.items()})
    return out


class PreferenceDataModule(GPTDataModule):
    """Preference pairs split like the book (85% train, 10% test, 5% val, in file order).

    Args mirror :class:`~gptlab.data.instruct.InstructionDataModule`; ``path`` is required
    (e.g. the book's ``instruction-data-with-preference.json``).
    """

    def __init__(self, path: str, tokenizer: Any = None, prompt_style: str = "alpaca", train_ratio: float = 0.85,
                 test_ratio: float = 0.10, shuffle_before_split: bool = False, split_seed: int = 123,
                 max_entries: int | None = None, mask_prompt: bool = True, allowed_max_length: int | None = None,
                 pad_id: int = EOT_ID, ignore_index: int = -100, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        get_prompt_style(prompt_style)
        self.path, self.tokenizer, self.prompt_style = path, tokenizer or get_tokenizer(), prompt_style
        self.train_ratio, self.test_ratio = train_ratio, test_ratio
        self.shuffle_before_split, self.split_seed, self.max_entries = shuffle_before_split, split_seed, max_entries
        self.collate = partial(preference_collate, pad_id=pad_id, ignore_index=ignore_index,
                               allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        entries = load_preference_data(self.path)
        if self.shuffle_before_split:
            random.Random(self.split_seed).shuffle(entries)
        if self.max_entries:
            entries = entries[: self.max_entries]
        train, val, test = split_entries(entries, self.train_ratio, self.test_ratio)
        self.train_set, self.val_set, self.test_set = (
            PreferenceDataset(part, self.tokenizer, self.prompt_style) for part in (train, val, test))

    def collate_fn(self, stage: str) -> partial:
        return self.collate
