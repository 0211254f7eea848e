"""One run per folder: an operating-system lock on a file in the run folder.

Two ``gptlab-train`` processes writing into one folder mix their files (``last.ckpt`` from one,
``last-v1.ckpt`` from the other, interleaved ``metrics.csv`` rows, one ``.hydra``). So a run takes
``<folder>/.gptlab.lock`` with ``fcntl.flock`` as soon as the folder exists, before anything is
written into it, and a second run into the same folder is refused, naming the folder and the
process that holds it (pid, host, command: written into the lock file by its holder).

Why ``flock`` and not a file that merely exists: the kernel drops the lock when the holding process
ends, however it ends (``kill -9`` and out-of-memory kills included), so a lock is never stale and
nobody has to delete it by hand. The lock file is removed when the run ends normally; one left by a
crashed run is harmless (it is not locked). ``flock`` locks are advisory (only gptlab looks at them)
and work on local file systems and NFSv4 (Linux emulates them with byte-range locks there).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from gptlab.errors import InvalidInput, storage_cause

LOCK_FILE = ".gptlab.lock"


class FolderInUse(InvalidInput):
    """Another process holds the run folder's lock (the message names the folder and the process)."""


class RunFolderError(InvalidInput):
    """The run folder cannot be created or written (read-only, full disk, no permission)."""


def folder_error(folder: Path, error: OSError) -> RunFolderError:
    """The one-line message for a run folder that cannot be written: the folder and the cause."""
    return RunFolderError(f"cannot write to the run folder {folder}: {storage_cause(error)}; "
                          "run in another folder (hydra.run.dir=...)")


class RunLock:
    """The lock of one run folder, held by this process between :meth:`acquire` and :meth:`release`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()
        self.path = self.folder / LOCK_FILE
        self.created_folder = False
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Create the folder if needed and lock it. Raises :class:`FolderInUse` when another process
        holds it and :class:`RunFolderError` when the folder cannot be created or written."""
        try:
            self.created_folder = not self.folder.is_dir()
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._lock_file()
        except OSError as e:
            raise folder_error(self.folder, e) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(self._me()) + "\n").encode())
        except OSError as e:
            os.close(fd)
            raise folder_error(self.folder, e) from None
        self._fd = fd
        return self

    def _lock_file(self) -> int:
        """An open descriptor of the lock file, locked by this process."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderInUse(f"{self.folder} is in use by another run ({self._holder()}); "
                                  "wait for it to end, or run in another folder (hydra.run.dir=...)") from None
            if self._still_the_file(fd):
                return fd
            os.close(fd)  # its holder removed the file between our open and our lock: lock the new one

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other process can be locking it) and
        unlock. Does nothing when not held."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or vanished folder: the kernel still drops the lock below
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _still_the_file(self, fd: int) -> bool:
        try:
            mine, there = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    @staticmethod
    def _me() -> dict[str, object]:
        argv = sys.argv
        if argv and argv[0].endswith(".py"):  # python -m gptlab.cli.train ...: the command as typed
            argv = [Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]]
        command = shlex.join([Path(argv[0]).name, *argv[1:]]) if argv else ""
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": command}

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return (f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}")
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not yet written its name into " + str(self.path)


_HELD: dict[Path, RunLock] = {}
"""Run folders whose lock this process holds (a second ``flock`` of the same file from this process
would be refused: the lock belongs to the open file, not to the process)."""


@atexit.register
def release_all_run_folders() -> None:
    """Release every run folder lock this process holds (removing the lock files): when a command
    ends, however its run ended, and at interpreter exit."""
    for lock in list(_HELD.values()):
        release_run_folder(lock)


def lock_run_folder(folder: str | os.PathLike, check: Callable[[], None] | None = None) -> RunLock | None:
    """Lock ``folder`` for this process (creating it) and then run ``check`` (refusals that read the
    folder, e.g. "it already holds checkpoints") under the lock. Returns the new lock, to
    :meth:`~RunLock.release` when the run ends, or None when this process already held it (then
    only ``check`` runs). If ``check`` raises, the lock is released and a folder this call created is
    removed again, so a refused run leaves nothing behind."""
    key = Path(folder).expanduser().resolve()
    if key in _HELD:
        if check is not None:
            check()
        return None
    lock = RunLock(folder).acquire()
    _HELD[key] = lock
    try:
        if check is not None:
            check()
    except BaseException:
        release_run_folder(lock)
        if lock.created_folder:
            try:
                lock.folder.rmdir()
            except OSError:
                pass
        raise
    return lock


def release_run_folder(lock: RunLock | None) -> None:
    """Release a lock :func:`lock_run_folder` returned (None: nothing to do)."""
    if lock is None:
        return
    _HELD.pop(lock.folder.resolve(), None)
    lock.release()


__all__ = ["LOCK_FILE", "FolderInUse", "RunFolderError", "RunLock", "folder_error", "lock_run_folder",
           "release_all_run_folders", "release_run_folder"]
