"""JSON / JSON-lines record data: reading a file into a list of entries, with errors a user can act
on, and :class:`RecordDataModule`, the base of the data modules built on such files (instruction,
preference and prompt data): load, shuffle, split, wrap.

``.jsonl`` / ``.ndjson`` files hold one JSON value per line (blank lines are skipped), read one line
at a time; any other file is one JSON list. Every failure names the file, and where it can the line
(and column) or the entry index: a missing file, bytes that are not UTF-8, a JSON syntax error, a
file that is not a list, an empty file, an entry larger than ``max_record_bytes``.

Why a bound on an entry's size: no training example needs more than a context (1,024 GPT-2 tokens
are about 4 KB of English text), while one oversized entry is tokenized, padded and batched whole:
a single 50 MB line took 5.2 GB of memory in ``gptlab-train``. A JSON-lines file is read line by line
and an oversized line is refused after reading at most ``max_record_bytes`` of it.

Data that cannot train is refused before training, naming the file
(:meth:`RecordDataModule.report_unlearnable`): an entry whose scored part starts beyond the batch
length (:func:`starts_beyond`) has every label masked, so its loss is 0/0 = NaN; when every training
entry is such the run is refused, when some are one warning gives the counts per split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset

from gptlab.checks import Problem, boolean, choice, integer, number, ratios_fit
from gptlab.data.base import GPTDataModule
from gptlab.data.prompt_styles import PROMPT_STYLES
from gptlab.errors import InvalidInput
from gptlab.tokenizer import get_tokenizer

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_MAX_RECORD_BYTES = 1_000_000
"""Largest entry a data file may hold, in bytes of its JSON text (``data.max_record_bytes``): 250
contexts of 1,024 tokens."""
SPLIT_NAMES = ("train", "val", "test")
_CHUNK = 1 << 20


class DataFileError(InvalidInput):
    """A malformed data file or entry (the message names the file and the entry or line)."""


@dataclass
class Records:
    """The entries of one file; ``lines[i]`` is the line entry ``i`` starts on (JSON lines only)."""

    path: Path
    entries: list[Any]
    lines: list[int] | None = None

    def where(self, index: int) -> str:
        """``"<file>: entry 3"`` (``"<file>: entry 3 (line 5)"`` for JSON lines), for messages."""
        line = f" (line {self.lines[index]})" if self.lines else ""
        return f"{self.path}: entry {index}{line}"


def read_text_utf8(path: Path, error: type[Exception] = DataFileError) -> str:
    """The file's text; a byte-order mark is dropped, bytes that are not UTF-8 raise ``error``
    naming the file and the byte offset."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the file as UTF-8") from None


def read_json_records(path: str | Path, what: str = "data", error: type[Exception] = DataFileError,
                      max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES) -> Records:
    """The entries of a JSON list file or a JSON-lines file (by suffix, see :data:`JSONL_SUFFIXES`).

    ``what`` names the data in messages (``"preference data file not found: ..."``); ``error`` is
    the exception class raised for malformed files (a :class:`DataFileError` subclass);
    ``max_record_bytes`` (None = no limit) refuses an entry whose JSON text is longer, naming the
    file and the line (JSON lines) or the entry index (a JSON list).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _read_json_lines(path, error, max_record_bytes)
    text = read_text_utf8(path, error)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise error(f"{path}: expected a JSON list of entries, got {type(data).__name__} "
                    f"(or name the file .jsonl for one entry per line)")
    if not data:
        raise error(f"{path}: the file holds no entries")
    if max_record_bytes is not None:
        for i, entry in enumerate(data):
            size = len(json.dumps(entry, ensure_ascii=False).encode())
            if size > max_record_bytes:
                raise error(f"{path}: entry {i} is {size:,} bytes of JSON, more than data.max_record_bytes="
                            f"{max_record_bytes:,} ({_WHY_BOUND})")
    return Records(path, data)


_WHY_BOUND = "a context of 1,024 tokens is about 4 KB of text; split or shorten it, or raise the limit"


def _read_json_lines(path: Path, error: type[Exception], max_bytes: int | None) -> Records:
    """One entry per non-blank line, read one line at a time; a line longer than ``max_bytes`` is
    refused after reading ``max_bytes`` of it (its length is counted in fixed-size chunks)."""
    entries, lines, offset = [], [], 0
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(-1 if max_bytes is None else max_bytes + 3)  # + room for "\r\n"
            if not raw:
                break
            lineno += 1
            body = raw.rstrip(b"\r\n")
            if max_bytes is not None and len(body) > max_bytes:
                size = len(body) + (0 if raw.endswith(b"\n") else _rest_of_line(f))
                raise error(f"{path}: line {lineno} is {size:,} bytes long, more than data.max_record_bytes="
                            f"{max_bytes:,} ({_WHY_BOUND})")
            try:
                text = body.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}: not UTF-8 text (byte {offset + e.start}, line {lineno}: {e.reason}); "
                            "save the file as UTF-8") from None
            offset += len(raw)
            if not text.strip():
                continue
            try:
                entries.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise error(f"{path}: invalid JSON at line {lineno}, column {e.colno}: {e.msg}") from None
            lines.append(lineno)
    if not entries:
        raise error(f"{path}: the file holds no entries")
    return Records(path, entries, lines)


def _rest_of_line(f: BinaryIO) -> int:
    """Bytes up to the end of the current line (its ending excluded), read in fixed-size chunks."""
    n = 0
    while chunk := f.readline(_CHUNK):
        n += len(chunk.rstrip(b"\r\n"))
        if chunk.endswith(b"\n"):
            break
    return n


def starts_beyond(first_scored: Sequence[int], limit: int | None) -> list[bool]:
    """For each entry whose first scored token sits at index ``first_scored[i]`` (its prompt length,
    when the prompt is masked): whether batches truncated to ``limit`` positions keep none of its
    labels (the first scored label sits at position ``first_scored[i] - 1``). None = no truncation:
    all False."""
    return [False] * len(first_scored) if limit is None else [n > limit for n in first_scored]


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


class RecordDataModule(GPTDataModule):
    """A data module over one JSON / JSON-lines file of entries, split as the book splits its
    instruction data: :meth:`setup` loads the entries (:meth:`load_entries`), permutes them when
    ``shuffle_before_split`` (seeded by ``split_seed``), keeps the first ``max_entries``, splits them
    (:func:`split_entries` with ``train_ratio`` / ``test_ratio``), wraps each part in a dataset
    (:meth:`make_dataset`) and logs what it made (:meth:`after_split`, where subclasses also warn
    or refuse).

    Args (every subclass takes them; its own come first):
        tokenizer: a tiktoken encoding (default: GPT-2).
        path: the JSON / JSON-lines file; None = :attr:`default_path`.
        prompt_style: ``alpaca`` | ``phi3`` | ``raw`` (:data:`gptlab.data.prompt_styles.PROMPT_STYLES`):
            the style the model learns (or learned) its prompts in.
        train_ratio, test_ratio: the first part trains, the next part tests, the rest validates.
        shuffle_before_split, split_seed: permute the entries (seeded) before splitting.
        max_entries: keep only the first N entries (after the optional shuffle); for quick runs.
        max_prompt_length: generation prompts keep only their last N tokens (None = whole prompt).
        pad_id: the padding token id (None = the tokenizer's ``<|endoftext|>``: :attr:`pad_id`).
        max_record_bytes: refuse an entry whose JSON is longer than this many bytes (None = no limit;
            see the module docstring).
        batch_size, val_batch_size, num_workers, shuffle, drop_last, pin_memory: DataLoader settings
            (:class:`~gptlab.data.base.GPTDataModule`).
    """

    RULES = {"prompt_style": choice(*PROMPT_STYLES, name="prompt style"), "train_ratio": number(gt=0, le=1),
             "test_ratio": number(ge=0, lt=1), "shuffle_before_split": boolean(), "split_seed": integer(),
             "max_entries": integer(ge=1, optional=True), "max_prompt_length": integer(ge=1, optional=True),
             "pad_id": integer(ge=0, optional=True), "max_record_bytes": integer(ge=1, optional=True)}

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        return super().check_relations(node) + ratios_fit(node, "train_ratio", "test_ratio", "validates")

    def __init__(self, tokenizer: Any = None, path: str | None = None, prompt_style: str = "alpaca",
                 train_ratio: float = 0.85, test_ratio: float = 0.10, shuffle_before_split: bool = False,
                 split_seed: int = 123, max_entries: int | None = None, max_prompt_length: int | None = None,
                 pad_id: int | None = None, batch_size: int = 8,
                 global_batch_size: int | None = None, val_batch_size: int | None = None, num_workers: int = 0,
                 shuffle: bool = True, drop_last: bool = True, pin_memory: bool = True,
                 max_record_bytes: int | None = DEFAULT_MAX_RECORD_BYTES):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)  # the subclass's arguments too
        self.check_hparams()
        self.tokenizer = tokenizer or get_tokenizer()

    what = "records"
    """What the file holds, for the log line (``instruction data``, ``preference data``, ...)."""
    unit = "entries"
    """What one entry is, for the log line (``pairs``, ``prompts``)."""
    default_path: Path | None = None
    """The file used when ``path`` is None (shipped in ``gptlab/assets``)."""

    def load_entries(self) -> list[Any]:
        """The validated entries of the file at ``hparams.path`` (None: :attr:`default_path`)."""
        raise NotImplementedError

    def make_dataset(self, entries: list[Any]) -> Dataset:
        """One split's entries, tokenized."""
        raise NotImplementedError

    @property
    def path(self) -> str | None:
        return self.hparams.path

    @property
    def pad_id(self) -> int:
        """The padding id: ``hparams.pad_id``, or (None) the tokenizer's ``<|endoftext|>``."""
        return self.tokenizer.eot_token if self.hparams.pad_id is None else self.hparams.pad_id

    @property
    def max_prompt_length(self) -> int | None:
        return self.hparams.max_prompt_length

    @property
    def max_record_bytes(self) -> int | None:
        return self.hparams.get("max_record_bytes", DEFAULT_MAX_RECORD_BYTES)

    @property
    def prompt_style(self) -> str:
        return self.hparams.prompt_style

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        entries = self.load_entries()
        if hp.shuffle_before_split:
            random.Random(hp.split_seed).shuffle(entries)
        if hp.max_entries:
            entries = entries[: hp.max_entries]
        parts = split_entries(entries, hp.train_ratio, hp.test_ratio)
        self.train_set, self.val_set, self.test_set = (self.make_dataset(part) for part in parts)
        self.after_split()

    def after_split(self, note: str = "") -> None:
        """Log what :meth:`setup` made (rank zero), with ``note`` at the end; subclasses add their
        warnings and refusals."""
        sizes = " / ".join(f"{len(ds)} {name}" for name, ds in
                           (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)))
        rank_zero_info(f"{self.what} {self.path or self.default_path or '(generated)'}: {sizes} {self.unit}, "
                       f"prompt style {self.prompt_style!r}{note}")

    def report_unlearnable(self, useless: Mapping[str, int], why: str, fix: str,
                           error: type[Exception] = DataFileError) -> None:
        """Refuse data whose training split has nothing to learn from (``error``, naming the file);
        warn once, with the counts per split, when only some entries are useless. ``useless``: the
        count per split (``train``, ``val``, ``test``); ``why`` says what makes them useless, ``fix``
        what to change."""
        n = sum(useless.values())
        if not n:
            return
        totals = dict(zip(SPLIT_NAMES, (len(self.train_set), len(self.val_set), len(self.test_set))))
        counts = ", ".join(f"{useless.get(s, 0)} of {totals[s]} {s}" for s in SPLIT_NAMES if totals[s])
        path = self.path or self.default_path
        if totals["train"] and useless.get("train") == totals["train"]:
            raise error(f"{path}: none of the {totals['train']} training {self.unit} can be learned from "
                        f"({counts}): {why}; {fix}")
        rank_zero_warn(f"{path}: {n} {self.unit} teach nothing ({counts}): {why}; {fix}")

    @property
    def test_entries(self) -> list[Any]:
        """The raw entries of the test split."""
        self.setup()
        return self.test_set.entries


__all__ = ["JSONL_SUFFIXES", "DEFAULT_MAX_RECORD_BYTES", "SPLIT_NAMES", "DataFileError", "Records", "read_text_utf8",
           "read_json_records", "starts_beyond", "split_entries", "RecordDataModule"]
