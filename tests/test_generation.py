import torch

from gptlab import GPT, GPTConfig, generate, sample_next_token


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 100)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))


def test_top_k_only_samples_the_k_best():
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    allowed = torch.topk(logits, 3).indices
    for _ in range(300):
        tok = sample_next_token(logits, temperature=2.0, top_k=3)
        assert all(tok[i] in allowed[i] for i in range(2))


def test_top_p_only_samples_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps the first two (0.5 < 0.75 <= 0.8)
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    seen = {int(sample_next_token(logits, temperature=1.0, top_p=0.75)) for _ in range(400)}
    assert seen == {1, 3}


def test_top_p_keeps_the_best_token_even_when_it_alone_exceeds_p():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    assert {int(sample_next_token(logits, temperature=1.0, top_p=0.1)) for _ in range(50)} == {1}


def test_greedy_with_kv_cache_equals_recomputation(tiny_model):
    x = torch.randint(0, 50257, (3, 6))
    # 80 new tokens: the sequence outgrows the 64-token context, so cropping is exercised too
    a = generate(tiny_model, x, 80, use_kv_cache=True)
    b = generate(tiny_model, x, 80, use_kv_cache=False)
    assert a.shape == (3, 86)
    assert torch.equal(a, b)


def test_returns_prompt_plus_new_tokens_for_1d_input(tiny_model):
    x = torch.randint(0, 50257, (5,))
    out = generate(tiny_model, x, 7)
    assert out.shape == (12,) and torch.equal(out[:5], x)


def test_stops_at_eos():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2-tiny")).eval()
    x = torch.randint(0, 50257, (1, 4))
    first = int(generate(model, x, 1)[0, -1])  # the greedy next token, used as "eos"
    out = generate(model, x, 20, eos_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


def test_left_padded_batch_matches_single_prompts(tiny_model):
    p1, p2 = torch.randint(0, 50257, (4,)), torch.randint(0, 50257, (9,))
    batch = torch.full((2, 9), 50256)
    batch[0, 5:], batch[1] = p1, p2
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, 5:], mask[1] = 1, 1
    out = generate(tiny_model, batch, 15, attention_mask=mask)
    assert torch.equal(out[0, 9:], generate(tiny_model, p1, 15)[4:])
    assert torch.equal(out[1, 9:], generate(tiny_model, p2, 15)[9:])


def test_sampling_is_reproducible_with_a_generator(tiny_model):
    x = torch.randint(0, 50257, (1, 3))
    outs = [generate(tiny_model, x, 10, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(*outs)
