"""Readers that hand out one checkpoint tensor at a time, so loading never holds the file twice,
and the one safe ``torch.load`` of gptlab: weights only, never code, and only after the file's
checksums were verified (:func:`verify_checkpoint`).

Memory: a :class:`SafetensorsReader` reads each tensor straight into its final memory (a
transposed one through a 16 MiB buffer), so loading a model needs about its own size in RAM;
``safetensors.safe_open`` keeps every mapped page resident until the file closes, which with the
transposed Conv1D copies costs ~2x (measured: ``experiments/pretrained_memory``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from gptlab.errors import InvalidInput

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_CHUNK_BYTES = 16 << 20  # buffer for transposing while reading: big enough for few syscalls, small enough not to matter


class CorruptCheckpointError(InvalidInput):
    """A checkpoint that is empty, truncated, not a torch zip archive, or whose bytes do not match
    the checksums saved in it (the message names the file)."""


_VERIFIED: set[tuple[str, int, int]] = set()
"""(path, size, mtime) of the files :func:`verify_checkpoint` passed in this process."""


class UnsafeCheckpointError(ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses: it would run code to be read."""


class UnreadableCheckpointError(ValueError):
    """A ``.pt``/``.ckpt`` file that is not a torch file at all, or is damaged."""


class SafetensorsReader:
    """Tensors of one or more ``.safetensors`` files, read on demand with plain file reads.

    ``safe_open`` hands out memory-mapped tensors; the pages it touches stay in this process's
    resident set until the file is closed, so transposing every Conv1D matrix on the way in would
    hold the file *and* the copies (2x). Reading each tensor straight into its final memory (a
    transposed one through a 16 MiB buffer) keeps the peak at the model's size. The format is an
    8-byte header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw
    little-endian bytes.
    """

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}

    def __init__(self, files: Iterable[str | Path]):
        self._index: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        self._buf: torch.Tensor | None = None
        for path in map(Path, files):
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ValueError(f"{path} is not a valid safetensors file ({e})") from e
            header.pop("__metadata__", None)
            for key, info in header.items():
                if info["dtype"] not in self.DTYPES:
                    raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
                start, end = info["data_offsets"]
                self._index[key] = (path, self.DTYPES[info["dtype"]], tuple(info["shape"]),
                                    8 + n + start, 8 + n + end)

    def keys(self) -> list[str]:
        return list(self._index)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key][2]

    def get(self, key: str, transpose: bool = False) -> torch.Tensor:
        """The tensor ``key`` in fresh memory; ``transpose``: a 2-D tensor comes back transposed
        (and contiguous), assembled through a small reused buffer instead of a full-size copy."""
        path, dtype, shape, start, end = self._index[key]
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            if not transpose:
                buf = torch.empty(end - start, dtype=torch.uint8)
                self._read(f, memoryview(buf.numpy()), path, key)
                return buf.view(dtype).reshape(shape)
            rows, cols = shape
            out = torch.empty(cols, rows, dtype=dtype)
            row_bytes = cols * dtype.itemsize
            step = max(1, _CHUNK_BYTES // row_bytes)
            if self._buf is None or self._buf.numel() < min(step, rows) * row_bytes:
                self._buf = torch.empty(max(_CHUNK_BYTES, row_bytes), dtype=torch.uint8)  # reused: no heap churn
            buf = self._buf
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                self._read(f, memoryview(buf.numpy())[: n * row_bytes], path, key)
                out[:, r0:r0 + n] = buf[: n * row_bytes].view(dtype).view(n, cols).t()
            return out

    @staticmethod
    def _read(f: Any, view: memoryview, path: Path, key: str) -> None:
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{path} is truncated (tensor {key!r})")
            got += n


class MappingReader:
    """Tensors of an in-memory (or ``torch.load(mmap=True)``-mapped) state dict."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def get(self, key: str, transpose: bool = False) -> torch.Tensor:
        t = self._t[key]
        return t.t().contiguous() if transpose else t


Reader = SafetensorsReader | MappingReader


def _starts_like_zip(path: Path) -> bool:
    """Whether ``path`` begins like a zip archive (a truncated one included) or is empty."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head in (b"PK\x03\x04", b"")


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """Check that ``path`` is a complete ``torch.save`` archive whose records all match the CRC-32
    stored with them; returns the path. Raises ``FileNotFoundError`` when it does not exist and
    :class:`CorruptCheckpointError` (naming the file and, for a checksum mismatch, the record) when
    it is empty, truncated, not a zip archive, or corrupted. Reads the file once (about 1 GB/s); a
    file already verified in this process, unchanged since (same size and modification time), is not
    read again."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    st = p.stat()
    stamp = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if stamp in _VERIFIED:
        return p
    if st.st_size == 0:
        raise CorruptCheckpointError(f"{p} is empty (0 bytes): its save was cut short; use an earlier checkpoint")
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()  # reads every record and compares its CRC-32
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{p} is not a complete checkpoint ({e}): it was truncated, or is not a file torch.save "
            "wrote; use an earlier checkpoint") from None
    if bad is not None:
        raise CorruptCheckpointError(
            f"{p} is corrupted: its record {bad!r} does not match the checksum saved with it; "
            "use an earlier checkpoint")
    _VERIFIED.add(stamp)
    return p


def safe_torch_load(path: str | Path) -> Any:
    """Read a ``.pt``/``.pth``/``.bin``/``.ckpt`` file with ``torch.load(weights_only=True)``,
    memory-mapped where the format allows (a legacy non-zip file is read whole).

    Only tensors and plain containers come out: a file whose pickle names anything else (a class,
    a function such as ``os.system``) is refused with :class:`UnsafeCheckpointError`, and nothing
    in it runs. There is no fallback. A zip-format file (every ``torch.save`` since torch 1.6) is
    checked against the CRC-32 of each of its records first: a truncated or corrupted file raises
    :class:`CorruptCheckpointError` naming it, instead of loading garbage.
    """
    path = Path(path)
    if _starts_like_zip(path):  # what torch.save writes: every record's CRC-32 is checked first
        verify_checkpoint(path)
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message suggests turning the check off: only the name it refused is passed on
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused is None and "Unsupported global" not in str(e):
            raise UnreadableCheckpointError(f"{path} is not a readable checkpoint: not a torch file, or damaged "
                                            f"(no valid pickle data)") from None
        what = f"it names {refused[1]}" if refused else "it stores Python objects other than tensors and containers"
        raise UnsafeCheckpointError(
            f"{path} is not a gptlab, Hugging Face or book checkpoint: {what}, and gptlab never loads a file "
            f"that could run code when read") from None


__all__ = ["SafetensorsReader", "MappingReader", "Reader", "safe_torch_load", "verify_checkpoint",
           "CorruptCheckpointError", "UnsafeCheckpointError", "UnreadableCheckpointError"]
