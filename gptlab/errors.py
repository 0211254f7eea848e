"""Errors a user can fix: input gptlab refuses, each naming the key or file, the value and what is
allowed. The command-line tools print them as one message without a traceback (exit status 2)."""

from __future__ import annotations


class InvalidInput(ValueError):
    """A config value, a file or a checkpoint that gptlab refuses before (or instead of) doing work."""


class ConfigError(InvalidInput):
    """One or more config values out of their type, range or choices (the message lists each key)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, ...); the previous file of that name is unchanged."""
