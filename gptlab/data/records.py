"""Reading JSON / JSON-lines data files into a list of entries, with errors a user can act on.

``.jsonl`` / ``.ndjson`` files hold one JSON value per line (blank lines are skipped); any other
file is one JSON list. Every failure names the file, and where it can the line (and column) or
the entry index: a missing file, bytes that are not UTF-8, a JSON syntax error, a file that is
not a list, an empty file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.errors import InvalidInput

JSONL_SUFFIXES = (".jsonl", ".ndjson")


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


def read_json_records(path: str | Path, what: str = "data", error: type[Exception] = DataFileError) -> Records:
    """The entries of a JSON list file or a JSON-lines file (by suffix, see :data:`JSONL_SUFFIXES`).

    ``what`` names the data in messages (``"preference data file not found: ..."``); ``error`` is
    the exception class raised for malformed files (a :class:`DataFileError` subclass).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    text = read_text_utf8(path, error)
    if path.suffix.lower() in JSONL_SUFFIXES:
        entries, lines = [], []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise error(f"{path}: invalid JSON at line {lineno}, column {e.colno}: {e.msg}") from None
            lines.append(lineno)
        if not entries:
            raise error(f"{path}: the file holds no entries")
        return Records(path, entries, lines)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise error(f"{path}: expected a JSON list of entries, got {type(data).__name__} "
                    f"(or name the file .jsonl for one entry per line)")
    if not data:
        raise error(f"{path}: the file holds no entries")
    return Records(path, data)
