"""PretrainTask's text sample: cut before <|endoftext|> as the book's generate(eos_id=50256), or the
full length as its chapter-5 generate_text_simple."""

from __future__ import annotations

import torch

import gptlab.tasks.pretrain as pretrain_module
from gptlab.tasks.pretrain import PretrainTask
from gptlab.tokenizer import EOT_ID, get_tokenizer

TINY = {"name": "gpt2-tiny", "context_length": 32}


def fake_generate(calls: list):
    """A generate() that continues any prompt with " one", <|endoftext|>, " two"."""
    tok = get_tokenizer()

    def generate(model, ids, max_new_tokens, eos_id=None, **kwargs):
        calls.append(eos_id)
        return torch.cat([ids, torch.tensor(tok.encode(" one") + [EOT_ID] + tok.encode(" two"))])
    return generate


def test_the_sample_stops_before_the_end_of_text_token(monkeypatch):
    calls: list = []
    monkeypatch.setattr(pretrain_module, "generate", fake_generate(calls))
    task = PretrainTask(model=TINY, sample_prompt="Every effort")
    assert task.log_sample() == "Every effort one" and calls == [EOT_ID]


def test_sample_stop_at_eos_false_keeps_generating_as_generate_text_simple(monkeypatch):
    calls: list = []
    monkeypatch.setattr(pretrain_module, "generate", fake_generate(calls))
    task = PretrainTask(model=TINY, sample_prompt="Every effort", sample_stop_at_eos=False)
    assert task.log_sample() == "Every effort one<|endoftext|> two" and calls == [None]
