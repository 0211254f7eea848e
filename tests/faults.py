"""Fault injection for the reliability tests: checkpoint writers that fail or stall midway.

Importable by subprocess runs too (the tests put this folder on ``PYTHONPATH``), e.g.
``trainer.plugins=[{_target_:faults.StallingCheckpointIO,at_step:10,marker:/tmp/x}]``.
"""

from __future__ import annotations

import errno
import io
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch

from gptlab.checkpoint_io import AtomicCheckpointIO


def _write_half(checkpoint: dict[str, Any], f: BinaryIO) -> None:
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    data = buf.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()


class FullDiskCheckpointIO(AtomicCheckpointIO):
    """Writes half of every checkpoint from optimizer step ``at_step`` on, then fails with ENOSPC,
    as a disk that fills up during the save."""

    def __init__(self, at_step: int = 0):
        super().__init__()
        self.at_step = at_step

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        if checkpoint.get("global_step", 0) < self.at_step:
            return super().write(checkpoint, f)
        _write_half(checkpoint, f)
        raise OSError(errno.ENOSPC, "No space left on device")


class StallingCheckpointIO(AtomicCheckpointIO):
    """Writes half of the checkpoint of optimizer step ``at_step``, creates ``marker`` and sleeps:
    the moment to ``kill -9`` a run in the middle of a save."""

    def __init__(self, at_step: int, marker: str):
        super().__init__()
        self.at_step, self.marker = at_step, Path(marker)

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        if checkpoint.get("global_step") != self.at_step:
            return super().write(checkpoint, f)
        _write_half(checkpoint, f)
        self.marker.write_text(f.name)
        time.sleep(600)


def corrupt_tensor_bytes(path: str | Path, n: int = 4096) -> None:
    """Overwrite ``n`` bytes in the middle of the largest record of a ``torch.save`` archive (a
    tensor's data), leaving the zip structure intact: what a bad disk block or a stray write does."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header: 30 bytes + name + extra field, then the data
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len
        n = min(n, info.file_size // 2)
        f.seek(start + (info.file_size - n) // 2)
        f.write(b"\xff" * n)



class StallAtStep(L.Callback):
    """Creates ``marker`` and sleeps when optimizer step ``step`` is about to start: the moment to
    ``kill -9`` a run in the middle of training (not during a save)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(self.step))
            time.sleep(600)


class _FillingFile:
    """A file object that takes ``room`` bytes and then fails as a full disk does (``ENOSPC``)."""

    def __init__(self, f: BinaryIO, room: int):
        self.f, self.room, self.written = f, room, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class TorchFullDiskCheckpointIO(AtomicCheckpointIO):
    """``torch.save`` itself writing into a disk with ``room`` bytes left: torch reports it as
    ``RuntimeError: [enforce fail at inline_container.cc] . unexpected pos ...``."""

    def __init__(self, room: int = 1000):
        super().__init__()
        self.room = room

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        torch.save(checkpoint, _FillingFile(f, self.room))
