"""Text classification data (book chapter 6): the SMS Spam Collection, or any labelled text file.

Pipeline, as in the book: read the ``label<TAB>text`` rows -> balance the classes by undersampling
the majority -> shuffle (seeded) and split 70 / 10 / 20 -> tokenize once -> pad with
``<|endoftext|>`` to the longest training sequence (or a configured ``max_length``, truncating).

The SMS Spam Collection v.1 (UCI #228; Almeida, Gomez Hidalgo, Yamakami, DocEng'11; CC BY 4.0) ships
in ``gptlab/assets/sms_spam_collection/`` (see ``gptlab/assets/NOTICE.md``), so the default needs no
network: 5,574 lines, which the book's reader makes 5,572 messages, 4,825 ham and 747 spam.

Quoting: the book reads the file with ``pd.read_csv(sep="\\t", header=None)``, whose default
CSV quoting strips the double quotes around 43 messages and, where a message opens a quote it
never closes, joins the following lines into that field (3 lines become 1 message). The default
``quoting="minimal"`` reads the file the same way, with the standard library's ``csv`` module, so
the balanced sample and the 1,045 / 149 / 300 split are the book's row for row. ``quoting="none"``
splits every line on its first tab and keeps quotes as text (5,574 messages, 4,827 ham), for
files whose quotes are literal.

Batches: ``{"input_ids": (B, T) long, "attention_mask": (B, T) long (1 = real token),
"label": (B,) long}``, right-padded. With causal attention the pads after the last real token do
not change its hidden state, so a classifier reading the last *real* token sees exactly what it
would see on the unpadded text.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from gptlab.checks import Problem, boolean, choice, encoding, integer, number, ratios_fit, strings, text
from gptlab.data.base import GPTDataModule
from gptlab.errors import InvalidInput
from gptlab.tokenizer import ASSETS, EOT_ID, get_tokenizer

DEFAULT_SPAM_FILE = ASSETS / "sms_spam_collection" / "SMSSpamCollection"
SPAM_LABELS = ("ham", "spam")
FORMATS = ("auto", "tsv", "csv")
QUOTINGS = ("minimal", "none")
"""``minimal``: CSV-style double quotes (pandas' and ``csv``'s default, the book); ``none``: quotes are text."""


class TextClassificationDataError(InvalidInput):
    """A malformed labelled-text file (the message names the file and the line)."""


# ----------------------------------------------------------------------------- reading
def read_labeled_texts(path: str | Path | None = None, format: str = "auto", text_column: str = "text",
                       label_column: str = "label", header: bool = False, encoding: str = "utf-8",
                       quoting: str = "minimal") -> list[tuple[str, str]]:
    """``(label, text)`` pairs of a labelled text file, in file order.

    ``format``:
      * ``tsv``: ``label<TAB>text`` rows, no header (``header=True`` skips the first row); blank
        lines are skipped.
      * ``csv``: RFC-4180 CSV (quoted fields may span lines) with a header row naming the
        ``label_column`` and ``text_column``.
      * ``auto``: ``csv`` for a ``.csv`` file, else ``tsv``.
    ``quoting`` (see :data:`QUOTINGS`): ``minimal`` reads double-quoted fields the CSV way
    (a field that starts with ``"`` ends at the next lone ``"``, ``""`` inside it is one ``"``,
    and it may span lines), as ``pd.read_csv(sep="\\t")`` does
    in the book, so a TSV row must have exactly two fields; ``none`` takes quotes as text: every
    TSV line is one example, split on its first tab (the text may hold more tabs).
    ``path`` None = the SMS Spam Collection shipped with gptlab.

    Raises :class:`TextClassificationDataError` naming ``file:line`` for a malformed row.
    """
    path = Path(path) if path else DEFAULT_SPAM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"text classification file not found: {path}")
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; valid choices: {list(FORMATS)}")
    if quoting not in QUOTINGS:
        raise ValueError(f"unknown data.quoting {quoting!r}; valid choices: {list(QUOTINGS)}")
    if format == "auto":
        format = "csv" if path.suffix.lower() == ".csv" else "tsv"
    try:
        if format == "csv":
            rows = _read_csv(path, text_column, label_column, encoding, quoting)
        elif quoting == "none":
            rows = _read_tsv_lines(path, header, encoding)
        else:
            rows = _read_tsv_quoted(path, header, encoding)
    except UnicodeDecodeError as e:
        raise TextClassificationDataError(f"{path}: not valid {encoding} text ({e.reason} at byte {e.start}); "
                                          f"set data.encoding") from e
    except csv.Error as e:
        raise TextClassificationDataError(f"{path}: {e}") from e
    if not rows:
        raise TextClassificationDataError(f"{path}: the file holds no examples")
    return rows


def _read_tsv_lines(path: Path, header: bool, encoding: str) -> list[tuple[str, str]]:
    """quoting=none: each line is ``label<TAB>text``, split on the first tab."""
    rows = []
    with path.open(encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if (header and lineno == 1) or not line.strip():
                continue
            label, sep, text = line.partition("\t")
            if not sep or not label.strip():
                raise TextClassificationDataError(
                    f"{path}:{lineno}: expected 'label<TAB>text', got {line[:60]!r}")
            rows.append((label.strip(), text))
    return rows


def _read_tsv_quoted(path: Path, header: bool, encoding: str) -> list[tuple[str, str]]:
    """quoting=minimal: tab-delimited CSV, as ``pd.read_csv(sep="\\t", header=None)``."""
    rows = []
    with path.open(encoding=encoding, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"', doublequote=True, quoting=csv.QUOTE_MINIMAL)
        for i, fields in enumerate(reader):
            if (header and i == 0) or not any(v.strip() for v in fields):
                continue
            if len(fields) != 2 or not fields[0].strip():
                got = f"{len(fields)} field(s)" if len(fields) != 2 else "an empty label"
                raise TextClassificationDataError(
                    f"{path}:{reader.line_num}: expected 'label<TAB>text' (2 fields), got {got}: "
                    f"{chr(9).join(fields)[:60]!r}; quote a text that holds tabs, or set data.quoting=none "
                    f"to split every line on its first tab")
            rows.append((fields[0].strip(), fields[1]))
    return rows


def _read_csv(path: Path, text_column: str, label_column: str, encoding: str,
              quoting: str = "minimal") -> list[tuple[str, str]]:
    rows = []
    with path.open(encoding=encoding, newline="") as f:
        reader = csv.DictReader(f, quoting=csv.QUOTE_NONE if quoting == "none" else csv.QUOTE_MINIMAL)
        columns = reader.fieldnames or []
        for col, key in ((label_column, "label_column"), (text_column, "text_column")):
            if col not in columns:
                raise TextClassificationDataError(
                    f"{path}:1: no column {col!r} (data.{key}); the header has {columns}")
        for row in reader:
            # DictReader puts surplus fields under the key None and fills missing ones with None
            n_fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
            if n_fields != len(columns):
                raise TextClassificationDataError(
                    f"{path}:{reader.line_num}: expected {len(columns)} fields as in the header, got {n_fields}")
            label, text = row[label_column], row[text_column]
            if not any(v.strip() for v in row.values() if isinstance(v, str)):
                continue
            if not label.strip():
                raise TextClassificationDataError(f"{path}:{reader.line_num}: empty label")
            rows.append((label.strip(), text))
    return rows


def encode_labels(names: Sequence[str], labels: Sequence[str] | None = None,
                  path: str | Path = "<data>") -> tuple[list[int], list[str]]:
    """Label names -> ids (the index in ``labels``); ``labels`` None = the sorted distinct names.
    Returns ``(ids, labels)``; an unknown name raises naming the file and the valid names."""
    labels = list(labels) if labels else sorted(set(names))
    if len(set(labels)) != len(labels):
        raise ValueError(f"data.labels has duplicates: {labels}")
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise TextClassificationDataError(f"{path}: label(s) {unknown[:5]} not in data.labels={labels}")
    return [index[n] for n in names], labels


# ----------------------------------------------------------------------------- balance + split
def balance_classes(label_ids: Sequence[int], seed: int = 123) -> np.ndarray:
    """Indices of a class-balanced subset: every class undersampled to the smallest class's size.

    Classes come in id order, each as ``RandomState(seed).permutation(n_class)[:n_min]`` of its
    rows (the smallest class whole, in file order): the draw of the book's pandas
    ``df[df.Label == "ham"].sample(num_spam, random_state=123)``, concatenated as
    ``[ham subset, spam]``.
    """
    y = np.asarray(label_ids)
    classes = np.unique(y)
    n_min = min(int((y == c).sum()) for c in classes)
    parts = []
    for c in classes:
        rows = np.flatnonzero(y == c)
        if len(rows) > n_min:  # a fresh generator per class, as each pandas .sample(random_state=seed)
            rows = rows[np.random.RandomState(seed).permutation(len(rows))[:n_min]]
        parts.append(rows)
    return np.concatenate(parts)


def split_indices(n: int, train_ratio: float = 0.7, val_ratio: float = 0.1, shuffle: bool = True,
                  seed: int = 123) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) positions of ``n`` examples, as the book's ``random_split``: shuffle
    (``RandomState(seed).permutation``, = ``df.sample(frac=1, random_state=seed)``), then the first
    ``int(n * train_ratio)`` train, the next ``int(n * val_ratio)`` validate, the rest test
    (1,494 -> 1,045 / 149 / 300)."""
    if not (0 < train_ratio and 0 <= val_ratio and train_ratio + val_ratio <= 1):
        raise ValueError(f"need 0 < train_ratio and train_ratio + val_ratio <= 1; got {train_ratio}, {val_ratio}")
    order = np.random.RandomState(seed).permutation(n) if shuffle else np.arange(n)
    train_end = int(n * train_ratio)
    val_end = train_end + int(n * val_ratio)
    return order[:train_end], order[train_end:val_end], order[val_end:]


# ----------------------------------------------------------------------------- dataset + collate
class TextClassificationDataset(Dataset):
    """Texts tokenized once (tiktoken batch encode) and padded once into one tensor.

    ``max_length`` None = the longest tokenized text (the book's training set); longer texts keep
    their first ``max_length`` tokens. Item ``i`` is ``{"input_ids": (max_length,) long,
    "length": int, "label": int}``; :func:`classification_collate` makes batches.
    An empty text becomes a single ``<|endoftext|>`` so it still has a last token to read.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Any = None,
                 max_length: int | None = None, pad_id: int = EOT_ID):
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise ValueError("TextClassificationDataset got no texts")
        tok = tokenizer or get_tokenizer()
        self.texts = list(texts)
        # ordinary encoding: a literal "<|endoftext|>" in a message is text, never the special id
        ids = [e or [pad_id] for e in tok.encode_ordinary_batch(self.texts)]
        self.max_length = int(max_length or max(len(e) for e in ids))
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        self.num_truncated = sum(len(e) > self.max_length for e in ids)
        rows = [torch.tensor(e[: self.max_length], dtype=torch.long) for e in ids]
        self.lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (N,)
        padded = pad_sequence(rows, batch_first=True, padding_value=pad_id)  # (N, longest)
        if padded.size(1) < self.max_length:  # every text shorter than a configured max_length
            padded = torch.nn.functional.pad(padded, (0, self.max_length - padded.size(1)), value=pad_id)
        self.input_ids = padded  # (N, max_length)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "length": self.lengths[i], "label": self.labels[i]}


def classification_collate(items: Sequence[Mapping[str, Any]],
                           pad_to_max_length: bool = True) -> dict[str, torch.Tensor]:
    """Stack pre-padded items into a batch (no per-token Python work).

    ``pad_to_max_length`` True: every batch is ``max_length`` wide (the book); False: cut to the
    batch's longest text (faster; the same logits when the class is read from the last real token).
    Returns ``input_ids`` (B, T), ``attention_mask`` (B, T) (1 = real token) and ``label`` (B,).
    """
    if not items:
        raise ValueError("classification_collate got an empty batch")
    input_ids = torch.stack([it["input_ids"] for it in items])  # (B, max_length)
    lengths = torch.stack([torch.as_tensor(it["length"]) for it in items])  # (B,)
    if not pad_to_max_length:
        input_ids = input_ids[:, : int(lengths.max())]
    attention_mask = (torch.arange(input_ids.size(1))[None, :] < lengths[:, None]).long()
    labels = torch.stack([torch.as_tensor(it["label"]) for it in items]).long()
    return {"input_ids": input_ids.contiguous(), "attention_mask": attention_mask, "label": labels}


# ----------------------------------------------------------------------------- data module
class TextClassificationDataModule(GPTDataModule):
    """Labelled texts balanced, split and batched as in the book's chapter 6.

    Args:
        tokenizer: a tiktoken encoding (default: GPT-2).
        path: the data file; None = the SMS Spam Collection shipped with gptlab.
        format, text_column, label_column, header, encoding, quoting: how to read it
            (:func:`read_labeled_texts`; ``quoting="minimal"`` reads the book's 5,572 rows).
        labels: class names in id order (``[ham, spam]``); None = the sorted distinct labels.
        balance: undersample every class to the smallest one (seeded by ``split_seed``).
        train_ratio, val_ratio: split after a seeded shuffle; the rest is the test set.
        shuffle_before_split, split_seed: the shuffle (book: true, 123).
        max_examples: keep only N examples (after balancing and shuffling, before the split).
        max_length: truncate/pad every text to this many tokens; None = the longest training text
            (the book), which validation and test texts are then truncated to.
        pad_to_max_length: batches ``max_length`` wide (book) or as wide as their longest text.
        pad_id: the padding token (None = the tokenizer's ``<|endoftext|>``).
        batch_size, val_batch_size, num_workers, shuffle, drop_last, pin_memory: DataLoader settings
            (training batches shuffled, last partial batch dropped, as in the book).
    """

    RULES = {"format": choice(*FORMATS, name="data format"), "text_column": text(), "label_column": text(),
             "header": boolean(), "encoding": encoding(), "quoting": choice(*QUOTINGS, name="data.quoting"),
             "labels": strings(optional=True, unique=True), "balance": boolean(), "train_ratio": number(gt=0, le=1),
             "val_ratio": number(ge=0, lt=1), "shuffle_before_split": boolean(), "split_seed": integer(),
             "max_examples": integer(ge=1, optional=True), "max_length": integer(ge=1, optional=True),
             "pad_to_max_length": boolean(), "pad_id": integer(ge=0, optional=True)}

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        return super().check_relations(node) + ratios_fit(node, "train_ratio", "val_ratio", "tests")

    def __init__(self, tokenizer: Any = None, path: str | None = None, format: str = "auto",
                 text_column: str = "text", label_column: str = "label", header: bool = False,
                 encoding: str = "utf-8", quoting: str = "minimal", labels: Sequence[str] | None = SPAM_LABELS,
                 balance: bool = True,
                 train_ratio: float = 0.7, val_ratio: float = 0.1, shuffle_before_split: bool = True,
                 split_seed: int = 123, max_examples: int | None = None, max_length: int | None = None,
                 pad_to_max_length: bool = True, pad_id: int | None = None, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 0, shuffle: bool = True,
                 drop_last: bool = True, pin_memory: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.check_hparams()
        self.tokenizer = tokenizer or get_tokenizer()
        self.path = path
        self.read_kwargs = dict(format=format, text_column=text_column, label_column=label_column,
                                header=header, encoding=encoding, quoting=quoting)
        self.label_names: list[str] | None = list(labels) if labels else None
        self.balance, self.train_ratio, self.val_ratio = balance, train_ratio, val_ratio
        self.shuffle_before_split, self.split_seed, self.max_examples = shuffle_before_split, split_seed, max_examples
        self.configured_max_length, self.pad_to_max_length = max_length, pad_to_max_length
        self.pad_id = self.tokenizer.eot_token if pad_id is None else pad_id  # None: the tokenizer's <|endoftext|>
        self.split_rows: dict[str, np.ndarray] = {}

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.label_names)

    @property
    def max_length(self) -> int:
        """The padded width of every example (known after :meth:`setup`)."""
        self.setup()
        return self.train_set.max_length

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        path = self.path or DEFAULT_SPAM_FILE
        rows = read_labeled_texts(path, **self.read_kwargs)
        ids, self.label_names = encode_labels([label for label, _ in rows], self.label_names, path)
        texts = [text for _, text in rows]
        keep = balance_classes(ids, self.split_seed) if self.balance else np.arange(len(ids))
        texts, ids = [texts[i] for i in keep], [ids[i] for i in keep]
        if self.max_examples:  # a seeded subset for quick runs: shuffle first so every class stays in
            order = np.random.RandomState(self.split_seed).permutation(len(ids))[: self.max_examples]
            texts, ids, keep = [texts[i] for i in order], [ids[i] for i in order], keep[order]
        parts = split_indices(len(ids), self.train_ratio, self.val_ratio, self.shuffle_before_split, self.split_seed)
        if len(parts[0]) == 0:
            raise ValueError(f"{path}: {len(ids)} examples leave no training data (train_ratio={self.train_ratio})")
        train_t, val_t, test_t = ([texts[i] for i in p] for p in parts)
        # which rows of the file (0-based, in reading order) each split holds: the book's DataFrame index
        self.split_rows = dict(zip(("train", "val", "test"), (keep[p] for p in parts)))
        train_y, val_y, test_y = ([ids[i] for i in p] for p in parts)
        self.train_set = TextClassificationDataset(train_t, train_y, self.tokenizer, self.configured_max_length,
                                                   self.pad_id)
        width = self.train_set.max_length  # the book pads val/test to the training length too
        self.val_set, self.test_set = (
            TextClassificationDataset(t, y, self.tokenizer, width, self.pad_id) if t else None
            for t, y in ((val_t, val_y), (test_t, test_y)))
        counts = np.bincount(np.asarray(ids), minlength=len(self.label_names)).tolist()
        rank_zero_info(
            f"text classification data {path}: {len(rows)} examples read, {len(ids)} used "
            f"({', '.join(f'{n} {c}' for n, c in zip(self.label_names, counts))}"
            f"{', balanced' if self.balance else ''}); {len(train_t)} train / {len(val_t)} val / "
            f"{len(test_t)} test; max_length {width} tokens"
            + (f" ({self.train_set.num_truncated} training texts truncated)" if self.train_set.num_truncated else ""))

    def collate_fn(self, stage: str) -> "_Collate":
        return _Collate(self.pad_to_max_length)


class _Collate:
    """Picklable collate (DataLoader workers) around :func:`classification_collate`."""

    def __init__(self, pad_to_max_length: bool):
        self.pad_to_max_length = pad_to_max_length

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return classification_collate(items, self.pad_to_max_length)


class SpamDataModule(TextClassificationDataModule):
    """The SMS Spam Collection (``ham``/``spam``) with the book's chapter-6 settings; every
    :class:`TextClassificationDataModule` argument works (``path=`` another file, ...)."""


__all__ = ["TextClassificationDataModule", "SpamDataModule", "TextClassificationDataset",
           "TextClassificationDataError", "classification_collate", "read_labeled_texts", "encode_labels",
           "balance_classes", "split_indices", "DEFAULT_SPAM_FILE", "SPAM_LABELS", "QUOTINGS"]
