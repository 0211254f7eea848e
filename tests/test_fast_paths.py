"""Every fast path gives what the plain path gives: compiled vs eager, padded vs unpadded vocabulary,
static vs dynamic KV cache, activation checkpointing vs none.

``torch.compile`` runs with the ``aot_eager`` backend by default (graph capture, functionalisation and
AOT autograd, in seconds); the inductor variants generate C++ and take a minute on a small CPU, so
they are marked slow and need a C compiler.
"""

from __future__ import annotations

import functools
import shutil

import pytest
import torch

from gptlab.model import generation
from gptlab.model.config import GPTConfig
from gptlab.model.generation import generate
from gptlab.model.gpt import GPT, KVCache
from gptlab.tasks.base import GPTTask

HAS_CC = any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "c++", "g++"))
NEEDS_CC = pytest.mark.skipif(not HAS_CC, reason="inductor on CPU needs a C compiler")
BACKENDS = ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, NEEDS_CC])]


@pytest.fixture
def compile_backend(request, monkeypatch):
    """``torch.compile`` with the parametrised backend, for code that calls ``torch.compile`` itself."""
    torch._dynamo.reset()
    generation._COMPILED_DECODE.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=request.param))
    yield request.param
    torch._dynamo.reset()
    generation._COMPILED_DECODE.clear()


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("compile_backend", BACKENDS, indirect=True)
def test_compiled_forward_gives_the_eager_logits(tiny_model, compile_backend):
    x = torch.randint(0, 50257, (2, 16))
    compiled = torch.compile(tiny_model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), tiny_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compile_backend", BACKENDS, indirect=True)
def test_compiled_training_step_gives_the_eager_loss_and_gradients(compile_backend):
    eager = GPTTask(model={"name": "gpt2-tiny"}, compile=False)
    compiled = GPTTask(model={"name": "gpt2-tiny"}, compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randint(0, 50257, (2, 16))
    batch = {"input_ids": x, "labels": torch.roll(x, -1, dims=1)}
    loss_e, loss_c = eager.loss_fn(batch), compiled.loss_fn(batch)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    g_e, g_c = grads(eager), grads(compiled)
    assert g_e.keys() == g_c.keys() and len(g_e) == len(list(eager.parameters()))
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], atol=1e-6, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------- padded vocabulary
def _padded_copy(model: GPT) -> GPT:
    """``model`` with its vocabulary padded to a multiple of 64; the extra head rows get huge
    weights, so a padded id would win every argmax and every sample if it were not sliced off."""
    padded = GPT(GPTConfig.from_dict({**model.config.to_dict(), "pad_vocab_multiple": 64}))
    state = model.state_dict()
    for key in ("tok_emb.weight", "out_head.weight"):
        w = torch.full_like(padded.state_dict()[key], 10.0)
        w[:model.config.vocab_size] = state[key]
        state[key] = w
    padded.load_state_dict(state)
    return padded


@pytest.mark.parametrize("compile_backend", ["aot_eager"], indirect=True)
def test_padded_vocab_compiled_loss_equals_unpadded_and_padded_rows_get_no_gradient(tiny_model, compile_backend):
    tiny_model.train()
    padded = _padded_copy(tiny_model).train()
    assert padded.out_head.out_features == 50304
    x = torch.randint(0, 50257, (2, 12))
    loss_plain = tiny_model.loss(x, x)
    loss_padded = torch.compile(padded.loss)(x, x)
    torch.testing.assert_close(loss_padded, loss_plain)
    loss_plain.backward()
    loss_padded.backward()
    head = padded.out_head.weight.grad
    torch.testing.assert_close(head[:50257], tiny_model.out_head.weight.grad)
    assert not head[50257:].any() and not padded.tok_emb.weight.grad[50257:].any()


def test_padded_vocab_never_samples_a_padded_id(tiny_model):
    padded = _padded_copy(tiny_model).eval()
    x = torch.randint(0, 50257, (2, 5))
    assert padded(x).shape[-1] == 50257
    greedy = generate(padded, x, 10)
    assert torch.equal(greedy, generate(tiny_model, x, 10))
    sampled = generate(padded, x, 30, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert int(sampled.max()) < 50257


# --------------------------------------------------------------------------------------- static KV cache
def test_static_cache_forward_equals_full_forward(tiny_model):
    x = torch.randint(0, 50257, (2, 12))
    full = tiny_model(x)
    cache = KVCache(tiny_model.config, batch_size=2, static=True)
    parts = [tiny_model(x[:, :5], kv_cache=cache), tiny_model(x[:, 5:8], kv_cache=cache)]
    parts += [tiny_model(x[:, i:i + 1], kv_cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 12 and cache.k.shape[3] == tiny_model.config.context_length


def test_static_cache_generation_equals_dynamic_cache(tiny_model):
    x = torch.randint(0, 50257, (3, 6))
    # 80 new tokens outgrow the 64-token context: the fall-back to recomputation is exercised too
    dynamic = generate(tiny_model, x, 80)
    assert torch.equal(generate(tiny_model, x, 80, static_cache=True), dynamic)
    assert torch.equal(generate(tiny_model, x, 80, use_kv_cache=False), dynamic)


def _left_padded(prompts: list[torch.Tensor], pad_id: int = 50256) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), T), pad_id)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return batch, mask


@pytest.mark.parametrize("static_cache", [False, True], ids=["dynamic", "static"])
def test_left_padded_batch_equals_one_prompt_at_a_time(tiny_model, static_cache):
    prompts = [torch.randint(0, 50257, (n,)) for n in (3, 9, 6)]
    batch, mask = _left_padded(prompts)
    out = generate(tiny_model, batch, 12, attention_mask=mask, static_cache=static_cache)
    for row, p in zip(out, prompts):
        assert torch.equal(row[batch.size(1):], generate(tiny_model, p, 12)[len(p):])


@pytest.mark.parametrize("compile_backend", BACKENDS, indirect=True)
def test_compiled_static_decode_equals_eager_and_compiles_one_graph(tiny_model, compile_backend):
    x = torch.randint(0, 50257, (1, 7))
    eager = generate(tiny_model, x, 20)
    torch._dynamo.utils.counters.clear()
    assert torch.equal(generate(tiny_model, x, 20, compile=True), eager)
    # every one-token step has the same shapes: one graph, no recompilation (what a CUDA graph needs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    prompts = [torch.randint(0, 50257, (n,)) for n in (2, 5)]
    batch, mask = _left_padded(prompts)
    out = generate(tiny_model, batch, 8, attention_mask=mask, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one more for padded batches
    for row, p in zip(out, prompts):
        assert torch.equal(row[batch.size(1):], generate(tiny_model, p, 8)[len(p):])


# --------------------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_from_the_config_gives_the_same_loss_and_gradients():
    plain = GPTTask(model={"name": "gpt2-tiny", "activation_checkpointing": False})
    ckpt = GPTTask(model={"name": "gpt2-tiny", "activation_checkpointing": True})
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.model.config.activation_checkpointing
    x = torch.randint(0, 50257, (2, 16))
    batch = {"input_ids": x, "labels": torch.roll(x, -1, dims=1)}
    loss_p, loss_c = plain.loss_fn(batch), ckpt.loss_fn(batch)
    loss_p.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_p)
    g_p, g_c = grads(plain), grads(ckpt)
    assert g_p.keys() == g_c.keys()
    for name in g_p:
        torch.testing.assert_close(g_c[name], g_p[name], msg=name)
