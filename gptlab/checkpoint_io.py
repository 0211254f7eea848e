"""Checkpoint files that survive kills and full disks, and are checked before anything reads them.

Writing (:class:`AtomicCheckpointIO`, Lightning's ``CheckpointIO`` plugin, set in
``conf/trainer/default.yaml``): the checkpoint goes to a temporary file *in the same folder*, is
flushed to disk, and only then renamed over its final name (``os.replace``, atomic on one file
system). A kill or a full disk therefore never leaves a truncated ``last.ckpt`` behind: the previous
file stays as it was. A write that fails removes its temporary file; one cut short by ``kill -9``
leaves it, and the next save into that folder removes it. Lightning's own writer builds the whole
file in memory first and then moves it from ``$TMPDIR``: twice the memory, and a copy (not a rename)
when ``$TMPDIR`` is on another file system.

Checking (:func:`gptlab.weights.readers.verify_checkpoint`, before every read): ``torch.save`` writes a zip archive whose every record carries
the CRC-32 of its bytes; ``torch.load`` never checks them, so a file with flipped bytes inside a
tensor loads "fine" and trains on garbage. Reading the archive once and comparing each record with
its CRC catches truncation and corruption with a message naming the file and the record. It works for
every checkpoint torch ever wrote in the zip format (Lightning's, the book's ``.pth`` files), so no
sidecar file has to travel with a checkpoint. It lives with the readers (no Lightning there), so
the inference tools check a file without importing Lightning; this module re-exports it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gptlab.errors import CheckpointWriteError, NonFiniteError, storage_cause
from gptlab.weights.readers import CorruptCheckpointError, verify_checkpoint

log = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "CorruptCheckpointError", "TMP_MARK", "remove_stale_temp_files",
           "verify_checkpoint"]

TMP_MARK = ".tmp-"
"""Temporary files are ``.<name><TMP_MARK><host>-<pid>`` beside their target."""


# ----------------------------------------------------------------------------- writing
def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint files in ``folder`` left by processes of this host that no longer
    run (a ``kill -9`` during a save); returns what was removed."""
    removed = []
    host = socket.gethostname()
    for tmp in Path(folder).glob(f".*{TMP_MARK}{host}-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
        log.info("removed %s, left by process %d which ended during a checkpoint save", tmp, pid)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_non_finite_weights(checkpoint: dict[str, Any], path: Path) -> None:
    """Raise :class:`~gptlab.errors.NonFiniteError` when a floating-point weight of ``checkpoint``'s
    ``state_dict`` is NaN or infinite: such a file would be taken for the last good checkpoint. (The
    non-finite guard checks the loss and the gradients; an update with finite gradients can still
    overflow the weights, e.g. with a huge learning rate.) One pass over the weights, one host sync."""
    weights = [(name, t) for name, t in (checkpoint.get("state_dict") or {}).items()
               if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    if not weights:
        return
    flags = [torch.isfinite(t).all() for _, t in weights]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    if bool(finite.all()):
        return
    bad = [name for (name, _), ok in zip(weights, finite.tolist()) if not ok]
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise NonFiniteError(
        f"non-finite weights at step {checkpoint.get('global_step', '?')} ({shown}): {path} was not written, "
        "the last good checkpoint was left as it was (lower task.optimizer.lr or set task.grad_clip)")


def write_failure(error: BaseException, folder: Path) -> OSError | None:
    """The storage error behind a failed checkpoint write, or None when it was something else.

    ``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:672]
    . unexpected pos ...``; the ``OSError`` (``ENOSPC``) its file write raised is the context of that
    error. Should a torch version drop it, a writer error on a file system with no space left is
    taken for ``ENOSPC``."""
    seen: BaseException | None = error
    for _ in range(8):  # the chain of causes and contexts, never an endless loop
        if seen is None:
            break
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    if isinstance(error, RuntimeError) and "inline_container" in str(error):
        try:
            if os.statvfs(folder).f_bavail == 0:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            pass
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that never leaves a partial file under a checkpoint's name.

    ``save_checkpoint`` writes ``.<name>.tmp-<host>-<pid>`` in the target folder, fsyncs it, renames
    it over the target and fsyncs the folder; on any failure the temporary file is removed and a
    :class:`CheckpointWriteError` names the target (whose previous version is untouched).
    ``load_checkpoint`` verifies the file's checksums first and always reads with
    ``weights_only=True``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        refuse_non_finite_weights(checkpoint, path)
        tmp = _temp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(path.parent)
            with open(tmp, "wb") as f:
                self.write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            if os.name == "posix":  # the rename itself reaches the disk
                _fsync(path.parent)
        except BaseException as e:
            cause = write_failure(e, path.parent)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # a read-only folder: nothing was written there, and the real error follows
                pass
            if cause is not None and not isinstance(e, CheckpointWriteError):
                raise CheckpointWriteError(cause.errno or errno.EIO,
                                           f"could not write checkpoint {path}: {storage_cause(cause)}; the previous "
                                           f"{path.name}, if any, is unchanged") from e
            raise

    def write(self, checkpoint: dict[str, Any], f: BinaryIO) -> None:
        """Serialise ``checkpoint`` into the open temporary file ``f`` (a hook for tests). Given a file
        object, torch names the archive's records ``archive/...`` rather than after the temporary name."""
        torch.save(checkpoint, f)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | Any = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True here: opening a file never runs code from it
        verify_checkpoint(path)
        return torch.load(path, map_location=map_location, weights_only=True)
