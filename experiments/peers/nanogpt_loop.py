"""The training side of the peers benchmark: a plain loop in nanoGPT's published design (its
``model.py`` GPT and its ``train.py`` loop), written here from that design, not copied.

What it keeps of nanoGPT, since each of these costs or saves time:
  * the model: one ``c_attn`` projection for q|k|v, ``F.scaled_dot_product_attention(is_causal=True)``,
    GELU MLP (4x), pre-LayerNorm blocks, the head tied to the token embedding, full logits and
    ``F.cross_entropy`` over every position;
  * the optimizer: AdamW with weight decay on the >= 2-D tensors only, ``fused`` only on CUDA
    (nanoGPT's ``configure_optimizers``), betas (0.9, 0.95);
  * the loop: random windows sliced from one token array per step (``get_batch``), the learning
    rate set by hand each step (warmup + cosine), autocast only on CUDA (bf16), backward, clipping
    at 1.0, step, ``zero_grad(set_to_none=True)``, and ``loss.item()`` every step (``log_interval=1``).
The weights are the shared Hugging Face folder's, Conv1D matrices transposed into ``nn.Linear``
(as nanoGPT's ``from_pretrained`` does); GPT-2 has q/k/v biases, so ``bias=True`` (zeros here).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.c_attn, self.c_proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in self.c_attn(x).split(D, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), SelfAttention(d, heads), nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.c_fc, self.mlp.gelu, self.mlp.c_proj = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """GPT-2 laid out as nanoGPT lays it out (``transformer.wte/wpe/h/ln_f``, ``lm_head`` tied)."""

    def __init__(self, vocab: int, ctx: int, d: int, heads: int, layers: int):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(ctx, d),
                                              h=nn.ModuleList(Block(d, heads) for _ in range(layers)),
                                              ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in t.h:
            x = block(x)
        logits = self.lm_head(t.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def load_hf_folder(folder: str) -> NanoGPT:
    """The shared weights (``export_hf``'s ``model.safetensors`` + ``config.json``) in nanoGPT's layout."""
    import json

    cfg = json.loads((Path(folder) / "config.json").read_text())
    model = NanoGPT(cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_head"], cfg["n_layer"])
    sd = {k.removeprefix("transformer."): v for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            src = sd[name]
            p.copy_(src.t() if name.endswith(conv1d) else src)
    return model


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    """nanoGPT's split: decay for tensors of 2+ dimensions, none for biases and norms; fused on CUDA only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device == "cuda")


def lr_at(step: int, total: int, lr: float = 4e-4, warmup: int = 2, min_lr: float = 4e-5) -> float:
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    ratio = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def train_nanogpt(weights: str, spec: dict[str, Any], device: str, g: Any) -> None:
    """Train the shared weights for ``g.total_steps`` steps of ``spec['batch']`` random windows."""
    torch.manual_seed(0)
    model = load_hf_folder(weights).to(device).train()
    g.watch(model.transformer.wte)
    opt = configure_optimizer(model, 4e-4, 0.1, device)
    ctx = spec["overrides"]["context_length"]
    data = np.random.default_rng(0).integers(0, 50257, 1_000_000, dtype=np.uint16)  # train.bin stand-in
    amp = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - ctx, (spec["batch"],))
        x = torch.stack([torch.from_numpy(data[i:i + ctx].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + ctx].astype(np.int64)) for i in ix.tolist()])
        if device == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    x, y = get_batch()
    for step in range(g.total_steps):
        g.tick(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, g.total_steps)
        with amp:
            loss = model(x, y)
        x, y = get_batch()  # the next batch is fetched while the GPU works, as nanoGPT does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT logs the loss every iteration (a host sync on a GPU)
