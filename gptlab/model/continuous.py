"""Continuous batching: many sequences decoded together, each joining and leaving on its own.

A server gets requests at any time, with their own prompts, lengths and sampling settings.
:class:`ContinuousBatch` keeps one batch of rows over a :class:`~gptlab.model.gpt.RowKVCache`:
:meth:`ContinuousBatch.add` prefills new prompts (one left-padded pass) and gives their first
tokens; :meth:`ContinuousBatch.step` decodes one token for every row in one forward pass. A row
leaves as soon as it is done (``eos``, its ``max_new_tokens``, or :meth:`ContinuousBatch.remove`),
so it never waits for a longer neighbour and its slot is free for the next request at once (the
scheme of Orca/vLLM, without paged memory). Each row samples with its own temperature, top-k,
top-p and seed (:func:`~gptlab.model.generation.sample_rows`, vectorised over the batch).

With greedy decoding every row gets exactly the tokens :func:`~gptlab.model.generation.generate`
gives its prompt alone (tests/test_continuous_batching.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch

from gptlab.checks import Problem, check_node, integer
from gptlab.model.generation import SAMPLING_RULES, _last_logits, _padding_masks, sample_rows
from gptlab.model.gpt import GPT, KVCache, RowKVCache


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens: ``temperature`` 0 is greedy; ``top_k`` / ``top_p`` None
    (or 0 / 1) are off; ``seed`` None draws from the batch's shared generator, an int from the
    sequence's own (so its tokens do not depend on the other rows)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def problems(self) -> list[Problem]:
        """One :class:`~gptlab.checks.Problem` per bad setting (the rules of
        :data:`~gptlab.model.generation.SAMPLING_RULES`; ``seed`` an integer or null)."""
        return check_node({"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                           "seed": self.seed}, {**SAMPLING_RULES, "seed": integer(optional=True)})


@dataclass(frozen=True)
class TokenEvent:
    """One new token of the sequence ``key``; ``finished``: the sequence has left the batch (its
    ``token`` is then ``eos_id`` or its last token)."""

    key: Hashable
    token: int
    finished: bool


class ContinuousBatch:
    """Up to ``max_rows`` sequences decoded together over one model (see the module docstring).

    Args:
        model: the language model (eval mode; the caller sets autocast if any).
        max_rows: the most sequences decoded at once.
        eos_id: a sequence that samples it is finished (the event carries it).
        generator: the random stream of rows without their own seed.
        max_len: the most positions (prompt + new tokens) of one sequence; default the context.
    """

    def __init__(self, model: GPT, max_rows: int, eos_id: int | None = None,
                 generator: torch.Generator | None = None, max_len: int | None = None):
        self.model, self.eos_id, self.generator = model, eos_id, generator
        param = next(model.parameters())
        self.device = param.device
        self.cache = RowKVCache(model.config, max_rows, max_len, device=self.device, dtype=param.dtype)
        self.max_len = self.cache.max_len
        self.keys: list[Hashable] = []
        self.left: list[int] = []  # tokens each row may still generate
        self.generators: list[torch.Generator | None] = []
        empty = torch.empty(0, device=self.device)
        self.positions = empty.long()  # (rows,) the position id of each row's next token
        self.last = empty.long()  # (rows,) each row's latest token: the input of the next step
        self.temperature, self.top_k, self.top_p = empty.float(), empty.long(), empty.float()

    @property
    def rows(self) -> int:
        """Sequences in the batch now."""
        return len(self.keys)

    @property
    def free(self) -> int:
        """Sequences that can join now."""
        return self.cache.max_rows - self.rows

    def check(self, prompt_len: int, max_new_tokens: int, sampling: Sampling) -> None:
        """Raise ``ValueError`` naming what does not fit or is out of range for one sequence."""
        problems = sampling.problems() + check_node({"max_new_tokens": max_new_tokens},
                                                    {"max_new_tokens": integer(ge=1)})
        if problems:
            raise ValueError("; ".join(str(p) for p in problems))
        if prompt_len < 1:
            raise ValueError("an empty prompt gives the model nothing to continue")
        if prompt_len + max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the "
                             f"model's context of {self.max_len} tokens")

    @torch.inference_mode()
    def add(self, prompts: Sequence[torch.Tensor | Sequence[int]], max_new_tokens: Sequence[int],
            sampling: Sequence[Sampling], keys: Sequence[Hashable]) -> list[TokenEvent]:
        """Prefill ``prompts`` (token ids, (T_i,) each) in one left-padded pass; they join the batch.
        Returns each one's first token (sequences done after it have already left)."""
        n = len(prompts)
        if not (n == len(max_new_tokens) == len(sampling) == len(keys)):
            raise ValueError("prompts, max_new_tokens, sampling and keys must have one entry per sequence")
        if n > self.free:
            raise ValueError(f"{n} new sequences but only {self.free} of {self.cache.max_rows} rows are free")
        if n == 0:
            return []
        ids = [torch.as_tensor(p, dtype=torch.long, device=self.device).flatten() for p in prompts]
        for p, m, s in zip(ids, max_new_tokens, sampling):
            self.check(p.numel(), m, s)
        T = max(p.numel() for p in ids)
        batch = torch.zeros(n, T, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, T, dtype=torch.bool, device=self.device)
        for i, p in enumerate(ids):  # left padding: the real tokens end at T
            batch[i, T - p.numel():], mask[i, T - p.numel():] = p, True
        prefill = KVCache(self.model.config, n, max_len=T, device=self.device, dtype=self.cache.dtype)
        if bool(mask.all()):
            logits = _last_logits(self.model, batch, kv_cache=prefill)
        else:
            pos, attn = _padding_masks(mask)
            logits = _last_logits(self.model, batch, kv_cache=prefill, position_ids=pos, attn_mask=attn)
        self.cache.insert(prefill.k, prefill.v, mask)
        self.keys += list(keys)
        self.left += list(max_new_tokens)
        self.generators += [self._seeded(s.seed) for s in sampling]
        lengths = mask.long().sum(-1)
        self.positions = torch.cat([self.positions, lengths])
        self.temperature = torch.cat([self.temperature, self._tensor([s.temperature or 0.0 for s in sampling])])
        self.top_k = torch.cat([self.top_k, self._tensor([s.top_k or 0 for s in sampling], torch.long)])
        self.top_p = torch.cat([self.top_p, self._tensor([1.0 if s.top_p is None else s.top_p for s in sampling])])
        first = sample_rows(logits, self.temperature[-n:], self.top_k[-n:], self.top_p[-n:],
                            self.generators[-n:], self.generator)
        self.last = torch.cat([self.last, first])
        return self._emit(range(self.rows - n, self.rows))

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Decode one token for every sequence in the batch (one forward pass); finished ones leave."""
        if not self.rows:
            return []
        slots = self.cache.next_slots()
        logits = _last_logits(self.model, self.last[:, None], kv_cache=self.cache, input_pos=slots,
                              position_ids=self.positions[:, None])
        self.cache.advance()
        self.positions = self.positions + 1
        self.last = sample_rows(logits, self.temperature, self.top_k, self.top_p, self.generators, self.generator)
        return self._emit(range(self.rows))

    def remove(self, keys: Sequence[Hashable]) -> None:
        """Drop the sequences ``keys`` (e.g. a client that went away, a stop string reached); keys
        not in the batch are ignored."""
        gone = set(keys)
        if gone & set(self.keys):
            self._keep([r for r, k in enumerate(self.keys) if k not in gone])

    def _emit(self, rows: range) -> list[TokenEvent]:
        """Events for ``rows`` (their newest token is in ``self.last``); finished rows leave."""
        tokens = self.last[rows.start:rows.stop].tolist()
        events, done = [], set()
        for r, token in zip(rows, tokens):
            self.left[r] -= 1
            finished = self.left[r] <= 0 or token == self.eos_id
            events.append(TokenEvent(self.keys[r], token, finished))
            if finished:
                done.add(r)
        if done:
            self._keep([r for r in range(self.rows) if r not in done])
        return events

    def _keep(self, rows: list[int]) -> None:
        """Keep ``rows`` (in this order); the cache and every per-row setting move together."""
        self.cache.keep(rows)
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.keys = [self.keys[r] for r in rows]
        self.left = [self.left[r] for r in rows]
        self.generators = [self.generators[r] for r in rows]
        self.positions, self.last = self.positions[idx], self.last[idx]
        self.temperature, self.top_k, self.top_p = self.temperature[idx], self.top_k[idx], self.top_p[idx]

    def _seeded(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed % 2**64)  # any integer: torch takes 64 bits
        return gen

    def _tensor(self, values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)


__all__ = ["ContinuousBatch", "Sampling", "TokenEvent"]
