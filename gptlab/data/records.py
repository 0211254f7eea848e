"""Reading JSON / JSON-lines data files into a list of entries, with errors a user can act on.

``.jsonl`` / ``.ndjson`` files hold one JSON value per line (blank lines are skipped), read one line
at a time; any other file is one JSON list. Every failure names the file, and where it can the line
(and column) or the entry index: a missing file, bytes that are not UTF-8, a JSON syntax error, a
file that is not a list, an empty file, an entry larger than ``max_record_bytes``.

Why a bound on an entry's size: no training example needs more than a context (1,024 GPT-2 tokens
are about 4 KB of English text), while one oversized entry is tokenized, padded and batched whole:
a single 50 MB line took 5.2 GB of memory in ``gptlab-train``. A JSON-lines file is read line by line
and an oversized line is refused after reading at most ``max_record_bytes`` of it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gptlab.errors import InvalidInput

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_MAX_RECORD_BYTES = 1_000_000
"""Largest entry a data file may hold, in bytes of its JSON text (``data.max_record_bytes``): 250
contexts of 1,024 tokens."""
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
