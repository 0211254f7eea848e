"""Prompts for RLHF (``task=ppo``): the policy writes the responses itself, so the data is prompts only.

Any JSON list file or JSON-lines file (``.jsonl``, one entry per line) whose entries are

* Alpaca-style ``{"instruction", "input", ...}`` objects: the book's instruction data (the default,
  shipped in ``gptlab/assets``) or its preference data (``chosen``/``rejected`` are ignored);
* ``{"prompt": ...}`` objects (``prompt`` is the instruction);
* plain strings (each is the instruction).

Every prompt is written in ``prompt_style`` exactly as SFT and reward-model data are (so a policy
and a reward model trained on gptlab's instruction/preference data see the prompts they learned),
tokenized once, and batched left-padded for batched KV-cache generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from gptlab.data.instruct import DEFAULT_INSTRUCTION_DATA
from gptlab.data.prompt_styles import get_prompt_style, left_pad
from gptlab.data.records import DEFAULT_MAX_RECORD_BYTES, DataFileError, RecordDataModule, read_json_records
from gptlab.tokenizer import EOT_ID, get_tokenizer


class PromptDataError(DataFileError):
    """A malformed prompt file or entry (the message names the file and the entry)."""


def normalize_prompt(entry: Any, where: str) -> dict[str, Any]:
    """One entry as ``{"instruction", "input", ...}`` (other keys kept): a string, or an object with
    a string ``prompt`` or ``instruction`` (and an optional string ``input``)."""
    if isinstance(entry, str):
        entry = {"instruction": entry, "input": ""}
    if not isinstance(entry, dict):
        raise PromptDataError(f"{where} must be a string or an object with 'prompt' (or 'instruction' + 'input'), "
                              f"got {type(entry).__name__}")
    out = dict(entry)
    if "prompt" in entry and "instruction" not in entry:
        out["instruction"], out["input"] = entry["prompt"], entry.get("input", "")
    if not isinstance(out.get("instruction"), str):
        got = type(out["instruction"]).__name__ if "instruction" in out else "nothing"
        raise PromptDataError(f"{where} needs a string 'prompt' or 'instruction', got {got} (keys: {sorted(entry)})")
    out.setdefault("input", "")
    if not isinstance(out["input"], str):
        raise PromptDataError(f"{where}: 'input' must be a string, got {type(out['input']).__name__}")
    if not (out["instruction"].strip() or out["input"].strip()):
        raise PromptDataError(f"{where}: the prompt is empty")
    return out


def load_prompts(path: str | Path | None = None,
                 max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> list[dict[str, Any]]:
    """Normalised entries (:func:`normalize_prompt`) of a prompt file (default: the book's 1,100
    instruction entries). Errors name the file and the entry (JSON lines: and the line); an entry
    longer than ``max_record_bytes`` is refused."""
    records = read_json_records(path or DEFAULT_INSTRUCTION_DATA, "prompt data", PromptDataError, max_record_bytes)
    return [normalize_prompt(e, records.where(i)) for i, e in enumerate(records.entries)]


class PromptDataset(Dataset):
    """Prompts tokenized once: ``prompts[i]`` is the text the model is given (the entry in the
    prompt style, response header included), ``prompt_ids[i]`` its ids. Item ``i`` is ``{"index": i}``:
    the collate reads the rest from the dataset."""

    def __init__(self, entries: Sequence[Mapping[str, Any]], tokenizer: Any = None, prompt_style: str = "alpaca"):
        self.entries = list(entries)
        style = get_prompt_style(prompt_style)
        tok = tokenizer or get_tokenizer()
        self.prompts = [style.prompt(e) for e in self.entries]
        # ordinary encoding: a literal "<|endoftext|>" in a prompt is text, never the special id
        self.prompt_ids = tok.encode_ordinary_batch(self.prompts)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"index": i}


class PromptCollate:
    """Batches of prompts for generation: left-padded ``prompt_ids`` and ``prompt_attention_mask``
    (B, P) (1 = real token), ``index`` (B,), and the raw ``entries`` and ``prompts`` (texts) as lists.
    The same fields as instruction test batches, so test-stage answering works on either.
    ``max_prompt_length`` keeps the last N tokens of a longer prompt (its response header survives)."""

    def __init__(self, dataset: PromptDataset, max_prompt_length: int | None = None, pad_id: int = EOT_ID):
        self.dataset, self.max_prompt_length, self.pad_id = dataset, max_prompt_length, pad_id

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        idx = [int(it["index"]) for it in items]
        ds = self.dataset
        ids, mask = left_pad([ds.prompt_ids[i] for i in idx], self.pad_id, self.max_prompt_length)
        return {"prompt_ids": ids, "prompt_attention_mask": mask, "index": torch.tensor(idx),
                "entries": [ds.entries[i] for i in idx], "prompts": [ds.prompts[i] for i in idx]}


class PromptDataModule(RecordDataModule):
    """Prompts split like the book's instruction data (first 85% train, next 10% test, the rest
    validation, which PPO does not use); every training batch is one PPO iteration's prompts.

    Args:
        batch_size: prompts per PPO iteration (rollout batch size); ``val_batch_size`` for the test stage.
        **kwargs: :class:`~gptlab.data.records.RecordDataModule` arguments (``path``: a JSON /
            JSON-lines prompt file (module docstring), None = the book's instruction data;
            ``prompt_style``: the style the SFT model (and the reward model) learned;
            ``max_prompt_length``: keep the last N tokens of longer prompts (None = all; the task
            checks that prompt + response fit the context); the split and loader settings).
    """

    what, unit, default_path = "prompts", "prompts", DEFAULT_INSTRUCTION_DATA

    def __init__(self, batch_size: int = 16, **kwargs: Any):
        super().__init__(batch_size=batch_size, **kwargs)

    def load_entries(self) -> list[dict[str, Any]]:
        return load_prompts(self.path, self.max_record_bytes)

    def make_dataset(self, entries: list[dict[str, Any]]) -> PromptDataset:
        return PromptDataset(entries, self.tokenizer, self.prompt_style)

    def after_split(self, note: str = "") -> None:
        super().after_split(note)
        if len(self.train_set) < self.batch_size and self.hparams.drop_last:
            raise ValueError(f"{len(self.train_set)} training prompts do not fill one batch of data.batch_size="
                             f"{self.batch_size} (drop_last=true); lower the batch size or add prompts")
        if self.max_prompt_length is not None:
            cut = sum(len(p) > self.max_prompt_length for ds in (self.train_set, self.test_set) for p in ds.prompt_ids)
            if cut:
                rank_zero_warn(f"{cut} prompts are longer than max_prompt_length={self.max_prompt_length} tokens; "
                               "they keep their last tokens")

    def collate_fn(self, stage: str) -> PromptCollate:
        """Left-padded prompts of the stage's dataset (PPO has no validation stage)."""
        ds = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[stage]
        return PromptCollate(ds, self.max_prompt_length, self.pad_id)


__all__ = ["PromptDataError", "normalize_prompt", "load_prompts", "PromptDataset", "PromptCollate",
           "PromptDataModule"]
