"""The GPT backbone: token + position embeddings -> N x Block(attention, MLP) -> final norm -> head.

One module for every task. Attention runs through ``F.scaled_dot_product_attention`` (flash /
memory-efficient kernels where the device has them); a :class:`KVCache` makes decoding O(T) per token.
Parameter names are short and stable so GPT-2 checkpoints map onto them by a small table
(``gptlab/weights/formats.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptlab.model.config import GPTConfig


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Buffers have shape ``(n_layers, B, n_heads, max_len, head_dim)``; ``pos`` counts the positions
    written so far. :meth:`GPT.forward` writes the new keys/values at ``pos`` and advances it.

    ``static=True`` keeps every shape fixed, for ``torch.compile`` / CUDA graphs: new keys/values are
    written at the slots given by an ``input_pos`` tensor and attention always spans all ``max_len``
    slots, the ones not yet written (or not real tokens) masked out. The buffers are marked as static
    addresses, so a CUDA graph may update them in place.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 static: bool = False):
        self.max_len = min(max_len or config.context_length, config.context_length)
        shape = (config.n_layers, batch_size, config.n_heads, self.max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.static = static
        if static:
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, nh, T, hs); return the keys/values attention reads.

        Dynamic cache: written at ``pos``; returns the (B, nh, pos+T, hs) written so far.
        Static cache: written at slots ``input_pos`` (T,); returns all (B, nh, max_len, hs) slots.
        """
        if self.static:
            self.k[layer].index_copy_(2, input_pos, k)
            self.v[layer].index_copy_(2, input_pos, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


class RowKVCache:
    """Keys and values of up to ``max_rows`` sequences that each advance on their own: continuous
    batching, where sequences join and leave the batch between decode steps.

    Buffers have shape ``(n_layers, max_rows, n_heads, capacity, head_dim)``. Rows ``[0, rows)`` are
    in use; row ``r`` holds ``lengths[r]`` slots, ``valid[r, s]`` saying whether slot ``s`` is a real
    token (a prompt's left padding is not). A decode step writes every row's new key/value at its
    own next slot, and attention reads slots ``[0, max(lengths) + 1)`` of the rows in use under
    :meth:`attention_mask`, so a short row never pays for a long neighbour's slots beyond that.
    ``capacity`` grows on demand (doubling, up to ``max_len``). Sequences enter through
    :meth:`insert` (the keys/values of a prefill pass) and leave through :meth:`keep` (finished rows
    dropped, the others moved down so rows ``[0, rows)`` stay contiguous).
    """

    def __init__(self, config: GPTConfig, max_rows: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 capacity: int = 64):
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: expected at least 1")
        self.config, self.max_rows, self.dtype = config, max_rows, dtype
        self.max_len = min(max_len or config.context_length, config.context_length)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rows = 0
        self.lengths: list[int] = []
        self._alloc(min(capacity, self.max_len))

    def _alloc(self, capacity: int) -> None:
        c = self.config
        shape = (c.n_layers, self.max_rows, c.n_heads, capacity, c.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        valid = torch.zeros(self.max_rows, capacity, dtype=torch.bool, device=self.device)
        if hasattr(self, "k"):  # growing: keep what is written
            old = self.k.size(3)
            k[:, :, :, :old], v[:, :, :, :old], valid[:, :old] = self.k, self.v, self.valid
        self.k, self.v, self.valid = k, v, valid
        self.capacity = capacity

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` slots per row (at most ``max_len``)."""
        if slots > self.max_len:
            raise ValueError(f"a sequence of {slots} positions does not fit the cache's {self.max_len}")
        if slots > self.capacity:
            self._alloc(min(self.max_len, max(slots, 2 * self.capacity)))

    def insert(self, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Append ``B`` sequences as rows ``[rows, rows + B)``: ``k, v`` (n_layers, B, nh, T, hs) are a
        prefill pass's keys/values of a left-padded batch whose ``attention_mask`` (B, T) marks the real
        tokens; each row keeps only its real tokens, moved to slots ``[0, n_real)``."""
        B, T = attention_mask.shape
        if self.rows + B > self.max_rows:
            raise ValueError(f"{self.rows} rows in use + {B} new exceeds max_rows={self.max_rows}")
        self.reserve(T)
        n_real = attention_mask.long().sum(-1)  # (B,)
        # slot j of a row takes the prompt position j + (its padding): the real tokens, left-aligned
        src = (torch.arange(T, device=k.device)[None] + (T - n_real)[:, None]).clamp(max=T - 1)  # (B, T)
        index = src[None, :, None, :, None].expand(k.size(0), B, k.size(2), T, k.size(4))
        r0, r1 = self.rows, self.rows + B
        self.k[:, r0:r1, :, :T] = k.gather(3, index).to(self.dtype)
        self.v[:, r0:r1, :, :T] = v.gather(3, index).to(self.dtype)
        self.valid[r0:r1] = False
        self.valid[r0:r1, :T] = torch.arange(T, device=k.device)[None] < n_real[:, None]
        self.rows = r1
        self.lengths += n_real.tolist()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) as rows ``[0, len(rows))``; the others are freed."""
        if rows == list(range(len(rows))):
            self.rows, self.lengths = len(rows), self.lengths[: len(rows)]
            return
        span = max((self.lengths[r] for r in rows), default=0)
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        n = len(rows)
        self.k[:, :n, :, :span] = self.k[:, idx, :, :span]
        self.v[:, :n, :, :span] = self.v[:, idx, :, :span]
        self.valid[:n] = self.valid[idx]
        self.rows, self.lengths = n, [self.lengths[r] for r in rows]

    def next_slots(self) -> torch.Tensor:
        """Where each row in use writes its next token (rows,); marks those slots as real."""
        self.reserve(max(self.lengths, default=0) + 1)
        slots = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        self.valid[torch.arange(self.rows, device=self.device), slots] = True
        return slots

    def advance(self) -> None:
        """Every row in use has written one more token."""
        self.lengths = [n + 1 for n in self.lengths]

    def attention_mask(self) -> torch.Tensor:
        """(rows, 1, 1, span) bool: the real slots of each row, for one new token per row."""
        span = max(self.lengths, default=0) + 1
        return self.valid[: self.rows, None, None, :span]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token per row, ``k, v`` (rows, nh, 1, hs), at slots ``input_pos`` (rows,); return
        the (rows, nh, span, hs) keys/values attention reads."""
        if input_pos is None or k.size(2) != 1 or k.size(0) != self.rows:
            raise ValueError("RowKVCache takes one token per row in use, with each row's slot as input_pos")
        rows = torch.arange(self.rows, device=k.device)
        self.k[layer, rows, :, input_pos] = k[:, :, 0].to(self.dtype)  # (rows, nh, hs)
        self.v[layer, rows, :, input_pos] = v[:, :, 0].to(self.dtype)
        span = max(self.lengths, default=0) + 1
        return self.k[layer, : self.rows, :, :span], self.v[layer, : self.rows, :, :span]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.dropout = config.drop_rate
        self.resid_drop = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, layer: int = 0, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        start = 0
        if kv_cache is not None:
            start = getattr(kv_cache, "pos", 0)  # a RowKVCache has no shared position: attn_mask is given
            # (B, nh, start+T, hs); static cache: (B, nh, max_len, hs) with attn_mask set by GPT
            k, v = kv_cache.update(layer, k, v, input_pos)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is not None:  # explicit (B|1, 1, T, S) boolean mask, True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        elif T == 1 or start == 0:
            # one new token sees every cached key; a fresh sequence is plain causal
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:  # a chunk appended to a cache: token i sees keys up to start + i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.emb_dim
        self.fc = nn.Linear(config.emb_dim, hidden)
        self.proj = nn.Linear(hidden, config.emb_dim)
        self.drop = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU (the book's GELU module is the same formula)
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim, eps=config.ln_eps)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.emb_dim, eps=config.ln_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, layer: int = 0, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), layer, kv_cache, attn_mask, input_pos)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """GPT-2 architecture. ``model(input_ids) -> logits`` of shape (B, T, vocab_size)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V, D = config.padded_vocab_size, config.emb_dim
        self.tok_emb = nn.Embedding(V, D)
        self.pos_emb = nn.Embedding(config.context_length, D)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(D, eps=config.ln_eps)
        self.out_head = nn.Linear(D, V, bias=False)
        if config.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        if config.init == "gpt2":  # ("torch": keep the layers' own defaults, as the book's GPTModel)
            self.apply(self._init_weights)
            # GPT-2: scale the init of the projections that write into the residual stream by
            # 1/sqrt(2 * n_layers), so the stream's variance does not grow with depth.
            for name, p in self.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPT":
        """A randomly initialised model of a preset shape (see :meth:`GPTConfig.from_name`)."""
        return cls(GPTConfig.from_name(name, **overrides))

    def hidden_states(self, input_ids: torch.Tensor, *, kv_cache: KVCache | None = None,
                      position_ids: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None,
                      input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, emb_dim) for ``input_ids`` (B, T).

        ``kv_cache``: decode incrementally (positions continue at ``kv_cache.pos``).
        ``position_ids`` (B, T) and ``attn_mask`` (B, 1, T, S) bool: for left-padded batches.
        With a static cache (``KVCache(static=True)``): ``input_pos`` (T,) are the cache slots the
        tokens go to (default: from ``kv_cache.pos``, which then advances; when given, the caller
        keeps ``pos``), ``position_ids`` default to them, and ``attn_mask`` is (B, 1, 1, max_len):
        which slots hold real tokens.
        With a :class:`RowKVCache`: one token per row in use, ``input_pos`` (B,) each row's slot,
        ``position_ids`` (B, 1) each row's position; ``attn_mask`` defaults to the cache's own.
        """
        B, T = input_ids.shape
        rows = isinstance(kv_cache, RowKVCache)
        static = kv_cache is not None and not rows and kv_cache.static
        advance = kv_cache is not None and not rows and (not static or input_pos is None)
        start = kv_cache.pos if advance else 0
        if start + T > self.config.context_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds context_length="
                             f"{self.config.context_length}")
        if rows:  # one token per row, each at its own slot and position
            if input_pos is None or position_ids is None:
                raise ValueError("a RowKVCache step needs input_pos (each row's slot) and position_ids")
            attn_mask = kv_cache.attention_mask() if attn_mask is None else attn_mask
        elif static:
            if input_pos is None:
                input_pos = torch.arange(start, start + T, device=input_ids.device)
            attn_mask = self._static_cache_mask(kv_cache, input_pos, attn_mask)
        if position_ids is None:
            position_ids = input_pos if static else torch.arange(start, start + T, device=input_ids.device)
        x = self.drop_emb(self.tok_emb(input_ids) + self.pos_emb(position_ids))  # (B, T, D)
        for i, block in enumerate(self.blocks):
            if self.config.activation_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, i, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, i, kv_cache, attn_mask, input_pos)
        if advance:
            kv_cache.pos += T
        return self.final_norm(x)

    @staticmethod
    def _static_cache_mask(kv_cache: KVCache, input_pos: torch.Tensor,
                           slot_ok: torch.Tensor | None) -> torch.Tensor:
        """(B|1, 1, T, max_len) bool: the token at slot ``input_pos[i]`` sees slots up to its own;
        ``slot_ok`` (B, 1, 1, max_len) drops padding. A pad always sees itself, so no softmax row is
        empty (an empty row gives NaN, which would leak through the zero weights of later rows)."""
        slots = torch.arange(kv_cache.max_len, device=input_pos.device)
        mask = slots <= input_pos[:, None]  # (T, S): causal over cache slots, unwritten slots hidden
        if slot_ok is not None:
            mask = (mask & slot_ok) | (slots == input_pos[:, None])
        return mask.expand(1, 1, *mask.shape) if mask.dim() == 2 else mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states to logits over the real vocabulary (padded ids sliced off)."""
        out = self.out_head(hidden)
        if out.size(-1) > self.config.vocab_size and self.out_head.out_features == self.config.padded_vocab_size:
            out = out[..., : self.config.vocab_size]
        return out

    def forward(self, input_ids: torch.Tensor, *, kv_cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for ``input_ids`` (B, T); see :meth:`hidden_states`."""
        return self.logits(self.hidden_states(input_ids, kv_cache=kv_cache, position_ids=position_ids,
                                              attn_mask=attn_mask, input_pos=input_pos))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy; ``labels`` (B, T) are already shifted, ``-100`` = ignored.

        The training path: returns a scalar, so a compiled step never materialises logits for
        the caller.
        """
        logits = self(input_ids)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index)

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count; a tied head is counted once."""
        params = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 * N for the matmuls plus 12 * L * D * T for attention scores and values."""
        c = self.config
        T = seq_len or c.context_length
        # embedding lookups cost nothing; a tied matrix is counted once, as the head's matmul
        n = self.num_params() - self.pos_emb.weight.numel()
        if not c.tie_weights:
            n -= self.tok_emb.weight.numel()
        return 6 * n + 12 * c.n_layers * c.emb_dim * T


def fsdp_wrap_policy() -> set[type[nn.Module]]:
    """Module classes FSDP wraps (and shards) one by one: each transformer block."""
    return {Block}
