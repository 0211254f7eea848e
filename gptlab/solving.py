"""Inference-time scaling on problems with verifiable answers (the book's sequel, ch. 4–5): answer each
problem greedily, by **self-consistency** (N sampled completions, majority vote over their extracted
answers) or by **best-of-N** (N sampled completions, keep the one a scorer rates highest: a reward
model, any reward function, or the model's own mean token log-prob), and grade the chosen answer.

Sampling is one batched KV-cache generation per batch of problems: ``batch_size`` prompts, each
repeated N times (:func:`gptlab.alignment.rollout.sample_completions`), so N samples cost one
generation over B·N rows, not N generations.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from gptlab.alignment.rollout import response_forward, sample_completions
from gptlab.data.answers import extract_answer, get_grader, normalize_answer
from gptlab.data.prompt_styles import extract_response, left_pad
from gptlab.rewards import call_reward
from gptlab.tokenizer import get_tokenizer

SOLVE_METHODS = ("greedy", "self_consistency", "best_of_n")
"""``greedy``: one completion at temperature 0; ``self_consistency``: majority vote over N samples;
``best_of_n``: the sample a scorer rates highest."""
BEST_OF_N_SCORERS = ("logprob", "reward")
"""What best-of-N ranks by: ``logprob`` (the model's mean log-prob of its completion: no second
model) or ``reward`` (a reward function, e.g. a reward-model checkpoint)."""


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer by its normalised form (:func:`gptlab.data.answers.normalize_answer`),
    ignoring completions without one; ties go to the answer seen first. None when no sample has an answer."""
    keys = [normalize_answer(a) if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    winner = next(k for k in keys if k is not None and counts[k] == best)
    return answers[keys.index(winner)]


@dataclass
class Sampled:
    """N completions of each of B problems: ``texts[b][j]`` the j-th completion (cut at the prompt
    style's stop markers), ``logprob[b][j]`` its mean token log-prob under the model (or None)."""

    texts: list[list[str]]
    logprob: list[list[float]] | None


@torch.no_grad()
def sample_solutions(model: nn.Module, prompt_ids: Sequence[Sequence[int]], n: int, max_new_tokens: int,
                     temperature: float, top_k: int | None = None, top_p: float | None = None,
                     prompt_style: str = "alpaca", with_logprob: bool = False, tokenizer: Any = None
                     ) -> Sampled:
    """``n`` completions of every prompt (token id lists), generated together (B·n rows), stopped at
    ``<|endoftext|>`` (``tokenizer``'s: the model's own, GPT-2's by default); with ``with_logprob`` also
    each completion's mean token log-prob at ``temperature`` (one forward pass over the packed rows)."""
    device = next(model.parameters()).device
    tok = tokenizer or get_tokenizer()
    ids, mask = left_pad(prompt_ids, tok.eot_token)
    sampled = sample_completions(model, ids.to(device), mask.to(device), max_new_tokens, temperature, top_k, top_p,
                                 tok.eot_token, num_generations=n)
    flat = [extract_response(tok.decode(c), prompt_style) for c in sampled.completion_ids()]
    texts = [flat[b * n:(b + 1) * n] for b in range(len(prompt_ids))]
    logprob = None
    if with_logprob:
        was_training = model.training
        model.eval()
        try:
            out = response_forward(model, sampled.sequences, sampled.positions, sampled.tokens, max(temperature, 1e-5))
        finally:
            model.train(was_training)
        scores = (torch.where(sampled.mask, out.logprobs, 0.0).sum(1) / sampled.mask.sum(1).clamp(min=1)).tolist()
        logprob = [scores[b * n:(b + 1) * n] for b in range(len(prompt_ids))]
    return Sampled(texts, logprob)


def solve_problems(model: nn.Module, entries: Sequence[Mapping[str, Any]], prompts: Sequence[str],
                   prompt_ids: Sequence[Sequence[int]], method: str = "greedy", n: int = 1, grader: str = "numeric",
                   max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = None,
                   top_p: float | None = None, prompt_style: str = "alpaca", batch_size: int = 8,
                   scorer: str = "logprob", reward_fn: Callable[..., Any] | None = None,
                   progress: Callable[[int], None] | None = None, tokenizer: Any = None) -> list[dict[str, Any]]:
    """One row per problem: its entry's ``prompt`` and ``answer``, the ``prediction`` (the chosen
    answer, None when there is none), ``correct`` (by ``grader``), and every sample's ``completions`` /
    ``answers`` (and best-of-N's ``scores``).

    ``entries[i]`` holds the reference ``answer``; ``prompts[i]`` / ``prompt_ids[i]`` are its prompt
    in the model's style. ``greedy`` ignores ``n`` and ``temperature``. ``best_of_n`` ranks by
    ``scorer`` (:data:`BEST_OF_N_SCORERS`); ``reward`` calls ``reward_fn`` as GRPO does
    (:func:`gptlab.rewards.call_reward`). ``progress(k)`` is called after each batch of k problems.
    ``tokenizer`` is the model's (pads, stops and decodes with it); None = GPT-2's.
    """
    if method not in SOLVE_METHODS:
        raise ValueError(f"unknown method {method!r}; valid choices: {list(SOLVE_METHODS)}")
    if method == "best_of_n" and scorer == "reward" and reward_fn is None:
        raise ValueError("best_of_n with scorer=reward needs a reward function (reward_checkpoint=<reward model>)")
    grade = get_grader(grader)
    greedy = method == "greedy"
    n, temperature = (1, 0.0) if greedy else (n, temperature)
    rows: list[dict[str, Any]] = []
    tok = tokenizer or get_tokenizer()
    for start in range(0, len(entries), batch_size):
        part = slice(start, start + batch_size)
        sampled = sample_solutions(model, prompt_ids[part], n, max_new_tokens, temperature, top_k, top_p, prompt_style,
                                   with_logprob=method == "best_of_n" and scorer == "logprob", tokenizer=tok)
        for b, entry in enumerate(entries[part]):
            texts = sampled.texts[b]
            answers = [extract_answer(t) for t in texts]
            row: dict[str, Any] = {"prompt": entry.get("prompt", prompts[start + b]), "answer": entry["answer"]}
            if method == "best_of_n":
                if scorer == "logprob":
                    scores = sampled.logprob[b]
                else:
                    p_ids = [list(prompt_ids[start + b])] * n
                    scores = call_reward(reward_fn, prompts=[prompts[start + b]] * n, completions=texts,
                                         prompt_ids=p_ids, completion_ids=tok.encode_ordinary_batch(texts),
                                         entries=[dict(entry)] * n, name=scorer).tolist()
                prediction = answers[max(range(n), key=lambda j: scores[j])]
                row["scores"] = scores
            elif method == "self_consistency":
                prediction = majority_vote(answers)
            else:
                prediction = answers[0]
            row.update(prediction=prediction, correct=grade(prediction, str(entry["answer"])), completions=texts,
                       answers=answers)
            rows.append(row)
        if progress is not None:
            progress(len(entries[part]))
    return rows


def accuracy(rows: Sequence[Mapping[str, Any]]) -> float:
    """Share of rows whose prediction is correct (0 for no rows)."""
    return sum(bool(r["correct"]) for r in rows) / len(rows) if rows else 0.0


__all__ = ["SOLVE_METHODS", "BEST_OF_N_SCORERS", "majority_vote", "Sampled", "sample_solutions", "solve_problems",
           "accuracy"]
