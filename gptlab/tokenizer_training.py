"""Train a byte-level BPE on your corpus and save it as tiktoken ranks + a manifest.

The training itself is Hugging Face ``tokenizers`` (``pip install "gptlab[tokenizer]"``): GPT-2's
pre-tokenisation pattern, GPT-2's byte-level alphabet (all 256 bytes, so any text encodes),
``<|endoftext|>`` (and any other special token asked for) kept out of the merges. Its merges, in
the order they were learned, become tiktoken ranks (256 single bytes first, then one rank per merge),
and the special tokens take the ids after them, as GPT-2's ``<|endoftext|>`` does. Using the result
needs only tiktoken (:func:`gptlab.tokenizer.get_tokenizer`).

A merge is made only for a pair seen at least ``min_frequency`` times: a small corpus runs out of
such pairs before a large ``vocab_size`` is reached, and the vocabulary is then smaller than asked
(:attr:`TrainedTokenizer.vocab_size` vs :attr:`TrainedTokenizer.asked`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import tiktoken

from gptlab.tokenizer import (EOT_TOKEN, GPT2_PAT_STR, MANIFEST_FILE, MAX_VOCAB_SIZE, TokenizerError,
                              bytes_to_unicode, get_tokenizer, save_tokenizer, tokenizer_info)

INSTALL_HINT = 'pip install "gptlab[tokenizer]"'
CHUNK_CHARS = 1 << 20
"""Text is handed to the trainer in pieces of about this many characters, cut after a newline."""
_READ_BLOCK = 1 << 22
_CUT = re.compile(r"(?<=\S)\n(?=\S)")


@dataclass(frozen=True)
class CorpusFile:
    """One file of a training corpus, as the manifest describes it."""

    path: str
    bytes: int
    sha256: str


@dataclass
class TrainedTokenizer:
    """What :func:`train_bpe` produced."""

    folder: Path
    tokenizer: tiktoken.Encoding = field(repr=False)
    asked: int
    """The ``vocab_size`` asked for."""
    vocab_size: int
    """The ids the tokenizer has (special tokens included): ``asked`` unless the merges ran out."""
    merges: int
    corpus: list[CorpusFile]
    checked_pieces: int
    """Distinct pre-tokenised pieces of the corpus encoded by both tiktoken and the trainer's own tokenizer ..."""
    differing_pieces: int
    """... and how many of them got other tokens (0: tiktoken encodes exactly like ``tokenizers``)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage: ``scan`` (hashes, text checks), ``train`` (``tokenizers``), ``check``
    (the comparison above), ``write``."""

    def summary(self) -> list[str]:
        """The lines ``gptlab-tokenizer train`` prints."""
        total = sum(f.bytes for f in self.corpus)
        lines = [f"trained a byte-level BPE of {self.vocab_size:,} tokens ({self.merges:,} merges) on "
                 f"{len(self.corpus)} file(s), {total:,} bytes in {sum(self.seconds.values()):.1f} s "
                 f"({', '.join(f'{k} {v:.1f} s' for k, v in self.seconds.items())})"]
        if self.vocab_size < self.asked:
            lines.append(f"vocab_size={self.asked:,} was asked, but the corpus has no pair left that occurs often "
                         f"enough (min_frequency) after {self.merges:,} merges: the vocabulary has {self.vocab_size:,} "
                         "tokens")
        lines.append(f"tiktoken and tokenizers agree on {self.checked_pieces - self.differing_pieces:,} of "
                     f"{self.checked_pieces:,} distinct pieces of the corpus")
        lines.append(f"written to {self.folder} ({MANIFEST_FILE}, tokenizer sha256 "
                     f"{tokenizer_info(self.tokenizer).sha256[:16]})")
        return lines


def require_tokenizers() -> Any:
    """The Hugging Face ``tokenizers`` module; :class:`TokenizerError` with the install command when
    it is missing (training needs it, using a trained tokenizer does not)."""
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(f"training a tokenizer needs Hugging Face tokenizers: {INSTALL_HINT}") from None
    return tokenizers


def check_settings(vocab_size: Any, special_tokens: Sequence[str], min_frequency: Any) -> None:
    """Raise :class:`TokenizerError` for settings no byte-level BPE can have (each message names the key)."""
    if not isinstance(special_tokens, (list, tuple)) or not all(isinstance(s, str) and s for s in special_tokens):
        raise TokenizerError(f"special_tokens={special_tokens!r}: expected a list of non-empty strings")
    if len(set(special_tokens)) != len(special_tokens):
        raise TokenizerError(f"special_tokens={list(special_tokens)!r}: a token is listed twice")
    if EOT_TOKEN not in special_tokens:
        raise TokenizerError(f"special_tokens={list(special_tokens)!r}: expected {EOT_TOKEN} among them "
                             "(documents are joined with it, generation stops at it)")
    low = 256 + len(special_tokens)
    if type(vocab_size) is not int or not low <= vocab_size <= MAX_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size!r}: expected an integer in [{low}, {MAX_VOCAB_SIZE}]: a byte-level "
                             f"BPE has the 256 bytes + {len(special_tokens)} special token(s) before its first merge, "
                             "and token files store ids as uint16")
    if type(min_frequency) is not int or min_frequency < 1:
        raise TokenizerError(f"min_frequency={min_frequency!r}: expected an integer >= 1")


def check_output_folder(out: Any, overwrite: bool = False) -> Path:
    """The folder to write: refused when it is a file, or already holds files and not ``overwrite``."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise TokenizerError(f"out={out!r}: expected the folder to write the tokenizer to")
    folder = Path(os.path.expanduser(str(out)))
    if folder.exists() and not folder.is_dir():
        raise TokenizerError(f"out={str(out)!r} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        shown = ", ".join(sorted(p.name for p in folder.iterdir())[:3])
        raise TokenizerError(f"out={str(out)!r} already holds files ({shown}); choose another folder, or "
                             "overwrite=true to replace its tokenizer")
    parent = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise TokenizerError(f"out={str(out)!r}: {parent} is not writable")
    return folder


def scan_corpus(files: Sequence[Path], progress: bool = False) -> list[CorpusFile]:
    """Size and SHA-256 of every file, refusing (:class:`TokenizerError`, naming the file) a binary
    file (a NUL byte, or bytes that are not UTF-8) and a corpus without any text."""
    from tqdm.auto import tqdm

    total = sum(Path(f).stat().st_size for f in files)
    out = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading corpus", disable=not progress) as bar:
        for f in files:
            digest, size, decoder = hashlib.sha256(), 0, _utf8_decoder()
            with open(f, "rb") as fh:
                while block := fh.read(_READ_BLOCK):
                    nul = block.find(b"\0")
                    if nul >= 0:
                        raise TokenizerError(f"{f}: a NUL byte at offset {size + nul:,}: a binary file, not text")
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as e:
                        raise TokenizerError(f"{f}: not UTF-8 text ({e.reason} at byte {size + e.start:,}): a "
                                             "binary file, or another encoding (convert it: iconv -f latin1 -t utf-8)") \
                            from None
                    digest.update(block)
                    size += len(block)
                    bar.update(len(block))
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise TokenizerError(f"{f}: not UTF-8 text (it ends inside a character)") from None
            out.append(CorpusFile(str(f), size, digest.hexdigest()))
    return out


def _utf8_decoder() -> Any:
    import codecs

    return codecs.getincrementaldecoder("utf-8")()


def text_chunks(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """``text`` in pieces of about ``chunk_chars``, each cut right after a newline between two
    non-space characters: GPT-2's pre-tokeniser makes that newline a piece of its own, so the pieces
    of the parts are the pieces of the whole."""
    start = 0
    while len(text) - start > chunk_chars:
        m = _CUT.search(text, start + chunk_chars)
        if m is None:
            break
        yield text[start:m.end()]
        start = m.end()
    if start < len(text):
        yield text[start:]


def default_read_text(path: Path) -> str:
    """UTF-8 text (a BOM removed, CRLF/CR turned into LF), as the pretraining data module reads it."""
    text = Path(path).read_bytes().decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def train_bpe(files: Sequence[str | Path], vocab_size: int, out: str | Path, *,
              special_tokens: Sequence[str] = (EOT_TOKEN,), min_frequency: int = 2,
              read_text: Callable[[Path], str] = default_read_text, progress: bool = True,
              overwrite: bool = False, name: str | None = None, reading: str = "",
              check_chars: int = 1 << 20) -> TrainedTokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (special tokens included) on ``files`` and write
    it to ``out`` (``ranks.tiktoken`` + ``manifest.json``).

    Every setting and file is checked before anything is trained or written (:class:`TokenizerError`,
    one line naming the key or file): ``vocab_size`` in [256 + specials, 65536], the folder, and the
    corpus (not empty, UTF-8 text without NUL bytes). ``read_text`` reads one file (e.g. with
    Gutenberg headers stripped; ``reading`` says how, for the manifest). After training, the first
    ``check_chars`` characters of the corpus are encoded by tiktoken with the new ranks and by the
    ``tokenizers`` model itself, distinct piece by piece: the count of pieces that differ is reported.
    The same corpus and settings give the same ranks file, byte for byte.
    """
    special_tokens = list(special_tokens)
    check_settings(vocab_size, special_tokens, min_frequency)
    folder = check_output_folder(out, overwrite)
    tk = require_tokenizers()
    files = [Path(f) for f in files]
    if not files:
        raise TokenizerError("the corpus has no files")
    seconds, t0 = {}, time.perf_counter()
    corpus = scan_corpus(files, progress=progress and sum(c.stat().st_size for c in files) > 8 << 20)
    if not any(read_text(f).strip() for f in files):
        shown = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]}, ...)"
        raise TokenizerError(f"{shown}: the corpus is empty (no text to learn merges from)")

    model = tk.Tokenizer(tk.models.BPE())
    model.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = tk.decoders.ByteLevel()
    model.add_special_tokens(special_tokens)  # literal special tokens in the text take part in no merge
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                     special_tokens=special_tokens, show_progress=progress,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    chars = 0

    def chunks() -> Iterator[str]:  # one file in memory at a time
        nonlocal chars
        for f in files:
            for chunk in text_chunks(read_text(f)):
                chars += len(chunk)
                yield chunk

    length = sum(c.bytes // CHUNK_CHARS + 1 for c in corpus)  # about: only the progress bar's total
    seconds["scan"], t0 = time.perf_counter() - t0, time.perf_counter()
    model.train_from_iterator(chunks(), trainer=trainer, length=length)
    seconds["train"], t0 = time.perf_counter() - t0, time.perf_counter()

    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    merges = json.loads(model.to_str())["model"]["merges"]
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(unbyte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))  # a merge that makes an existing token adds no id
    specials = {s: len(ranks) + i for i, s in enumerate(special_tokens)}
    name = name or folder.name
    manifest_fields = {
        "requested_vocab_size": vocab_size,
        "trainer": {"library": "tokenizers", "version": tk.__version__, "model": "BPE (byte-level)",
                    "min_frequency": min_frequency, "merges": len(merges)},
        "corpus": {"reading": reading or "UTF-8, BOM removed, CRLF -> LF", "characters": chars,
                   "bytes": sum(c.bytes for c in corpus), "files": [dataclasses.asdict(c) for c in corpus]},
    }
    # checked in memory before anything is written: the file that is written holds exactly these ranks
    enc = tiktoken.Encoding(name=name, pat_str=GPT2_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
    checked, differing = compare_with_tokenizers(enc, model, (read_text(f) for f in files), check_chars)
    seconds["check"], t0 = time.perf_counter() - t0, time.perf_counter()
    manifest = save_tokenizer(folder, ranks, specials, name, GPT2_PAT_STR, **manifest_fields)
    tokenizer = get_tokenizer(manifest)
    seconds["write"] = time.perf_counter() - t0
    return TrainedTokenizer(folder, tokenizer, vocab_size, tokenizer.n_vocab, len(ranks) - 256, corpus,
                            checked, differing, seconds)


def compare_with_tokenizers(enc: tiktoken.Encoding, model: Any, texts: Iterable[str], max_chars: int) -> tuple[int, int]:
    """(distinct pieces compared, pieces that differ): the first ``max_chars`` characters of ``texts``
    cut into GPT-2's pre-tokenised pieces (each is encoded on its own by both, so every distinct
    piece is compared once), each encoded by tiktoken (``enc``) and by the ``tokenizers`` model (its
    tokens turned into bytes)."""
    import regex

    unbyte = {c: b for b, c in bytes_to_unicode().items()}
    pattern = regex.compile(enc._pat_str)
    pieces: set[str] = set()
    budget = max_chars
    for text in texts:
        part = text[:budget]
        pieces.update(pattern.findall(part))
        budget -= len(part)
        if budget <= 0:
            break
    ordered = sorted(pieces)
    if not ordered:
        return 0, 0
    ours = [enc.encode_ordinary(p) for p in ordered]  # encode_ordinary_batch: a thread task per piece, slower
    theirs = model.encode_batch(ordered, add_special_tokens=False)
    differing = sum([enc.decode_single_token_bytes(i) for i in ids] != [bytes(unbyte[c] for c in t) for t in hf.tokens]
                    for ids, hf in zip(ours, theirs))
    return len(ordered), differing


__all__ = ["CorpusFile", "TrainedTokenizer", "train_bpe", "require_tokenizers", "check_settings",
           "check_output_folder", "scan_corpus", "text_chunks", "default_read_text", "compare_with_tokenizers",
           "INSTALL_HINT"]
