"""Instruction fine-tuning data (book chapter 7): prompt styles, the masking collate, and
:class:`InstructionDataModule` for Alpaca-format JSON (``[{"instruction", "input", "output"}, ...]``).

Sequence layout. Every entry becomes ``prompt + response`` where the *prompt* is the instruction,
the input and the response header (``"...\\n\\n### Response:\\n"``), and the *response* is the
``output``. Both parts are tokenized once, up front, and concatenated, so the prompt length is known
exactly (prompt masking needs no re-tokenization) and generation at test time starts from the very
same prompt ids the model was trained on. (On the book's 1,100 entries the concatenated ids equal
the ids of the joined text.)

``<|endoftext|>`` is **not** appended to the entries, exactly as in the book: the collate pads every
sequence by at least one ``<|endoftext|>`` and keeps the first pad as a target, so the model learns
to emit ``<|endoftext|>`` after each response (unless ``allowed_max_length`` truncates it away).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from gptlab.data.base import GPTDataModule
from gptlab.data.records import DEFAULT_MAX_RECORD_BYTES, DataFileError, read_json_records
from gptlab.tokenizer import ASSETS, EOT_ID, get_tokenizer

DEFAULT_INSTRUCTION_DATA = ASSETS / "instruction-data.json"
REQUIRED_KEYS = ("instruction", "input", "output")


class InstructionDataError(DataFileError):
    """A malformed instruction file or entry (the message names the file and the entry index)."""


# ----------------------------------------------------------------------------- prompt styles
@dataclass(frozen=True)
class PromptStyle:
    """How an entry is written as text.

    ``format_input(entry)`` is the instruction (+ input) part, ``response_header`` is what separates
    it from the response (the prompt for generation is their concatenation), ``prompt_marker`` is a
    string every prompt holds before the header, and ``stop_markers`` are strings that start a new
    turn: a generated response is cut at the first of them.
    """

    name: str
    format_input: Callable[[Mapping[str, str]], str]
    response_header: str
    prompt_marker: str
    stop_markers: tuple[str, ...]

    def prompt(self, entry: Mapping[str, str]) -> str:
        """Everything the model is given before its response."""
        return self.format_input(entry) + self.response_header

    def full_text(self, entry: Mapping[str, str]) -> str:
        """Prompt and reference response: one training example."""
        return self.prompt(entry) + entry["output"]


def _alpaca_input(entry: Mapping[str, str]) -> str:
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else "")


def _phi3_input(entry: Mapping[str, str]) -> str:
    return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry.get("input") else "")


def _raw_input(entry: Mapping[str, str]) -> str:
    return entry["instruction"] + (f"\n{entry['input']}" if entry.get("input") else "")


# Adding a style is one entry here (and then ``data.prompt_style=<name>``).
PROMPT_STYLES: dict[str, PromptStyle] = {
    # the book's chapter 7 (Stanford Alpaca's template)
    "alpaca": PromptStyle("alpaca", _alpaca_input, "\n\n### Response:\n", "### Instruction:", ("###",)),
    # the book's exercise 7.1 in Phi-3's own spelling (the book's solution writes "<|assistant|>:")
    "phi3": PromptStyle("phi3", _phi3_input, "\n<|assistant|>\n", "<|user|>", ("<|user|>", "<|assistant|>", "<|end|>")),
    # the instruction verbatim, no template: for prompts that carry their own turn markers
    # (Anthropic HH: "\n\nHuman: ...\n\nAssistant:")
    "raw": PromptStyle("raw", _raw_input, "", "", ()),
}


def get_prompt_style(name: str | PromptStyle) -> PromptStyle:
    """The registered :class:`PromptStyle` called ``name``."""
    if isinstance(name, PromptStyle):
        return name
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; valid choices: {sorted(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def format_input(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """The instruction (+ input) of ``entry`` in ``style``, without the response header (the book's
    ``format_input``)."""
    return get_prompt_style(style).format_input(entry)


def format_prompt(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """The generation prompt of ``entry``: instruction (+ input) and the response header."""
    return get_prompt_style(style).prompt(entry)


def extract_response(text: str, style: str | PromptStyle = "alpaca") -> str:
    """The model's answer inside ``text`` (a prompt + generation, or a generation alone).

    Drops everything up to the first response header when a prompt (or nothing) precedes it, then
    cuts at ``<|endoftext|>`` and at the first stop marker (a new ``###`` section, ``<|user|>``,
    ...) and strips surrounding whitespace.
    """
    st = get_prompt_style(style)
    header = st.response_header.strip()
    at = text.find(header) if header else -1
    if at >= 0 and (st.prompt_marker in text[:at] or not text[:at].strip()):
        text = text[at + len(header):]
    for stop in ("<|endoftext|>", *st.stop_markers):
        text = text.split(stop, 1)[0]
    return text.strip()


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


def split_entries(entries: Sequence[Any], train_ratio: float = 0.85, test_ratio: float = 0.10,
                  shuffle: bool = False, seed: int = 123) -> tuple[list[Any], list[Any], list[Any]]:
    """(train, val, test) as in the book: the first ``train_ratio`` trains, the next ``test_ratio``
    tests, the rest validates (1,100 entries: 935 / 55 / 110). ``shuffle`` permutes first (seeded)."""
    if not (0 < train_ratio and 0 <= test_ratio and train_ratio + test_ratio <= 1):
        raise ValueError(f"need 0 < train_ratio and train_ratio + test_ratio <= 1; got {train_ratio}, {test_ratio}")
    entries = list(entries)
    if shuffle:
        random.Random(seed).shuffle(entries)
    n_train, n_test = int(len(entries) * train_ratio), int(len(entries) * test_ratio)
    train = entries[:n_train]
    test = entries[n_train:n_train + n_test]
    val = entries[n_train + n_test:]
    return train, val, test


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


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = EOT_ID,
             max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (B, T) ``ids`` and ``attention_mask`` (1 = real), for batched
    generation. ``max_length`` keeps only the last ``max_length`` ids of each sequence."""
    rows = [torch.as_tensor(list(s)[-max_length:] if max_length else list(s), dtype=torch.long) for s in seqs]
    # pad_sequence pads on the right: flip, pad, flip back
    ids = pad_sequence([r.flip(0) for r in rows], batch_first=True, padding_value=pad_id).flip(1)
    lengths = torch.tensor([len(r) for r in rows])[:, None]
    T = ids.size(1)
    mask = (torch.arange(T)[None, :] >= T - lengths).long()
    return ids, mask


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


# ----------------------------------------------------------------------------- data that cannot train
SPLIT_NAMES = ("train", "val", "test")


def prompts_over(prompt_ids: Sequence[Sequence[int]], limit: int | None) -> list[bool]:
    """For each prompt: whether it has more than ``limit`` tokens, so batches truncated to ``limit``
    positions keep none of its response (the first response token is the label at position
    ``len(prompt) - 1``). None = no truncation: all False."""
    return [False] * len(prompt_ids) if limit is None else [len(p) > limit for p in prompt_ids]


def report_unlearnable(path: str | Path, what: str, useless: Mapping[str, int], totals: Mapping[str, int],
                       why: str, fix: str, error: type[Exception] = InstructionDataError) -> None:
    """Refuse data whose training split has nothing to learn from; warn once, with the counts per
    split, when only some entries are useless. ``useless`` / ``totals``: counts per split
    (``train``, ``val``, ``test``); ``what`` names the entries (``"entries"``, ``"pairs"``); ``why``
    says what makes them useless, ``fix`` what to change."""
    n = sum(useless.values())
    if not n:
        return
    counts = ", ".join(f"{useless.get(s, 0)} of {totals[s]} {s}" for s in SPLIT_NAMES if totals.get(s))
    if totals.get("train") and useless.get("train") == totals["train"]:
        raise error(f"{path}: none of the {totals['train']} training {what} can be learned from ({counts}): "
                    f"{why}; {fix}")
    rank_zero_warn(f"{path}: {n} {what} teach nothing ({counts}): {why}; {fix}")


# ----------------------------------------------------------------------------- data module
class InstructionDataModule(GPTDataModule):
    """Alpaca-format instruction data, split and batched as in the book's chapter 7.

    Args:
        tokenizer: a tiktoken encoding (default: GPT-2).
        path: JSON file of ``{instruction, input, output}`` entries; None = the book's 1,100 entries.
        prompt_style: a key of :data:`PROMPT_STYLES` (``alpaca``, ``phi3``).
        train_ratio, test_ratio: first part trains, next part tests, the rest validates.
        shuffle_before_split, split_seed: permute the entries (seeded) before splitting.
        max_entries: keep only the first N entries (after the optional shuffle); for quick runs.
        mask_prompt: ignore the prompt positions in ``labels`` (learn only the responses).
        allowed_max_length: truncate batches to this many positions (None = no limit).
        batch_size, val_batch_size, num_workers, shuffle, drop_last, pin_memory: DataLoader settings
            (training batches are shuffled with the last partial batch dropped, as in the book).
        max_prompt_length: test-time prompts keep only their last N tokens (None = whole prompt).
        max_record_bytes: refuse an entry whose JSON is longer (None = no limit; see
            :mod:`gptlab.data.records`).
    """

    def __init__(self, tokenizer: Any = None, path: str | None = None, prompt_style: str = "alpaca",
                 train_ratio: float = 0.85, test_ratio: float = 0.10, shuffle_before_split: bool = False,
                 split_seed: int = 123, max_entries: int | None = None, mask_prompt: bool = True,
                 allowed_max_length: int | None = None, pad_id: int = EOT_ID, ignore_index: int = -100,
                 batch_size: int = 8, val_batch_size: int | None = None, num_workers: int = 0,
                 shuffle: bool = True, drop_last: bool = True, pin_memory: bool = True,
                 max_prompt_length: int | None = None, max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        get_prompt_style(prompt_style)  # fail fast on a typo
        self.tokenizer = tokenizer or get_tokenizer()
        self.path, self.prompt_style, self.max_record_bytes = path, prompt_style, max_record_bytes
        self.train_ratio, self.test_ratio = train_ratio, test_ratio
        self.shuffle_before_split, self.split_seed, self.max_entries = shuffle_before_split, split_seed, max_entries
        self.max_prompt_length = max_prompt_length
        self.collate_kwargs = dict(pad_id=pad_id, ignore_index=ignore_index,
                                   allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        entries = load_instruction_data(self.path, self.max_record_bytes)
        if self.shuffle_before_split:
            random.Random(self.split_seed).shuffle(entries)
        if self.max_entries:
            entries = entries[: self.max_entries]
        train, val, test = split_entries(entries, self.train_ratio, self.test_ratio)
        self.train_set, self.val_set, self.test_set = (
            InstructionDataset(part, self.tokenizer, self.prompt_style) for part in (train, val, test))
        mask = self.collate_kwargs["mask_prompt"]
        if mask:
            self.check_learnable()
        rank_zero_info(f"instruction data {self.path or DEFAULT_INSTRUCTION_DATA}: {len(train)} train / "
                       f"{len(val)} val / {len(test)} test entries, prompt style {self.prompt_style!r}, "
                       + ("loss on responses only (mask_prompt=true)" if mask else
                          "loss on prompts AND responses (mask_prompt=false, as in the book)"))

    def check_learnable(self) -> None:
        """With masked prompts, an entry whose prompt alone is longer than ``allowed_max_length``
        has every label masked (its loss is 0/0 = NaN, and the non-finite guard would blame the
        learning rate): refused when every training entry is such, one warning with the counts
        when some are (:func:`report_unlearnable`)."""
        limit = self.collate_kwargs["allowed_max_length"]
        splits = dict(zip(SPLIT_NAMES, (self.train_set, self.val_set, self.test_set)))
        over = {name: prompts_over(ds.prompt_ids, limit) for name, ds in splits.items()}
        longest = max((len(p) for ds in splits.values() for p in ds.prompt_ids), default=0)
        report_unlearnable(
            self.path or DEFAULT_INSTRUCTION_DATA, "entries", {k: sum(v) for k, v in over.items()},
            {k: len(ds) for k, ds in splits.items()},
            f"their prompts (up to {longest} tokens) are longer than data.allowed_max_length={limit} tokens "
            "(model.context_length by default), so with data.mask_prompt=true every label is masked and the "
            "loss is 0/0 = NaN",
            "raise data.allowed_max_length (at most model.context_length), shorten the prompts, or set "
            "data.mask_prompt=false")

    @property
    def test_entries(self) -> list[dict[str, str]]:
        self.setup()
        return self.test_set.entries

    def collate_fn(self, stage: str) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
        """Training and validation batches: :func:`instruction_collate`; test batches add what
        generation needs (:class:`InstructionTestCollate`)."""
        if stage == "test":
            return InstructionTestCollate(self.test_set, self.max_prompt_length, **self.collate_kwargs)
        return partial(instruction_collate, **self.collate_kwargs)
