"""Rollouts for online RL (PPO, GRPO): sample completions to a batch of prompts, then read the
per-token log-probabilities (and values) of them back with one forward pass per model.

Layout. Prompts arrive left-padded (B, P) for batched KV-cache generation; with ``num_generations``
G each prompt is repeated G times (rows ``b·G … b·G + G − 1``: GRPO's groups), giving N = B·G rows.
The completions come back as (N, R). For the forward passes that follow, each row is *packed*: its
prompt's pads move to the end, giving ``prompt tokens | completion tokens | filler`` (N, P + R). A
plain causal forward then needs no attention mask and no position ids (the filler comes after
everything that matters), so SDPA takes its fused causal kernels; the hidden state that predicts
completion token j of row n sits at ``positions[n, j] = prompt_length[n] − 1 + j``, and only those
R hidden states per row go through the (large) output head.

Randomness. Each rollout draws its tokens from its own generator (:func:`rollout_generator`),
seeded from the run's seed, the process's global rank and the iteration: under DDP every rank
samples its own completions (also to the same prompt), a run samples the same completions however
often it was resumed, and rank 0 samples what a one-process run of the same seed samples.

Masks. ``mask`` (N, R) marks the real completion tokens: up to and including the first stop token;
``stopped`` (N,) the rows that produced one (the others were cut at ``max_new_tokens``: truncated).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn as nn

from gptlab.alignment.logprobs import token_logps
from gptlab.model.generation import generate
from gptlab.model.gpt import GPT

GENERATION_CACHES = ("dynamic", "static", "compiled")
"""KV cache of rollout generation: ``dynamic`` (grows with the sequence), ``static`` (fixed shapes,
whole context preallocated), ``compiled`` (static + ``torch.compile``: a CUDA graph per decode
step on a GPU). All three sample the same tokens for the same seed."""


# ----------------------------------------------------------------------------- sampling
def rollout_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed (a 63-bit int) of the rollout of ``iteration`` on global ``rank`` of a run seeded
    with ``seed``: a hash of the three, so no two (rank, iteration) pairs share a stream (TRL gives
    each process ``seed + 100003 · rank`` instead, once per run; a hash per iteration also makes a
    resumed run sample what the uninterrupted one sampled, with no generator state to save)."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{iteration}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rollout_generator(iteration: int, rank: int, device: torch.device | str, seed: int | None = None
                      ) -> torch.Generator:
    """A generator on ``device`` seeded with :func:`rollout_seed` for sampling one iteration's
    rollout on global ``rank`` (pass it to :func:`sample_completions`). ``seed`` None: the run's
    seed, ``torch.initial_seed()`` (what ``L.seed_everything`` set on every rank; Lightning derives
    its dataloader workers' seeds from it too)."""
    seed = torch.initial_seed() if seed is None else seed
    generator = torch.Generator(device=device)
    generator.manual_seed(rollout_seed(seed, rank, iteration))
    return generator


def response_mask(tokens: torch.Tensor, stop_id: int | None) -> torch.Tensor:
    """(N, R) bool: the real tokens of sampled completions, i.e. up to and including the first
    ``stop_id``; everything after it is padding. Without a stop token every position is real.

    The stop token itself stays in the mask: its log-probability is what teaches the policy that it
    may stop."""
    if stop_id is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    is_stop = tokens == stop_id
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stop tokens strictly before t
    return stops_before == 0


def stopped_rows(tokens: torch.Tensor, stop_id: int | None) -> torch.Tensor:
    """(N,) bool: the completions that produced ``stop_id`` (the others were truncated)."""
    if stop_id is None:
        return torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
    return (tokens == stop_id).any(dim=1)


@torch.no_grad()
def sample_responses(model: GPT, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                     temperature: float, top_k: int | None = None, top_p: float | None = None,
                     stop_id: int | None = None, cache: str = "dynamic", generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Completions (B, R ≤ ``max_new_tokens``) to left-padded prompts (B, P), sampled with batched
    KV-cache generation from ``generator`` (None: the global RNG); rows that stopped early are
    filled with ``stop_id``. A normal tensor (not an inference-mode one), so a training forward can
    use it."""
    if cache not in GENERATION_CACHES:
        raise ValueError(f"unknown generation_cache {cache!r}; valid choices: {list(GENERATION_CACHES)}")
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=stop_id, attention_mask=prompt_mask, generator=generator,
                   static_cache=cache != "dynamic", compile=cache == "compiled")
    return out[:, prompt_ids.size(1):].clone()  # clone: generate runs in inference mode


def pack_sequences(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequences (N, P + R), positions (N, R))``: each row's prompt moved to the front (its left
    pads rotated to the end), then its completion; ``positions`` index the hidden states that predict
    the completion tokens. Needs at least one real prompt token per row."""
    P, R = prompt_ids.size(1), responses.size(1)
    lengths = prompt_mask.long().sum(dim=1)  # (N,)
    if bool((lengths == 0).any()):
        raise ValueError("a prompt has no tokens: every row of prompt_attention_mask needs a 1")
    joined = torch.cat([prompt_ids, responses], dim=1)  # (N, P + R)
    T = P + R
    shift = (P - lengths)[:, None]  # left pads per row
    order = (torch.arange(T, device=joined.device)[None, :] + shift) % T
    sequences = joined.gather(1, order)
    positions = lengths[:, None] - 1 + torch.arange(R, device=joined.device)[None, :]
    return sequences, positions


@dataclass
class Completions:
    """Sampled completions of a batch of prompts, with what scoring and the forward passes need."""

    prompt_ids: torch.Tensor
    """(N, P) the left-padded prompts, each repeated ``num_generations`` times in a row."""
    prompt_mask: torch.Tensor
    tokens: torch.Tensor
    """(N, R) the sampled tokens; after a row's stop token, more stop tokens."""
    mask: torch.Tensor
    """(N, R) bool, the real completion tokens (:func:`response_mask`)."""
    stopped: torch.Tensor
    """(N,) bool, the rows that produced the stop token; the others are truncated."""
    sequences: torch.Tensor
    """(N, P + R) prompt + completion, packed (:func:`pack_sequences`)."""
    positions: torch.Tensor
    """(N, R) the hidden states that predict the completion tokens."""

    def __len__(self) -> int:
        return self.tokens.size(0)

    def completion_ids(self) -> list[list[int]]:
        """Each completion's token ids without its stop token (what a reward function reads)."""
        return completion_id_lists(self.tokens, self.mask, self.stopped)

    def prompt_id_lists(self) -> list[list[int]]:
        """Each row's prompt ids without padding."""
        return prompt_id_lists(self.prompt_ids, self.prompt_mask)


def completion_id_lists(tokens: torch.Tensor, mask: torch.Tensor, stopped: torch.Tensor) -> list[list[int]]:
    """The real tokens of each row of ``tokens`` (N, R), without the stop token of rows that have one."""
    lengths = mask.sum(dim=1).tolist()
    return [row[: n - int(s)] for row, n, s in zip(tokens.tolist(), lengths, stopped.tolist())]


def prompt_id_lists(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """The real (unpadded) ids of each left-padded prompt row."""
    return [p[len(p) - int(m):] for p, m in zip(prompt_ids.tolist(), prompt_mask.sum(dim=1).tolist())]


def sample_completions(model: GPT, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                       temperature: float, top_k: int | None = None, top_p: float | None = None,
                       stop_id: int | None = None, cache: str = "dynamic", num_generations: int = 1,
                       generator: torch.Generator | None = None) -> Completions:
    """``num_generations`` sampled completions to every left-padded prompt (B, P): one batched
    KV-cache generation over the B·G rows drawing from ``generator`` (an iteration's
    :func:`rollout_generator`; None: the global RNG), then the masks and the packed layout (module
    docstring)."""
    if num_generations > 1:
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    tokens = sample_responses(model, prompt_ids, prompt_mask, max_new_tokens, temperature, top_k, top_p, stop_id,
                              cache, generator)
    sequences, positions = pack_sequences(prompt_ids, prompt_mask, tokens)
    return Completions(prompt_ids, prompt_mask, tokens, response_mask(tokens, stop_id), stopped_rows(tokens, stop_id),
                       sequences, positions)


# ----------------------------------------------------------------------------- reading them back
@dataclass
class PolicyOutput:
    """Per completion token (N, R): log-prob of the sampled token, value (or None), entropy of the
    policy's distribution (or None)."""

    logprobs: torch.Tensor
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def response_forward(model: GPT, sequences: torch.Tensor, positions: torch.Tensor, responses: torch.Tensor,
                     temperature: float = 1.0, value_head: nn.Module | None = None, with_entropy: bool = False,
                     entropy_grad: bool = False) -> PolicyOutput:
    """One forward pass over packed ``sequences`` (N, T): log π(completion token) at ``temperature``
    (logits ÷ T, the distribution that was sampled; :func:`gptlab.alignment.logprobs.token_logps`),
    the ``value_head``'s estimate on the same hidden states, and the entropy of π (all (N, R),
    float32). The entropy carries gradients only with ``entropy_grad`` (an entropy bonus)."""
    hidden = model.hidden_states(sequences)  # (N, T, D)
    D = hidden.size(-1)
    at = hidden.gather(1, positions[..., None].expand(-1, -1, D))  # (N, R, D): states before each completion token
    logprobs, entropy = token_logps(model.logits(at), responses, temperature=temperature, with_entropy=with_entropy,
                                    entropy_grad=entropy_grad)
    values = value_head(at).squeeze(-1).float() if value_head is not None else None
    return PolicyOutput(logprobs, values, entropy)


def chunked(fn: Callable[..., PolicyOutput], n: int, chunk: int, *tensors: torch.Tensor, **kwargs: Any) -> PolicyOutput:
    """``fn(*tensors, **kwargs)`` on row chunks of at most ``chunk`` rows, outputs concatenated
    (rollout forward passes hold no more activations than a training minibatch)."""
    parts = [fn(*(t[i:i + chunk] for t in tensors), **kwargs) for i in range(0, n, chunk)]
    return PolicyOutput(*(None if getattr(parts[0], f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
                          for f in fields(PolicyOutput)))


# ----------------------------------------------------------------------------- PPO's experience
@dataclass
class Rollout:
    """One PPO iteration's experience, every tensor (B, R) unless noted, on the policy's device."""

    sequences: torch.Tensor
    """(B, T) packed prompt + response (:func:`pack_sequences`)."""
    positions: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    """Real response tokens: up to and including the first stop token."""
    logprobs: torch.Tensor
    """log π_old of the sampled tokens (the policy that sampled them)."""
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    """(B,) the reward function's scores (after any missing-stop penalty)."""
    kl: torch.Tensor
    rewards: torch.Tensor
    non_score_rewards: torch.Tensor
    advantages: torch.Tensor
    """Whitened (when enabled) and 0 on padding."""
    returns: torch.Tensor
    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return self.sequences.size(0)


class PhaseTimer:
    """Wall-clock laps of an iteration's phases (generation, scoring, ...) that include the device's
    queued work: one CUDA sync per lap, a handful per iteration."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self.laps[name] = self.elapsed(self.device, self.start)
        self.start = time.perf_counter()

    @staticmethod
    def elapsed(device: torch.device, start: float) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


__all__ = ["GENERATION_CACHES", "rollout_seed", "rollout_generator", "response_mask", "stopped_rows", "sample_responses", "pack_sequences", "Completions",
           "completion_id_lists", "prompt_id_lists", "sample_completions", "PolicyOutput", "response_forward",
           "chunked", "Rollout", "PhaseTimer"]
