"""Readers that hand out one checkpoint tensor at a time, so loading never holds the file twice,
and the one safe ``torch.load`` of gptlab: weights only, never code, and only after the file's
checksums were verified (:func:`verify_checkpoint`).

Memory: a :class:`SafetensorsReader` reads each tensor straight into its final memory (a
transposed one through a 16 MiB buffer), so loading a model needs about its own size in RAM;
``safetensors.safe_open`` keeps every mapped page resident until the file closes, which with the
transposed Conv1D copies costs ~2x (measured: ``experiments/pretrained_memory``). Every header
is checked as the ``safetensors`` library checks it before anything is allocated from it
(:func:`read_safetensors_header`).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from gptlab.errors import InvalidInput
from gptlab.weights.checks import InvalidWeightsError

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_CHUNK_BYTES = 16 << 20  # buffer for transposing while reading: big enough for few syscalls, small enough not to matter


class CorruptCheckpointError(InvalidInput):
    """A checkpoint that is empty, truncated, not a torch zip archive, or whose bytes do not match
    the checksums saved in it (the message names the file)."""


_VERIFIED: set[tuple[str, int, int]] = set()
"""(path, size, mtime) of the files :func:`verify_checkpoint` passed in this process."""


class UnsafeCheckpointError(InvalidWeightsError):
    """A file that ``torch.load(weights_only=True)`` refuses: it would run code to be read."""


class UnreadableCheckpointError(InvalidWeightsError):
    """A ``.pt``/``.ckpt`` file that is not a torch file at all, or is damaged."""


class InvalidSafetensorsError(InvalidWeightsError):
    """A ``.safetensors`` file whose header is malformed or lies about its tensors (offsets outside
    the file, overlapping, or not ``numel x itemsize`` bytes); the message names the file and field."""


MAX_HEADER_BYTES = 100_000_000
"""The longest JSON header read (the ``safetensors`` library's own limit): a length field of 10^12
is refused before anything is allocated."""


def _tensor_entry(path: Path, key: str, info: Any, dtypes: Mapping[str, torch.dtype]
                  ) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, start, end)`` of one header entry, every field checked (offsets relative to
    the data that follows the header)."""
    def bad(why: str) -> InvalidSafetensorsError:
        return InvalidSafetensorsError(f"{path} is not a valid safetensors file: tensor {key!r} {why}")

    if not isinstance(info, dict):
        raise bad(f"is described by a {type(info).__name__}, not an object with dtype, shape and data_offsets")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
    if missing:
        raise bad(f"has no {' / '.join(missing)} field")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes:
        raise bad(f"has dtype {dtype!r}; gptlab reads {sorted(dtypes)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}; expected a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise bad(f"has data_offsets {offsets!r}; expected [start, end], integers >= 0")
    start, end = offsets
    if end < start:
        raise bad(f"has data_offsets [{start}, {end}]: the end lies before the start")
    size = math.prod(shape) * dtypes[dtype].itemsize
    if end - start != size:
        raise bad(f"spans {end - start:,} bytes (data_offsets [{start}, {end}]), but shape {shape} of {dtype} "
                  f"needs {size:,}")
    return dtypes[dtype], tuple(shape), start, end


def read_safetensors_header(path: str | Path, dtypes: Mapping[str, torch.dtype] | None = None
                            ) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """Every tensor of a ``.safetensors`` file: ``name -> (dtype, shape, start, end)``, ``start``/
    ``end`` absolute byte positions in the file. The header is checked as the ``safetensors``
    library checks it, before anything is allocated from it: a bounded length, a JSON object of
    string metadata and tensor entries with a known dtype, a shape of integers, and data offsets that
    span exactly ``numel x itemsize`` bytes, lie inside the file, and tile its data without overlap or
    gap. Raises :class:`InvalidSafetensorsError` naming the file (and the tensor and field)."""
    path, dtypes = Path(path), dtypes or SafetensorsReader.DTYPES
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: {file_size} bytes, shorter "
                                          "than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(MAX_HEADER_BYTES, file_size - 8):
            raise InvalidSafetensorsError(
                f"{path} is not a valid safetensors file: its header length field says {n:,} bytes, the file "
                f"has {file_size - 8:,} after it (limit {MAX_HEADER_BYTES:,}); truncated, or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: its header is not JSON "
                                          f"({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: its header is a JSON "
                                      f"{type(header).__name__}, not an object of tensors")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: __metadata__ must map names "
                                      f"to strings, got {str(meta)[:100]}")
    entries = {key: _tensor_entry(path, key, info, dtypes) for key, info in header.items()}
    data_start, data_size = 8 + n, file_size - 8 - n
    expected, previous = 0, None
    for key, (_, _, start, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start < expected:
            raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: tensor {key!r} (bytes {start}"
                                          f"..{end}) overlaps tensor {previous!r} (ends at byte {expected})")
        if start > expected:
            raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: bytes {expected}..{start} of "
                                          f"its data belong to no tensor (before {key!r})")
        if end > data_size:
            raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: tensor {key!r} ends at byte "
                                          f"{end:,} of the data, which has {data_size:,}: truncated, or its "
                                          "data_offsets lie")
        expected, previous = end, key
    if expected != data_size:
        raise InvalidSafetensorsError(f"{path} is not a valid safetensors file: {data_size - expected:,} bytes "
                                      f"follow the last tensor's data")
    return {k: (dtype, shape, data_start + s, data_start + e) for k, (dtype, shape, s, e) in entries.items()}


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
            for key, (dtype, shape, start, end) in read_safetensors_header(path).items():
                self._index[key] = (path, dtype, shape, start, end)

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
            if len(shape) != 2:
                raise InvalidSafetensorsError(f"{path}: tensor {key!r} has shape {list(shape)}; a 2-D matrix "
                                              "was expected here")
            rows, cols = shape
            out = torch.empty(cols, rows, dtype=dtype)
            row_bytes = cols * dtype.itemsize
            if not out.numel():
                return out
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
                raise InvalidSafetensorsError(f"{path} is truncated (tensor {key!r})")
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


__all__ = ["SafetensorsReader", "InvalidSafetensorsError", "read_safetensors_header", "MAX_HEADER_BYTES",
           "MappingReader", "Reader", "safe_torch_load", "verify_checkpoint", "CorruptCheckpointError",
           "UnsafeCheckpointError", "UnreadableCheckpointError"]
