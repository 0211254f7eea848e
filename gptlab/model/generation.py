"""Sampling (greedy, temperature, top-k, top-p, stop at eos) and the generation loop.

One loop serves single prompts, batched left-padded prompts (instruction test sets) and streaming:
:func:`generate_stream` yields one token per sequence per step; :func:`generate` collects them.
Only the last position goes through the output head (the head is a third of gpt2-small's weights).
``static_cache=True`` keeps every decode step the same shape; ``compile=True`` adds ``torch.compile``
on top (a CUDA graph on GPU), the fast route for batch-1 decoding on a GPU.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from gptlab.checks import check_node, integer, number
from gptlab.model.gpt import GPT, KVCache


SAMPLING_RULES = {"max_new_tokens": integer(ge=0), "temperature": number(ge=0, optional=True, note="0 = greedy"),
                  "top_k": integer(ge=0, optional=True, note="0 or null = off"),
                  "top_p": number(gt=0, le=1, optional=True, note="1 or null = off")}
"""The rule of every sampling argument: ``temperature`` >= 0 (0 or None: greedy), ``top_k`` >= 0
(0 or None: off), ``0 < top_p <= 1`` (1 or None: off), ``max_new_tokens`` >= 0."""


def check_sampling_args(max_new_tokens: Any, temperature: Any = 0.0, top_k: Any = None, top_p: Any = None) -> None:
    """Raise ``ValueError`` naming every sampling argument out of its range (:data:`SAMPLING_RULES`)."""
    problems = check_node(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p),
                          SAMPLING_RULES)
    if problems:
        raise ValueError("; ".join(p.at() for p in problems))


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from ``logits`` (B, V); returns ids (B,).

    ``temperature`` 0 (or None) is greedy argmax. Otherwise logits are divided by the temperature,
    restricted to the ``top_k`` largest and to the smallest set whose probability reaches ``top_p``
    (nucleus), and sampled. Arguments out of range raise ``ValueError`` (:func:`check_sampling_args`).
    """
    check_sampling_args(0, temperature, top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(logits: torch.Tensor, temperature: float | None, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """:func:`sample_next_token` without the argument checks (the decode loop checks them once)."""
    if not temperature:
        return logits.argmax(dim=-1)
    probs = F.softmax(_filtered_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _filtered_logits(logits: torch.Tensor, temperature: float, top_k: int | None,
                     top_p: float | None) -> torch.Tensor:
    """``logits`` (B, V) divided by ``temperature`` (> 0), with the tokens outside ``top_k`` and the
    ``top_p`` nucleus set to -inf: what :func:`sample_next_token` samples from."""
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
    return logits


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token of every row of ``logits`` (B, V) with that row's own settings; ids (B,).

    ``temperature`` (B,) float (0: greedy), ``top_k`` (B,) int (0: off), ``top_p`` (B,) float (1:
    off) act as in :func:`sample_next_token`, in one pass over the batch (one sort serves both
    filters). Sampling is the exponential race (argmax of probs / Exp(1) noise, the same distribution
    as ``torch.multinomial``): a row with its own generator in ``generators`` draws its noise from
    it, so its tokens depend on its seed only, never on its neighbours; the other rows share
    ``generator``. Arguments are not checked here (the caller checks them once per sequence).
    """
    greedy = temperature <= 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    filtered = _filtered_rows(logits, torch.where(greedy, 1.0, temperature.float()), top_k, top_p)
    probs = F.softmax(filtered, dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for row, gen in enumerate(generators or ()):
        if gen is not None:
            noise[row].exponential_(generator=gen)  # a view: this row's noise from its own stream
    sampled = (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def _filtered_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """:func:`_filtered_logits` with per-row settings: ``temperature`` (B,) > 0, ``top_k`` (B,) (0:
    off), ``top_p`` (B,) (>= 1: off)."""
    V = logits.size(-1)
    logits = logits.float() / temperature[:, None]
    sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V).long()
    kth = sorted_logits.gather(-1, (k - 1)[:, None])  # (B, 1): the k-th largest logit
    logits = logits.masked_fill(logits < kth, float("-inf"))
    nucleus = top_p < 1.0
    if bool(nucleus.any()):
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # as in _filtered_logits: drop a token once the tokens ranked above it reach top_p
        drop_sorted = ((sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]) & nucleus[:, None]
        logits = logits.masked_fill(drop_sorted.scatter(-1, sorted_idx, drop_sorted), float("-inf"))
    return logits


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


def _last_logits(model: GPT, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits (B, V) of the last position of ``input_ids`` (B, T): the head runs on one token."""
    return model.logits(model.hidden_states(input_ids, **kwargs)[:, -1])


_COMPILED_DECODE: "weakref.WeakKeyDictionary[GPT, Callable[..., torch.Tensor]]" = weakref.WeakKeyDictionary()


def compiled_decode_step(model: GPT) -> Callable[..., torch.Tensor]:
    """:func:`_last_logits` compiled for ``model``'s one-token steps over a static cache (built once
    per model). Shapes never change, so one graph serves every step; on CUDA it is captured as a
    CUDA graph (``mode="reduce-overhead"``), which removes the per-kernel launch cost of decoding."""
    fn = _COMPILED_DECODE.get(model)
    if fn is None:
        cuda = next(model.parameters()).is_cuda
        fn = torch.compile(_last_logits, fullgraph=True, dynamic=False,
                           mode="reduce-overhead" if cuda else None)
        _COMPILED_DECODE[model] = fn
    return fn


def generate_stream(model: GPT, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                    use_kv_cache: bool = True, attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, *, static_cache: bool = False,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (B,) step by step; see :func:`generate`. Bad
    arguments (sampling out of range, an empty prompt) raise ``ValueError`` here, not at the first
    step."""
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() not in (1, 2) or input_ids.size(-1) == 0:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)}: expected (T,) or (B, T) with at least "
                         "one prompt token (an empty prompt gives the model nothing to continue)")
    return _generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id, use_kv_cache,
                            attention_mask, generator, static_cache, compile)


@torch.inference_mode()
def _generate_stream(model: GPT, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                     top_k: int | None, top_p: float | None, eos_id: int | None, use_kv_cache: bool,
                     attention_mask: torch.Tensor | None, generator: torch.Generator | None,
                     static_cache: bool, compile: bool) -> Iterator[torch.Tensor]:
    idx = input_ids if input_ids.dim() == 2 else input_ids[None]
    B = idx.size(0)
    ctx = model.config.context_length
    if attention_mask is not None:
        attention_mask = attention_mask.to(idx.device).bool()
        if attention_mask.shape != idx.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(idx.shape)}")
    static_cache = static_cache or compile
    decode = compiled_decode_step(model) if compile and use_kv_cache else _last_logits
    cache_dtype = next(model.parameters()).dtype
    cache = None
    slot_ok = input_pos = None  # static cache: which slots hold real tokens (B, ctx); next slot (1,)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if use_kv_cache and cache is None and idx.size(1) + 1 <= ctx and step == 0:
            # prefill: the whole prompt in one pass, filling the cache
            T = idx.size(1)
            # a dynamic cache holds just this call's tokens (memory); a static one the whole context,
            # so its shapes, and a compiled step, are the same for every call
            max_len = ctx if static_cache else min(ctx, T + max_new_tokens)
            cache = KVCache(model.config, B, max_len=max_len, device=idx.device, dtype=cache_dtype,
                            static=static_cache)
            pos = None
            if attention_mask is not None:
                pos, mask = _padding_masks(attention_mask)
                next_pos = pos[:, -1:] + 1
            if static_cache:
                if attention_mask is not None:
                    slot_ok = torch.zeros(B, ctx, dtype=torch.bool, device=idx.device)
                    slot_ok[:, :T] = attention_mask
                logits = _last_logits(model, idx, kv_cache=cache, position_ids=pos,
                                      input_pos=torch.arange(T, device=idx.device),
                                      attn_mask=None if slot_ok is None else slot_ok[:, None, None])
                cache.pos = T
                input_pos = torch.tensor([T], device=idx.device)
            elif attention_mask is not None:
                logits = _last_logits(model, idx, kv_cache=cache, position_ids=pos, attn_mask=mask)
            else:
                logits = _last_logits(model, idx, kv_cache=cache)
        elif cache is not None and cache.pos < cache.max_len:
            # decode: one token, attending to everything cached. The (B, 1) token is taken from
            # ``nxt``, not sliced from ``idx``: its strides stay fixed, so a compiled step never recompiles
            last = nxt[:, None]
            if static_cache:
                if slot_ok is not None:
                    slot_ok[:, cache.pos] = True
                logits = decode(model, last, kv_cache=cache, input_pos=input_pos,
                                position_ids=None if slot_ok is None else next_pos,
                                attn_mask=None if slot_ok is None else slot_ok[:, None, None])
                cache.pos += 1
                input_pos = input_pos + 1  # a new tensor: a CUDA graph may still hold the old one
            elif attention_mask is not None:
                key_mask = attention_mask[:, None, None, :]  # (B, 1, 1, S)
                logits = _last_logits(model, last, kv_cache=cache, position_ids=next_pos, attn_mask=key_mask)
            else:
                logits = _last_logits(model, last, kv_cache=cache)
            if attention_mask is not None:
                next_pos = next_pos + 1
        else:
            # no cache, or the context is full: recompute on the last ``ctx`` tokens
            cache = None
            cond = idx[:, -ctx:]
            if attention_mask is not None:
                pos, mask = _padding_masks(attention_mask[:, -ctx:])
                logits = _last_logits(model, cond, position_ids=pos, attn_mask=mask)
            else:
                logits = _last_logits(model, cond)
        nxt = _sample(logits, temperature, top_k, top_p, generator)
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
             generator: torch.Generator | None = None, *, static_cache: bool = False,
             compile: bool = False) -> torch.Tensor:
    """Continue ``input_ids`` ((T,) or (B, T)) by up to ``max_new_tokens``; returns prompt + new ids.

    ``temperature=0`` is greedy; ``top_k`` / ``top_p`` filter before sampling. Generation stops once
    every sequence has produced ``eos_id`` (which is kept; finished rows are filled with it).
    Sequences longer than the context are cropped to its last ``context_length`` tokens.
    ``attention_mask`` (B, T): 1 for real tokens, 0 for left padding, for batches of prompts of
    different lengths. With ``use_kv_cache`` each step costs one token's forward pass; the result
    is the same as recomputing the whole sequence each step. ``static_cache`` attends over the
    whole preallocated cache with a mask, so every decode step has the same shapes; ``compile``
    (implies ``static_cache``) runs those steps through ``torch.compile`` (a CUDA graph on GPU; the
    first call compiles). Both give the same tokens as the dynamic cache.
    """
    was_training = model.training
    model.eval()
    try:
        new = list(generate_stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_id,
                                   use_kv_cache, attention_mask, generator, static_cache=static_cache,
                                   compile=compile))
    finally:
        model.train(was_training)
    idx = input_ids if input_ids.dim() == 2 else input_ids[None]
    out = torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
    return out if input_ids.dim() == 2 else out[0]
