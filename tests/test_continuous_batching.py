"""Continuous batching (gptlab/model/continuous.py) and per-row sampling (``sample_rows``): rows join and
leave between steps and still get exactly the tokens ``generate`` gives each prompt alone; each row
keeps its own sampling settings and seed."""

from __future__ import annotations

import pytest
import torch

from gptlab.model.config import GPTConfig
from gptlab.model.continuous import ContinuousBatch, Sampling
from gptlab.model.generation import _filtered_logits, _filtered_rows, generate, sample_rows
from gptlab.model.gpt import GPT, RowKVCache


def run_all(batch: ContinuousBatch, prompts, max_new, sampling=None, join_every: int = 1) -> dict[int, list[int]]:
    """Feed ``prompts`` into ``batch`` as rows free up (at most one join per ``join_every`` steps);
    every sequence's tokens, by index."""
    sampling = sampling or [Sampling()] * len(prompts)
    out: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    pending, step = list(range(len(prompts))), 0
    while pending or batch.rows:
        events = []
        n = min(batch.free, len(pending)) if step % join_every == 0 else 0
        if n:
            take, pending = pending[:n], pending[n:]
            events += batch.add([prompts[i] for i in take], [max_new[i] for i in take],
                                [sampling[i] for i in take], take)
        events += batch.step()
        for e in events:
            out[e.key].append(e.token)
        step += 1
    return out


@pytest.fixture
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 1000, (n,), generator=g) for n in (3, 9, 5, 1, 12, 7)]


def test_greedy_rows_joining_and_leaving_match_generate_alone(tiny_model, prompts):
    max_new = [4, 10, 7, 12, 3, 6]
    ref = [generate(tiny_model, p, k)[len(p):].tolist() for p, k in zip(prompts, max_new)]
    out = run_all(ContinuousBatch(tiny_model, max_rows=3), prompts, max_new, join_every=2)
    assert [out[i] for i in range(len(prompts))] == ref


def test_a_row_leaves_the_moment_it_is_done(tiny_model, prompts):
    batch = ContinuousBatch(tiny_model, max_rows=4)
    events = batch.add(prompts[:3], [2, 5, 9], [Sampling()] * 3, ["a", "b", "c"])
    assert [(e.key, e.finished) for e in events] == [("a", False), ("b", False), ("c", False)]
    finished_at = {}
    for step in range(1, 10):
        for e in batch.step():
            if e.finished:
                finished_at[e.key] = step
                assert e.key not in batch.keys  # gone at once: its row is free for the next request
    assert finished_at == {"a": 1, "b": 4, "c": 8} and batch.rows == 0 and batch.free == 4


def test_eos_finishes_only_its_own_row(tiny_model, prompts):
    first = generate(tiny_model, prompts[0], 1)[-1].item()  # make prompt 0's first token the eos
    batch = ContinuousBatch(tiny_model, max_rows=2, eos_id=first)
    events = batch.add(prompts[:2], [5, 5], [Sampling()] * 2, [0, 1])
    assert events[0].token == first and events[0].finished and batch.keys == [1]
    ref = generate(tiny_model, prompts[1], 5)[len(prompts[1]):].tolist()
    tokens = [events[1].token] + [e.token for _ in range(4) for e in batch.step()]
    assert tokens == ref[: len(tokens)]


def test_remove_frees_the_row_and_the_others_go_on_unchanged(tiny_model, prompts):
    batch = ContinuousBatch(tiny_model, max_rows=3)
    out = {k: [e.token] for k, e in zip("abc", batch.add(prompts[:3], [8] * 3, [Sampling()] * 3, list("abc")))}
    batch.step()
    batch.remove(["b", "not-there"])
    assert batch.keys == ["a", "c"] and batch.free == 1
    for _ in range(6):
        for e in batch.step():
            out[e.key].append(e.token)
    for key, p in (("a", prompts[0]), ("c", prompts[2])):
        ref = generate(tiny_model, p, 8)[len(p):].tolist()
        assert out[key] == ref[:1] + ref[2:]  # the step before remove() was not recorded here


def test_the_cache_grows_past_its_first_capacity():
    model = GPT(GPTConfig.from_name("gpt2-tiny", vocab_size=512)).eval()
    p = torch.arange(5, 17)
    batch = ContinuousBatch(model, max_rows=2)
    batch.cache = RowKVCache(model.config, 2, capacity=4)  # start small: prefill and decode must grow it
    out = run_all(batch, [p, p[:3]], [12, 20])
    assert batch.cache.capacity >= 23
    assert out[0] == generate(model, p, 12)[12:].tolist() and out[1] == generate(model, p[:3], 20)[3:].tolist()


def test_a_seeded_row_does_not_depend_on_its_neighbours(tiny_model, prompts):
    hot = Sampling(temperature=1.0, seed=42)
    alone = run_all(ContinuousBatch(tiny_model, max_rows=1), [prompts[1]], [8], [hot])[0]
    crowd = [Sampling(temperature=1.5), hot, Sampling(temperature=0.7, top_k=5, seed=3), Sampling()]
    together = run_all(ContinuousBatch(tiny_model, max_rows=4), [prompts[0], prompts[1], prompts[2], prompts[3]],
                       [8, 8, 8, 8], crowd)
    assert together[1] == alone
    other_seed = run_all(ContinuousBatch(tiny_model, max_rows=1), [prompts[1]], [8], [Sampling(1.0, seed=43)])[0]
    assert other_seed != alone


def test_each_row_keeps_its_own_settings(tiny_model, prompts):
    p = prompts[4]
    greedy = generate(tiny_model, p, 6)[len(p):].tolist()
    settings = [Sampling(), Sampling(temperature=5.0, top_k=1), Sampling(temperature=5.0, seed=1)]
    out = run_all(ContinuousBatch(tiny_model, max_rows=3), [p, p, p], [6, 6, 6], settings)
    assert out[0] == greedy and out[1] == greedy  # top_k=1 is greedy whatever the temperature
    assert out[2] != greedy  # temperature 5 over 50k tokens: a different continuation


def test_sample_rows_filters_each_row_as_the_scalar_sampler_does():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    settings = [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.5), (2.0, 3, 0.99)]
    t, k, p = (torch.tensor([s[i] for s in settings]) for i in range(3))
    rows = _filtered_rows(logits, t, k.long(), p)
    for i, (ti, ki, pi) in enumerate(settings):
        ref = _filtered_logits(logits[i:i + 1], ti, ki or None, pi if pi < 1 else None)[0]
        assert torch.equal(torch.isinf(rows[i]), torch.isinf(ref))
        assert torch.allclose(rows[i].softmax(-1), ref.softmax(-1))


def test_sample_rows_draws_from_the_filtered_distribution():
    n = 20000
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(n, 4)
    t, k, p = torch.full((n,), 1.0), torch.full((n,), 3), torch.ones(n)
    picks = sample_rows(logits, t, k, p, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=4).float() / n
    expected = torch.tensor([2.0, 1.0, 0.0]).softmax(-1)
    assert freq[3] == 0 and torch.allclose(freq[:3], expected, atol=0.02)


def test_sample_rows_greedy_rows_are_argmax_next_to_sampled_rows():
    logits = torch.randn(4, 50)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = sample_rows(logits, t, torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


@pytest.mark.parametrize("prompt_len, max_new, sampling, match", [
    (60, 10, Sampling(), r"60 tokens \+ max_new_tokens=10 exceeds the model's context of 64"),
    (5, 0, Sampling(), r"max_new_tokens=0"),
    (5, 3, Sampling(temperature=-1), r"temperature=-1"),
    (5, 3, Sampling(top_p=1.5), r"top_p=1.5"),
    (5, 3, Sampling(seed="x"), r"seed='x'"),
    (0, 3, Sampling(), r"empty prompt"),
])
def test_what_does_not_fit_is_refused_naming_it(tiny_model, prompt_len, max_new, sampling, match):
    batch = ContinuousBatch(tiny_model, max_rows=2)
    with pytest.raises(ValueError, match=match):
        batch.add([torch.zeros(prompt_len, dtype=torch.long)], [max_new], [sampling], ["x"])
    assert batch.rows == 0


def test_more_sequences_than_free_rows_are_refused(tiny_model, prompts):
    batch = ContinuousBatch(tiny_model, max_rows=2)
    with pytest.raises(ValueError, match="only 2 of 2 rows are free"):
        batch.add(prompts[:3], [2] * 3, [Sampling()] * 3, [0, 1, 2])
