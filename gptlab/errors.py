"""Errors a user can fix: input gptlab refuses, each naming the key or file, the value and what is
allowed. The command-line tools print them as one message without a traceback (exit status 2)."""

from __future__ import annotations

import errno


class InvalidInput(ValueError):
    """A config value, a file or a checkpoint that gptlab refuses before (or instead of) doing work."""


class ConfigError(InvalidInput):
    """One or more config values out of their type, range or choices (the message lists each key)."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss, gradient norm or weight (the message names the step)."""


def storage_cause(error: OSError) -> str:
    """What a failed write says about its storage, for a one-line message: ``no space left on the
    device``, ``read-only file system``, ``not writable (permission denied)``, ... (the OS's own
    words for anything else)."""
    causes = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system: not writable", errno.EACCES: "not writable (permission denied)",
              errno.EPERM: "not writable (operation not permitted)"}
    return causes.get(error.errno, error.strerror or str(error))


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder, ...); the previous file of that
    name is unchanged. Its message names the file and the cause."""

    def __str__(self) -> str:
        return str(self.strerror)
