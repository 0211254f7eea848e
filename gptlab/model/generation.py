"""Sampling (greedy, temperature, top-k, top-p, stop at eos) and the generation loop.

One loop serves single prompts, batched left-padded prompts (instruction test sets) and streaming:
:func:`generate_stream` yields one token per sequence per step; :func:`generate` collects them.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from gptlab.model.gpt import GPT, KVCache


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from ``logits`` (B, V); returns ids (B,).

    ``temperature`` 0 (or None) is greedy argmax. Otherwise logits are divided by the temperature,
    restricted to the ``top_k`` largest and to the smallest set whose probability reaches ``top_p``
    (nucleus), and sampled.
    """
    if not temperature:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _padding_masks(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (B, T) and the (B, 1, T, T) attention mask for a left-padded prompt batch.

    Pads may only attend to themselves, so no softmax row is empty (an empty row gives NaN).
    """
    key_ok = attention_mask.bool()  # (B, T)
    T = key_ok.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=key_ok.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=key_ok.device)
    mask = (causal & key_ok[:, None, :]) | eye  # (B, T, T)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return position_ids, mask[:, None]


@torch.inference_mode()
def generate_stream(model: GPT, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                    use_kv_cache: bool = True, attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (B,) step by step; see :func:`generate`."""
    idx = input_ids if input_ids.dim() == 2 else input_ids[None]
    B = idx.size(0)
    ctx = model.config.context_length
    if attention_mask is not None:
        attention_mask = attention_mask.to(idx.device).bool()
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(idx.shape)}")
    cache_dtype = next(model.parameters()).dtype
    cache = None
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if use_kv_cache and cache is None and idx.size(1) + 1 <= ctx and step == 0:
            # prefill: the whole prompt in one pass, filling the cache
            cache = KVCache(model.config, B, max_len=ctx, device=idx.device, dtype=cache_dtype)
            if attention_mask is not None:
                pos, mask = _padding_masks(attention_mask)
                logits = model(idx, kv_cache=cache, position_ids=pos, attn_mask=mask)
                next_pos = pos[:, -1:] + 1
            else:
                logits = model(idx, kv_cache=cache)
        elif cache is not None and cache.pos < ctx:
            # decode: one token, attending to everything cached
            last = idx[:, -1:]
            if attention_mask is not None:
                key_mask = attention_mask[:, None, None, :]  # (B, 1, 1, S)
                logits = model(last, kv_cache=cache, position_ids=next_pos, attn_mask=key_mask)
                next_pos = next_pos + 1
            else:
                logits = model(last, kv_cache=cache)
        else:
            # no cache, or the context is full: recompute on the last ``ctx`` tokens
            cache = None
            cond = idx[:, -ctx:]
            if attention_mask is not None:
                pos, mask = _padding_masks(attention_mask[:, -ctx:])
                logits = model(cond, position_ids=pos, attn_mask=mask)
            else:
                logits = model(cond)
        nxt = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done = done | (nxt == eos_id)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        yield nxt
        if eos_id is not None and bool(done.all()):
            return


def generate(model: GPT, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_kv_cache: bool = True, attention_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``input_ids`` ((T,) or (B, T)) by up to ``max_new_tokens``; returns prompt + new ids.

    ``temperature=0`` is greedy; ``top_k`` / ``top_p`` filter before sampling. Generation stops once
    every sequence has produced ``eos_id`` (which is kept; finished rows are filled with it).
    Sequences longer than the context are cropped to its last ``context_length`` tokens.
    ``attention_mask`` (B, T): 1 for real tokens, 0 for left padding, for batches of prompts of
    different lengths. With ``use_kv_cache`` each step costs one token's forward pass; the result
    is the same as recomputing the whole sequence each step.
    """
    was_training = model.training
    model.eval()
    try:
        new = list(generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id,
                                   use_kv_cache, attention_mask, generator))
    finally:
        model.train(was_training)
    idx = input_ids if input_ids.dim() == 2 else input_ids[None]
    out = torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
    return out if input_ids.dim() == 2 else out[0]
