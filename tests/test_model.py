import pytest
import torch

from gptlab import GPT, GPTConfig, KVCache


def test_logits_shape(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (3, 11))
    assert tiny_model(x).shape == (3, 11, tiny_config.vocab_size)


def test_changing_a_token_changes_no_earlier_logit(tiny_model):
    x = torch.randint(0, 50257, (1, 16))
    t = 9
    y = x.clone()
    y[0, t] = (y[0, t] + 1) % 50257
    a, b = tiny_model(x), tiny_model(y)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("tie, expected", [(False, 163_009_536), (True, 124_412_160)])
def test_gpt2_small_parameter_count_matches_the_book(tie, expected):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("gpt2-small", qkv_bias=False, tie_weights=tie))
    assert model.num_params() == expected


@pytest.mark.parametrize("name, layers, dim", [("gpt2-medium", 24, 1024), ("gpt2-large", 36, 1280), ("gpt2-xl", 48, 1600)])
def test_presets_have_the_gpt2_shapes(name, layers, dim):
    c = GPTConfig.from_name(name)
    assert (c.n_layers, c.emb_dim, c.context_length, c.vocab_size) == (layers, dim, 1024, 50257)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="gpt2-small"):
        GPTConfig.from_name("gpt5")


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig.from_dict({"n_layer": 2})


def test_tied_head_shares_the_embedding():
    m = GPT(GPTConfig.from_name("gpt2-tiny", tie_weights=True))
    assert m.out_head.weight is m.tok_emb.weight


def test_gpt2_init_scales_residual_projections():
    m = GPT(GPTConfig.from_name("gpt2-tiny", n_layers=8, emb_dim=128))
    std_fc = m.blocks[0].mlp.fc.weight.std().item()
    std_proj = m.blocks[0].mlp.proj.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)


def test_padded_vocab_gives_same_logits_and_loss_as_unpadded(tiny_config):
    torch.manual_seed(0)
    plain = GPT(tiny_config).eval()
    padded = GPT(GPTConfig.from_name("gpt2-tiny", pad_vocab_multiple=64)).eval()
    assert padded.out_head.out_features == 50304
    state = plain.state_dict()
    for k in ("tok_emb.weight", "out_head.weight"):
        w = torch.zeros_like(padded.state_dict()[k])
        w[:50257] = state[k]
        state[k] = w
    padded.load_state_dict(state)
    x = torch.randint(0, 50257, (2, 9))
    assert padded(x).shape[-1] == 50257
    torch.testing.assert_close(padded(x), plain(x))
    torch.testing.assert_close(padded.loss(x, x), plain.loss(x, x))


def test_kv_cache_forward_equals_full_forward(tiny_model):
    x = torch.randint(0, 50257, (2, 12))
    full = tiny_model(x)
    cache = KVCache(tiny_model.config, batch_size=2)
    parts = [tiny_model(x[:, :5], kv_cache=cache), tiny_model(x[:, 5:8], kv_cache=cache)]
    parts += [tiny_model(x[:, i:i + 1], kv_cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 12


def test_sequence_longer_than_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="context_length"):
        tiny_model(torch.zeros(1, tiny_model.config.context_length + 1, dtype=torch.long))


def test_activation_checkpointing_gives_same_gradients(tiny_config):
    torch.manual_seed(0)
    a = GPT(tiny_config)
    b = GPT(GPTConfig.from_name("gpt2-tiny", activation_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50257, (2, 10))
    a.loss(x, x).backward()
    b.loss(x, x).backward()
    torch.testing.assert_close(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad)


def test_loss_ignores_minus_100(tiny_model):
    x = torch.randint(0, 50257, (1, 8))
    labels = x.clone()
    labels[0, :4] = -100
    logits = tiny_model(x)
    ref = torch.nn.functional.cross_entropy(logits[0, 4:], x[0, 4:])
    torch.testing.assert_close(tiny_model.loss(x, labels), ref)


def test_init_schemes():
    gpt2 = GPT(GPTConfig.from_name("gpt2-tiny", emb_dim=64, vocab_size=5000))
    book = GPT(GPTConfig.from_name("gpt2-tiny", emb_dim=64, vocab_size=5000, init="torch"))
    assert abs(gpt2.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(book.tok_emb.weight.std().item() - 1.0) < 0.05  # nn.Embedding's N(0, 1), as the book's GPTModel
    proj = gpt2.blocks[0].mlp.proj.weight.std().item()
    assert abs(proj - 0.02 / (2 * 2) ** 0.5) < 0.002  # scaled residual projection (2 layers)
    with pytest.raises(ValueError, match="valid choices: \\['gpt2', 'torch'\\]"):
        GPTConfig.from_name("gpt2-tiny", init="xavier")
