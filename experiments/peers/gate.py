"""The worker side of the A/B protocol of ``run.py``: a timed block of steps starts only when the
parent says so, so the sides of a comparison take turns on the machine and never run at once.

Messages go over a private copy of the worker's stdout (``sys.stdout`` itself is sent to stderr, so
nothing a library prints can garble them): ``WAIT`` (blocked, ready for a repetition), ``REP <json>``
(one repetition: seconds), ``DONE <json>`` (peak RSS and what the side saw). The parent answers
``rep`` on stdin.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Callable

import lightning as L


class Gate:
    """Times ``reps`` blocks of ``per_rep`` steps after ``warmup`` untimed ones; call :meth:`tick`
    at the start of every step (0-based) and once more after the last timed block (a run of
    :meth:`total_steps` steps does that by itself)."""

    def __init__(self, warmup: int, per_rep: int, reps: int, sync: Callable[[], None] | None = None):
        self.warmup, self.per_rep, self.reps = warmup, per_rep, reps
        self.sync = sync or (lambda: None)
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stdout = sys.stderr
        self._t0: float | None = None
        self.info: dict[str, Any] = {}
        self.timing = False

    @property
    def total_steps(self) -> int:
        """Warm-up + timed steps + one more step, whose start closes the last block."""
        return self.warmup + self.reps * self.per_rep + 1

    def send(self, kind: str, payload: Any = None) -> None:
        self._out.write(f"{kind} {json.dumps(payload)}\n")

    def tick(self, step: int) -> None:
        """Start of ``step``: close the running block, then wait for the parent's go for the next."""
        k = step - self.warmup
        if k < 0 or k % self.per_rep:
            return
        if self._t0 is not None:
            self.sync()
            self.send("REP", {"seconds": time.perf_counter() - self._t0})
            self._t0, self.timing = None, False
        if k // self.per_rep < self.reps:
            self.send("WAIT")
            line = sys.stdin.readline().strip()
            if line != "rep":
                raise SystemExit(f"gate: expected 'rep' from the parent, got {line!r}")
            self.sync()
            self.timing = True
            self._t0 = time.perf_counter()

    def watch(self, embedding: Any) -> None:
        """Record the (batch, length) of every token-id tensor ``embedding`` reads in a timed block
        (``info["shapes"]``): what each side's model really saw."""
        seen: set[tuple[int, ...]] = set()

        def hook(module: Any, args: tuple) -> None:
            if self.timing:
                seen.add(tuple(args[0].shape))
                self.info["shapes"] = sorted(seen)

        embedding.register_forward_pre_hook(hook)

    def report(self, seconds: float) -> None:
        """A repetition timed by the side itself (the PPO task's own ``time/update_s``)."""
        self.send("REP", {"seconds": seconds})

    def wait(self) -> None:
        """Block until the parent's go (for sides that time themselves, :meth:`report`)."""
        self.send("WAIT")
        line = sys.stdin.readline().strip()
        if line != "rep":
            raise SystemExit(f"gate: expected 'rep' from the parent, got {line!r}")

    def done(self) -> None:
        """Final message: peak resident memory of this process (MiB) and :attr:`info`."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        self.send("DONE", {"rss_mb": rss, **self.info})


GATE: Gate | None = None
"""The worker's gate; the Lightning callback below finds it here (Hydra builds the callback)."""


class GateCallback(L.Callback):
    """Lightning side of the gate: a tick at the start of every training batch (one optimizer step);
    the task's token embedding is watched for the shapes."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if GATE is not None:
            GATE.watch(pl_module.model.tok_emb)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if GATE is None:
            raise RuntimeError("gate.GATE is not set: GateCallback runs only inside a run.py worker")
        GATE.tick(trainer.global_step)
