"""Sliding-window pretraining data: any text corpus -> (input_ids, labels) windows.

Small texts (the bundled short story) are tokenized in memory, exactly like the book's
``GPTDatasetV1``. Big corpora are tokenized once, with tiktoken's multi-threaded batch encoder and a
progress bar, into a ``uint16`` token file that is memory-mapped afterwards: windows are read straight
from disk in every dataloader worker, nothing is loaded whole and nothing is tokenized twice.

A literal ``<|endoftext|>`` in the text is the end-of-text token (GPT-2: id 50256), as the book's
``GPTDatasetV1`` encodes with ``allowed_special={"<|endoftext|>"}``, and the files of a folder are
joined with it (the book's Gutenberg pretraining script joins its books the same way);
``endoftext_token=False`` reads it as plain text (7 ordinary tokens).

Token files are cached beside the source (``<file>.gpt2.bin``; for a folder
``<folder>/.gptlab.gpt2.bin``; a trained tokenizer's files are ``.bpe-<its hash>.bin``) with a ``.json``
sidecar describing the tokenizer and the sources they came from (size and modification time). When
the source folder is read-only they go to ``cache_dir`` (default ``$GPTLAB_CACHE/tokens`` or
``~/.cache/gptlab/tokens``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from gptlab.checks import boolean, choice, integer, number
from gptlab.checks import text as text_rule
from gptlab.data.base import GPTDataModule
from gptlab.tokenizer import ASSETS, MAX_VOCAB_SIZE, TokenizerError, describe, get_tokenizer, tokenizer_tag

log = logging.getLogger(__name__)

DEFAULT_TEXT = ASSETS / "the-verdict.txt"
EOT_TEXT = "<|endoftext|>"
TOKEN_DTYPE = np.uint16  # GPT-2's 50,257 ids fit (any tokenizer up to 65,536); half the bytes of int32
AUTO_MEMMAP_BYTES = 8 * 2**20  # memmap="auto": corpora above 8 MiB are memory-mapped

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:-)?BOOK.*?\*\*\*[^\n]*\n",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:-)?BOOK", re.IGNORECASE | re.MULTILINE)


# --------------------------------------------------------------------------------------- reading text
def resolve_sources(path: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """A file, a folder (its ``*.txt``, sorted), a glob, or a list of those -> existing files.

    ``None`` is the bundled ``the-verdict.txt``. Raises ``FileNotFoundError`` naming what was missing.
    """
    if path is None:
        return [DEFAULT_TEXT]
    if isinstance(path, (list, tuple)) or (hasattr(path, "__iter__") and not isinstance(path, (str, os.PathLike))):
        out: list[Path] = []
        for p in path:
            out.extend(resolve_sources(p))
        return out
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise FileNotFoundError(f"data.path={str(path)!r} is a folder without any .txt file")
        return files
    if any(c in str(path) for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(str(path)), recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"data.path={str(path)!r}: the glob matches no file")
        return files
    raise FileNotFoundError(f"data.path={str(path)!r}: no such file or folder (cwd: {os.getcwd()})")


def strip_gutenberg_boilerplate(text: str) -> str:
    """The book between Project Gutenberg's ``*** START OF ...***`` and ``*** END OF ...`` lines
    (licence header and trailer removed); text without the markers is returned unchanged."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def read_text(path: str | os.PathLike, strip_gutenberg: bool = False) -> str:
    """UTF-8 text with a BOM removed and CRLF/CR line ends turned into LF; a clear error for
    files that are not UTF-8 text."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); "
                         "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return strip_gutenberg_boilerplate(text) if strip_gutenberg else text


# --------------------------------------------------------------------------------------- tokenizing
_SAFE_CUT = re.compile(r"(?<=\S)[ \n](?=\S)")


def split_for_bpe(text: str, chunk_chars: int = 1 << 18) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` that tokenize independently to exactly the
    ids of the whole text.

    Cuts are made only before a single space or newline that sits between two non-space characters:
    GPT-2's pre-tokenizer always starts a new piece there (``"word"`` | ``" next"``), and the regex
    has no look-behind, so no token can span the cut and the rest tokenizes as it would in place.
    """
    pieces, start, n = [], 0, len(text)
    while n - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def encode(text: str, tokenizer=None, endoftext_token: bool = True) -> list[int]:
    """Token ids of ``text``: a literal ``<|endoftext|>`` is its id (50256 in GPT-2; ``endoftext_token``, the
    book's ``allowed_special={"<|endoftext|>"}``) or plain text; no other special token exists."""
    enc = tokenizer or get_tokenizer()
    return enc.encode(text, allowed_special={EOT_TEXT}) if endoftext_token else enc.encode_ordinary(text)


def tokenize_texts(texts: Sequence[str], tokenizer=None, *, eot_between: bool = True, num_threads: int | None = None,
                   progress: bool = True, desc: str = "tokenizing",
                   endoftext_token: bool = True) -> Iterator[np.ndarray]:
    """Yield ``uint16`` token arrays for ``texts`` in order, ``<|endoftext|>`` between documents.

    Each text is split with :func:`split_for_bpe` and batch-encoded (Rust, ``num_threads`` threads),
    under a tqdm progress bar counting characters; ``endoftext_token`` as in :func:`encode` (the
    cuts never fall inside ``<|endoftext|>``, which holds no space).
    """
    from tqdm.auto import tqdm

    enc = tokenizer or get_tokenizer()
    num_threads = num_threads or os.cpu_count() or 1  # the encoder releases the GIL: all cores help
    total = sum(len(t) for t in texts)
    eot = np.array([enc.eot_token], dtype=TOKEN_DTYPE)
    with tqdm(total=total, unit="char", unit_scale=True, desc=desc, disable=not progress) as bar:
        for i, text in enumerate(texts):
            if i > 0 and eot_between:
                yield eot
            chunks = split_for_bpe(text)
            for b in range(0, len(chunks), 4 * num_threads):
                batch = chunks[b:b + 4 * num_threads]
                encoded = (enc.encode_batch(batch, num_threads=num_threads, allowed_special={EOT_TEXT})
                           if endoftext_token else enc.encode_ordinary_batch(batch, num_threads=num_threads))
                for ids in encoded:
                    yield np.asarray(ids, dtype=TOKEN_DTYPE)
                bar.update(sum(len(c) for c in batch))


def _source_signature(files: Sequence[Path], strip_gutenberg: bool, endoftext_token: bool = True,
                      tokenizer: Any = None) -> dict[str, Any]:
    return {"tokenizer": tokenizer_tag(tokenizer or get_tokenizer()), "dtype": "uint16", "eot_between_files": True,
            "strip_gutenberg": bool(strip_gutenberg), "endoftext_token": bool(endoftext_token),
            "sources": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab")) / "tokens"


def token_file_path(files: Sequence[Path], cache_dir: str | os.PathLike | None = None,
                    strip_gutenberg: bool = False, endoftext_token: bool = True, tokenizer: Any = None) -> Path:
    """Where the token file of ``files`` lives: beside the source when that folder is writable (and
    ``cache_dir`` is not given), else in ``cache_dir`` under a name hashed from the sources. Each
    reading (``strip_gutenberg``, ``endoftext_token``) and each tokenizer (``gpt2``, ``bpe-<hash>``)
    has its own file."""
    tag = tokenizer_tag(tokenizer or get_tokenizer())
    suffix = (".nohdr" if strip_gutenberg else "") + ("" if endoftext_token else ".eottext")
    if cache_dir is None:
        if len(files) == 1:
            beside = files[0].with_name(files[0].name + f"{suffix}.{tag}.bin")
        else:
            parents = {f.parent for f in files}
            folder = parents.pop() if len(parents) == 1 else Path(os.path.commonpath([str(f) for f in files]))
            beside = folder / f".gptlab{suffix}.{tag}.bin"
        if os.access(beside.parent, os.W_OK):
            return beside
        cache_dir = default_cache_dir()
    key = hashlib.sha1(json.dumps([str(f.resolve()) for f in files]).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{files[0].stem}-{key}{suffix}.{tag}.bin"


def build_token_file(files: Sequence[Path], out: Path | None = None, *, cache_dir=None, strip_gutenberg: bool = False,
                     tokenizer=None, num_threads: int | None = None, progress: bool = True,
                     force: bool = False, endoftext_token: bool = True) -> Path:
    """Tokenize ``files`` once into a ``uint16`` token file (with a ``.json`` sidecar) and return its
    path; an up-to-date file (same sources, sizes, mtimes and settings) is reused as it is.
    Files are joined with ``<|endoftext|>``; ``endoftext_token`` as in :func:`encode`.

    The file is written under a temporary name and renamed at the end, so an interrupted run never
    leaves a truncated cache behind.
    """
    files = [Path(f) for f in files]
    out = Path(out) if out else token_file_path(files, cache_dir, strip_gutenberg, endoftext_token, tokenizer)
    meta_path = out.with_suffix(out.suffix + ".json")
    sig = _source_signature(files, strip_gutenberg, endoftext_token, tokenizer)
    eot = (tokenizer or get_tokenizer()).eot_token
    if not force and out.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if {k: meta.get(k) for k in sig} == sig and out.stat().st_size == 2 * meta.get("num_tokens", -1):
            log.info("reusing token file %s (%s tokens)", out, f"{meta['num_tokens']:,}")
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    n = 0
    from tqdm.auto import tqdm

    # one bar for the whole corpus (bytes of text); each file's own bar only when there is one file
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=f"tokenizing {out.name}",
               disable=not progress or len(files) == 1)
    try:
        with open(tmp, "wb") as fh, bar:
            texts = (read_text(f, strip_gutenberg) for f in files)
            # read lazily, one document at a time: memory stays at one book, not the corpus
            for i, (f, text) in enumerate(zip(files, texts)):
                for arr in tokenize_texts([text], tokenizer, num_threads=num_threads, endoftext_token=endoftext_token,
                                          progress=progress and len(files) == 1, desc=f"tokenizing {f.name}"):
                    arr.tofile(fh)
                    n += arr.size
                if i + 1 < len(files):
                    np.array([eot], dtype=TOKEN_DTYPE).tofile(fh)
                    n += 1
                bar.update(f.stat().st_size)
                bar.set_postfix(tokens=f"{n:,}", file=f.name)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    meta_path.write_text(json.dumps({**sig, "num_tokens": n}, indent=1))
    log.info("wrote %s tokens to %s", f"{n:,}", out)
    return out


# --------------------------------------------------------------------------------------- datasets
class TokenArray:
    """A 1-D ``uint16`` token sequence: in memory, or a slice of a token file memory-mapped lazily
    (per process, so dataloader workers pickle only the path, never the tokens)."""

    def __init__(self, tokens: np.ndarray | None = None, *, path: str | os.PathLike | None = None,
                 start: int = 0, stop: int | None = None):
        if (tokens is None) == (path is None):
            raise ValueError("give either tokens or path")
        self._tokens = None if tokens is None else np.asarray(tokens)
        self.path = None if path is None else str(path)
        total = len(self._tokens) if self._tokens is not None else os.path.getsize(self.path) // 2
        self.start, self.stop = start, total if stop is None else stop
        self._mm: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._tokens is not None:
            return self._tokens[self.start:self.stop]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        return self._mm[self.start:self.stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mm": None}


class SlidingWindowDataset(Dataset):
    """The book's ``GPTDatasetV1`` over a token array: window ``i`` starts at ``i * stride``;
    ``input_ids = tokens[s : s + max_length]``, ``labels = tokens[s + 1 : s + max_length + 1]``.

    As in the book, starts run over ``range(0, len(tokens) - max_length, stride)``.
    """

    def __init__(self, tokens: TokenArray | np.ndarray | Sequence[int], max_length: int, stride: int | None = None):
        if not isinstance(tokens, TokenArray):
            tokens = TokenArray(np.asarray(tokens, dtype=np.int64 if max(tokens, default=0) >= 2**16 else TOKEN_DTYPE))
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        stride = max_length if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.tokens, self.max_length, self.stride = tokens, int(max_length), int(stride)
        self._n = max(0, -(-(len(tokens) - self.max_length) // self.stride))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        s = i * self.stride
        window = torch.from_numpy(self.tokens.array[s:s + self.max_length + 1].astype(np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}


# --------------------------------------------------------------------------------------- datamodule
class PretrainDataModule(GPTDataModule):
    """Next-token windows from a text corpus, split into train/val by ``train_ratio``.

    Args:
        path: a text file, a folder of ``.txt`` files, a glob or a list; ``None`` = the bundled
            ``the-verdict.txt`` (Edith Wharton, public domain; 5,145 tokens).
        train_ratio: the first ``train_ratio`` of the corpus trains, the rest validates (book: 0.9).
            In memory the text is split by characters, exactly like the book; memory-mapped corpora
            are split by tokens.
        max_length: tokens per window (normally the model's context length).
        stride: step between window starts (``None`` = ``max_length``: no overlap).
        batch_size, val_batch_size: per-device batch sizes (``val_batch_size=None`` = ``batch_size``).
        num_workers, pin_memory: DataLoader settings (pinned memory only when CUDA is there).
        shuffle, drop_last: for the training loader (validation is never shuffled nor dropped).
        memmap: ``True`` tokenizes once into a cached ``uint16`` file read by memory mapping;
            ``False`` tokenizes in memory; ``"auto"`` memory-maps corpora above 8 MiB.
        cache_dir: where token files go (default: beside the source, or ``~/.cache/gptlab/tokens``).
        strip_gutenberg: drop Project Gutenberg licence headers/trailers from every file.
        endoftext_token: a literal ``<|endoftext|>`` in the text is the end-of-text token (GPT-2: 50256,
            the book's ``GPTDatasetV1``); False = plain text. Files are always joined with the token.
        tokenizer: a ``tiktoken.Encoding`` (default: the bundled GPT-2 BPE; at most 65,536 ids: token
            files are ``uint16``).
    """

    RULES = {"train_ratio": number(gt=0, le=1), "max_length": integer(ge=1), "stride": integer(ge=1, optional=True),
             "memmap": choice(True, False, "auto"), "cache_dir": text_rule(optional=True), "strip_gutenberg": boolean(),
             "endoftext_token": boolean()}

    def __init__(self, path: str | Sequence[str] | None = None, train_ratio: float = 0.9, max_length: int = 256,
                 stride: int | None = None, batch_size: int = 8, val_batch_size: int | None = None,
                 num_workers: int = 0, shuffle: bool = True, drop_last: bool = True, pin_memory: bool = True,
                 memmap: bool | str = "auto", cache_dir: str | None = None, strip_gutenberg: bool = False,
                 endoftext_token: bool = True, tokenizer=None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.check_hparams()
        self.path, self.train_ratio = path, float(train_ratio)
        self.max_length, self.stride = int(max_length), int(stride or max_length)
        self.memmap, self.cache_dir, self.strip_gutenberg = memmap, cache_dir, strip_gutenberg
        self.endoftext_token = bool(endoftext_token)
        self.tokenizer = tokenizer or get_tokenizer()
        if self.tokenizer.n_vocab > MAX_VOCAB_SIZE:
            raise TokenizerError(f"tokenizer {describe(self.tokenizer)} has {self.tokenizer.n_vocab:,} ids; token files "
                                 f"hold at most {MAX_VOCAB_SIZE:,} (uint16)")

    # ------------------------------------------------------------------ preparing
    def _files(self) -> list[Path]:
        return resolve_sources(self.path)

    def _use_memmap(self, files: list[Path]) -> bool:
        if self.memmap == "auto":
            return sum(f.stat().st_size for f in files) > AUTO_MEMMAP_BYTES
        return bool(self.memmap)

    def prepare_data(self) -> None:
        """Rank 0 only (Lightning): build the token file once so other ranks just map it."""
        files = self._files()
        if self._use_memmap(files):
            build_token_file(files, cache_dir=self.cache_dir, strip_gutenberg=self.strip_gutenberg,
                             tokenizer=self.tokenizer, endoftext_token=self.endoftext_token)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = self._files()
        if self._use_memmap(files):
            path = build_token_file(files, cache_dir=self.cache_dir, strip_gutenberg=self.strip_gutenberg,
                                    tokenizer=self.tokenizer, progress=False, endoftext_token=self.endoftext_token)
            n = os.path.getsize(path) // 2
            k = int(self.train_ratio * n)
            train, val = TokenArray(path=path, stop=k), TokenArray(path=path, start=k)
        else:
            def enc(text: str) -> list[int]:
                return encode(text, self.tokenizer, self.endoftext_token)

            if len(files) == 1:
                text = read_text(files[0], self.strip_gutenberg)
                k = int(self.train_ratio * len(text))  # the book splits the raw text by characters
                train = TokenArray(np.asarray(enc(text[:k]), dtype=TOKEN_DTYPE))
                val = TokenArray(np.asarray(enc(text[k:]), dtype=TOKEN_DTYPE))
            else:  # several documents: <|endoftext|> between them, split by tokens
                ids: list[int] = []
                for j, f in enumerate(files):
                    ids.extend(([self.tokenizer.eot_token] if j else []) + enc(read_text(f, self.strip_gutenberg)))
                tokens = np.asarray(ids, dtype=TOKEN_DTYPE)
                k = int(self.train_ratio * len(tokens))
                train, val = TokenArray(tokens, stop=k), TokenArray(tokens, start=k)
        self.train_set = SlidingWindowDataset(train, self.max_length, self.stride)
        self.val_set = self.test_set = SlidingWindowDataset(val, self.max_length, self.stride)
        src = files[0] if len(files) == 1 else f"{len(files)} files"
        log.info("%s: %s train tokens -> %d windows, %s val tokens -> %d windows (max_length %d, stride %d)",
                 src, f"{len(train):,}", len(self.train_set), f"{len(val):,}", len(self.val_set),
                 self.max_length, self.stride)
        need = self.max_length + 1
        if len(self.train_set) == 0:
            raise ValueError(f"{src}: the train split has {len(train):,} tokens, fewer than max_length + 1 = {need}; "
                             "use a smaller data.max_length or a bigger corpus")
        if self.train_ratio < 1.0 and len(self.val_set) == 0:
            raise ValueError(f"{src}: the validation split has {len(val):,} tokens, fewer than max_length + 1 = {need}; "
                             "lower data.train_ratio or data.max_length")
        if self.hparams.drop_last and self.hparams.shuffle and len(self.train_set) < self.batch_size:
            raise ValueError(f"{src}: {len(self.train_set)} training windows but data.batch_size={self.batch_size} "
                             "with drop_last: no batch would ever be made; lower data.batch_size or data.stride")

    def state_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "max_length": self.max_length, "stride": self.stride}
