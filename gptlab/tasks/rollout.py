"""Rollouts for RLHF: sample responses to a batch of prompts, and read the policy's per-token
log-probabilities (and values) of them back with one forward pass.

Layout. Prompts arrive left-padded (B, P) for batched KV-cache generation; the responses come back
as (B, R). For the forward passes that follow, each row is *packed*: its prompt's pads move to the
end, giving ``prompt tokens | response tokens | filler`` (B, P + R). A plain causal forward then
needs no attention mask and no position ids (the filler comes after everything that matters), so
SDPA takes its fused causal kernels; the hidden state that predicts response token j of row b
sits at ``positions[b, j] = prompt_length[b] − 1 + j``, and only those R hidden states per row go
through the (large) output head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn as nn

from gptlab.model.generation import generate
from gptlab.model.gpt import GPT

GENERATION_CACHES = ("dynamic", "static", "compiled")
"""KV cache of rollout generation: ``dynamic`` (grows with the sequence), ``static`` (fixed shapes,
whole context preallocated), ``compiled`` (static + ``torch.compile``: a CUDA graph per decode
step on a GPU). All three sample the same tokens for the same seed."""


@torch.no_grad()
def sample_responses(model: GPT, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                     temperature: float, top_k: int | None = None, top_p: float | None = None,
                     stop_id: int | None = None, cache: str = "dynamic") -> torch.Tensor:
    """Responses (B, R ≤ ``max_new_tokens``) to left-padded prompts (B, P), sampled with batched
    KV-cache generation; rows that stopped early are filled with ``stop_id``. A normal tensor
    (not an inference-mode one), so the training forward can use it."""
    if cache not in GENERATION_CACHES:
        raise ValueError(f"unknown generation_cache {cache!r}; valid choices: {list(GENERATION_CACHES)}")
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=stop_id, attention_mask=prompt_mask, static_cache=cache != "dynamic",
                   compile=cache == "compiled")
    return out[:, prompt_ids.size(1):].clone()  # clone: generate runs in inference mode


def pack_sequences(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequences (B, P + R), positions (B, R))``: each row's prompt moved to the front (its left
    pads rotated to the end), then its response; ``positions`` index the hidden states that predict
    the response tokens. Needs at least one real prompt token per row."""
    P, R = prompt_ids.size(1), responses.size(1)
    lengths = prompt_mask.long().sum(dim=1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError("a prompt has no tokens: every row of prompt_attention_mask needs a 1")
    joined = torch.cat([prompt_ids, responses], dim=1)  # (B, P + R)
    T = P + R
    shift = (P - lengths)[:, None]  # left pads per row
    order = (torch.arange(T, device=joined.device)[None, :] + shift) % T
    sequences = joined.gather(1, order)
    positions = lengths[:, None] - 1 + torch.arange(R, device=joined.device)[None, :]
    return sequences, positions


@dataclass
class PolicyOutput:
    """Per response token (B, R): log-prob of the sampled token, value (or None), entropy of the
    policy's distribution (or None)."""

    logprobs: torch.Tensor
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def response_forward(model: GPT, sequences: torch.Tensor, positions: torch.Tensor, responses: torch.Tensor,
                     temperature: float = 1.0, value_head: nn.Module | None = None, with_entropy: bool = False,
                     entropy_grad: bool = False) -> PolicyOutput:
    """One forward pass over packed ``sequences`` (B, T): log π(response token) at temperature
    ``temperature`` (logits ÷ T, the distribution that was sampled), the ``value_head``'s estimate
    on the same hidden states, and the entropy of π (all (B, R), float32). The entropy carries
    gradients only with ``entropy_grad`` (an entropy bonus); as a metric it costs no backward memory."""
    hidden = model.hidden_states(sequences)  # (B, T, D)
    D = hidden.size(-1)
    at = hidden.gather(1, positions[..., None].expand(-1, -1, D))  # (B, R, D): states before each response token
    logp = torch.log_softmax(model.logits(at).float() / temperature, dim=-1)  # (B, R, V)
    logprobs = logp.gather(-1, responses[..., None]).squeeze(-1)
    values = value_head(at).squeeze(-1).float() if value_head is not None else None
    entropy = None
    if with_entropy:
        src = logp if entropy_grad else logp.detach()
        entropy = -(src.exp() * src).sum(dim=-1)
    return PolicyOutput(logprobs, values, entropy)


def chunked(fn: Callable[..., PolicyOutput], n: int, chunk: int, *tensors: torch.Tensor, **kwargs: Any) -> PolicyOutput:
    """``fn(*tensors, **kwargs)`` on row chunks of at most ``chunk`` rows, outputs concatenated
    (rollout forward passes hold no more activations than a training minibatch)."""
    parts = [fn(*(t[i:i + chunk] for t in tensors), **kwargs) for i in range(0, n, chunk)]
    return PolicyOutput(*(None if getattr(parts[0], f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
                          for f in fields(PolicyOutput)))


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


__all__ = ["GENERATION_CACHES", "sample_responses", "pack_sequences", "PolicyOutput", "response_forward", "chunked",
           "Rollout", "PhaseTimer"]
