"""The generation thread of the server: requests in, text out, many requests in one batch.

HTTP handlers :meth:`Engine.submit` a :class:`~gptlab.serving.protocol.GenerationRequest` with a
``sink`` (a function the engine calls, on its own thread, with each :class:`Update`). One thread owns
the model and a :class:`~gptlab.model.continuous.ContinuousBatch`:

* when the batch is empty it waits for a request, then ``batch_window`` seconds more (or until
  ``max_batch_size`` rows are asked for) so requests that arrive together start together;
* between two decode steps it admits every waiting request that fits the free rows (continuous
  batching: a request never waits for the batch to finish);
* after every step it turns each row's token into text (whole characters, cut before a stop
  string) and hands it to that request's sink; a row that is done (end of text, a stop string,
  ``max_tokens``, or its client gone: :meth:`Engine.cancel`) leaves the batch at once.

The queue of waiting requests is bounded (:class:`QueueFull` past ``max_queue``), and after
:meth:`Engine.close` new requests are refused while those admitted run to their end.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Hashable

import tiktoken
import torch

from gptlab.model.continuous import ContinuousBatch, Sampling, TokenEvent
from gptlab.model.gpt import GPT
from gptlab.serving.protocol import APIError, GenerationRequest
from gptlab.streaming import StopStrings, StreamDecoder


class QueueFull(Exception):
    """``max_queue`` requests are already waiting."""


class Closed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Update:
    """News of one choice of a request: new ``text`` and, once it is done, its ``finish_reason``
    (``stop`` or ``length``) and how many tokens it generated; or an ``error`` for the whole request."""

    choice: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: APIError | None = None


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    sink: Callable[[Update], None]
    number: int
    """Unique per engine: the job's rows are ``(number, choice)``."""
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Row:
    """The text side of one choice being generated."""

    job: _Job
    choice: int
    decoder: StreamDecoder
    stops: StopStrings
    tokens: int = 0


class Engine:
    """Runs a model for many concurrent requests (see the module docstring).

    Args:
        model: the language model, in eval mode on its device.
        tokenizer: its tokenizer (ids -> text).
        eos_id: the end-of-text id (a choice that samples it stops, ``finish_reason="stop"``).
        max_batch_size: the most choices decoded at once (1: one request at a time).
        batch_window: seconds to wait for more requests when a batch starts empty.
        max_queue: the most requests waiting for a row; more are refused with :class:`QueueFull`.
        seed: the shared random stream of requests that give no ``seed``.
        autocast: a context manager factory for every model call (bf16 autocast or a no-op).
    """

    def __init__(self, model: GPT, tokenizer: tiktoken.Encoding, eos_id: int | None, max_batch_size: int = 16,
                 batch_window: float = 0.01, max_queue: int = 64, seed: int = 123,
                 autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext):
        self.tokenizer, self.batch_window, self.max_queue = tokenizer, batch_window, max_queue
        self.autocast = autocast
        device = next(model.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        self.batch = ContinuousBatch(model, max_batch_size, eos_id=eos_id, generator=generator)
        self.max_batch_size = max_batch_size
        self._waiting: collections.deque[_Job] = collections.deque()
        self._rows: dict[Hashable, _Row] = {}
        self._cancelled: set[Hashable] = set()
        self._numbers = itertools.count()
        self._cond = threading.Condition()
        self._closed = self._stop = False
        self._thread = threading.Thread(target=self._run, name="gptlab-serve-engine", daemon=True)
        self.steps = 0  # decode steps run (for /health and tests)

    # ------------------------------------------------------------------ called from the HTTP side
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: Callable[[Update], None]) -> _Job:
        """Queue ``request``; ``sink`` gets its updates (on the engine's thread). Raises
        :class:`QueueFull` or :class:`Closed`."""
        with self._cond:
            job = _Job(request, sink, next(self._numbers))
            if self._closed:
                raise Closed()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: _Job) -> None:
        """Stop working on ``job`` (its client went away): it leaves the queue or the batch."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
            self._cancelled.update((job.number, c) for c in range(job.request.choices))
            self._cond.notify()

    def close(self) -> None:
        """Refuse new requests from now on; those queued or running go on."""
        with self._cond:
            self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued and running, then end the thread."""
        with self._cond:
            self._closed = self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self.batch.rows, "max_batch_size": self.max_batch_size,
                    "max_queue": self.max_queue, "accepting": not self._closed}

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            admitted, cancelled = self._next_work()
            if admitted is None:
                return
            try:
                self._forget(cancelled)
                with self.autocast():
                    events = self._admit(admitted)
                    if self.batch.rows:
                        events += self.batch.step()
                        self.steps += 1
                self._dispatch(events)
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server: fail its requests
                self._fail_all(admitted, e)

    def _next_work(self) -> tuple[list[_Job] | None, set[Hashable]]:
        """Wait until there is something to do; the jobs that join now and the rows to drop. None
        when stopping with nothing left."""
        with self._cond:
            while not self._waiting and not self.batch.rows and not self._cancelled:
                if self._stop:
                    return None, set()
                self._cond.wait()
            if not self.batch.rows and self._waiting:
                # a batch starts: give requests that arrive together a moment to join it
                deadline = time.monotonic() + self.batch_window
                while sum(j.request.choices for j in self._waiting) < self.max_batch_size and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            admitted, free = [], self.batch.free
            while self._waiting and self._waiting[0].request.choices <= free:
                job = self._waiting.popleft()
                admitted.append(job)
                free -= job.request.choices
            cancelled, self._cancelled = self._cancelled, set()
            return admitted, cancelled

    def _forget(self, keys: set[Hashable]) -> None:
        self.batch.remove(list(keys))
        for key in keys:
            self._rows.pop(key, None)

    def _admit(self, jobs: list[_Job]) -> list[TokenEvent]:
        prompts, max_new, sampling, keys = [], [], [], []
        for job in jobs:
            req = job.request
            try:  # the protocol checked it already; a request that still does not fit fails alone
                for c in range(req.choices):
                    self.batch.check(len(req.prompt_of(c)), req.max_tokens, req.sampling)
            except ValueError as e:
                job.sink(Update(-1, error=APIError(400, str(e))))
                continue
            for c in range(req.choices):
                key = (job.number, c)
                self._rows[key] = _Row(job, c, StreamDecoder(self.tokenizer), StopStrings(req.stops, req.strip_leading))
                prompts.append(req.prompt_of(c))
                max_new.append(req.max_tokens)
                s = req.sampling
                sampling.append(Sampling(s.temperature, s.top_k, s.top_p, req.seed_of(c)))
                keys.append(key)
        return self.batch.add(prompts, max_new, sampling, keys) if keys else []

    def _dispatch(self, events: list[TokenEvent]) -> None:
        """Each event's text to its request; rows that hit a stop string leave the batch."""
        stopped = []
        for e in events:
            row = self._rows.get(e.key)
            if row is None:
                continue
            if e.finished and e.token == self.batch.eos_id:
                text, reason = row.stops.push(row.decoder.flush()) + row.stops.flush(), "stop"
            else:
                row.tokens += 1
                text = row.stops.push(row.decoder.push(e.token))
                if row.stops.stopped:
                    reason = "stop"
                    if not e.finished:
                        stopped.append(e.key)
                elif e.finished:
                    text, reason = text + row.stops.push(row.decoder.flush()) + row.stops.flush(), "length"
                else:
                    reason = None
            if reason is not None:
                del self._rows[e.key]
            if text or reason:
                row.job.sink(Update(row.choice, text, reason, row.tokens))
        if stopped:
            self.batch.remove(stopped)

    def _fail_all(self, admitted: list[_Job], error: Exception) -> None:
        """A model call raised: every request in the batch gets a 500 naming the error."""
        failed = {r.job.number: r.job for r in self._rows.values()} | {j.number: j for j in admitted}
        self.batch.remove(list(self.batch.keys))
        self._rows.clear()
        api_error = APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error",
                             code="generation_failed")
        for job in failed.values():
            job.sink(Update(-1, error=api_error))


__all__ = ["Engine", "Update", "QueueFull", "Closed"]
