"""How a process stopped by SIGTERM or SIGINT ends: with the exit status shells and schedulers
expect (128 + the signal: 143 for SIGTERM, 130 for SIGINT), never 0.

Inside ``trainer.fit`` / ``trainer.test`` Lightning handles both signals itself: SIGTERM (what SLURM
and other schedulers send before they kill a job) is turned into ``SIGTERMException`` at the next
batch boundary, Ctrl-C's ``KeyboardInterrupt`` into ``sys.exit(1)``; either way the callbacks'
``on_exception`` runs first (gptlab's ``InterruptCheckpoint`` saves ``interrupted.ckpt``). But
``SIGTERMException`` exits with status 0, so a stopped run looked like a finished one.
:class:`StopSignals` records which signal arrived, so the command can exit with the right status
whatever Lightning raised; outside Lightning's loops (data loading, between sweep jobs) it stops the
process itself by raising :class:`Stopped`. Lightning's SLURM requeue signal (SIGUSR1) is left to
Lightning.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """Raised by :class:`StopSignals` when SIGTERM arrives outside Lightning's loops; its exit code is
    128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def exit_status(signum: int) -> int:
    """The status a process stopped by ``signum`` exits with (as a shell reports it)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager that records the first SIGTERM/SIGINT received while it is active
    (:attr:`received`, a signal number or None).

    SIGINT keeps Python's behaviour (``KeyboardInterrupt``). SIGTERM raises :class:`Stopped`, unless
    another handler was installed over this one: a Lightning trainer while it runs, which calls this
    handler after its own, and its own already asked the loop to stop cleanly at the next batch
    boundary (raising here would cut a training step in half). A SIGTERM that Lightning saw but did
    not act on (it came during the last step) is acted on by :func:`raise_if_stopped`, which the
    sweep calls between jobs. Later SIGTERMs, while the process is already stopping, are only
    recorded. The previous handlers come back on exit. Main thread only (where Python delivers
    signals).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.acted = False  # an exception was raised for the received signal
        self._handler = self._handle  # one bound method, to recognise it with signal.getsignal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # elsewhere Python refuses handlers
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        _ACTIVE.remove(self)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if signum == signal.SIGINT:
            self.acted = True
            raise KeyboardInterrupt
        if not self.acted and signal.getsignal(signum) is self._handler:
            self.acted = True
            raise Stopped(signum)


_ACTIVE: list[StopSignals] = []


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` when a stop signal arrived that nothing has acted on yet (Lightning
    received it during the last step and finished normally): called between a sweep's jobs, so
    the next job does not start."""
    for stop in _ACTIVE:
        if stop.received is not None and not stop.acted:
            stop.acted = True
            raise Stopped(stop.received)


__all__ = ["STOP_SIGNALS", "Stopped", "StopSignals", "exit_status", "raise_if_stopped", "signal_name"]
