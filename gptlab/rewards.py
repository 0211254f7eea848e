"""Reward functions for RLHF (``task=ppo``): a trained reward model, or rules written in Python.

``task.reward`` is any Hydra ``_target_`` that builds a callable; PPO calls it once per rollout batch
with keyword arguments (TRL's reward-function convention, plus the ids)::

    reward(prompts=[str], completions=[str], prompt_ids=[[int]], completion_ids=[[int]], entries=[dict])
        -> B scores (a list of floats or a (B,) tensor)

``prompts`` are the texts the policy was given (prompt style applied), ``completions`` the decoded
responses without the end-of-text token, ``entries`` the data entries the prompts came from (e.g. a
reference ``output`` for a rule to compare with). Accept ``**kwargs`` for what you do not use::

    # my_rewards.py
    def brevity(completions, **kwargs):
        return [-len(c) / 100 for c in completions]

    gptlab-train task=ppo ... task.reward._target_=my_rewards.brevity +task.reward._partial_=true

The config node is built by Hydra when the run starts, from the run's own config; a checkpoint
never records it (``gptlab.tasks.registry.load_task`` rebuilds a PPO policy without its reward).
:func:`call_reward` calls one and checks what it returns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from gptlab.checks import ConfigRules, Problem, existing_file, integer
from gptlab.data.answers import extract_answer, get_grader
from gptlab.inference import PRECISION_RULE, load_model, right_pad
from gptlab.model.heads import reward_scores
from gptlab.tokenizer import get_tokenizer
from gptlab.weights.checkpoint import checkpoint_file_problems, init_from_problems


class RewardFunction(Protocol):
    """What ``task.reward`` must be: called with keyword arguments, returns one score per response."""

    def __call__(self, *, prompts: list[str], completions: list[str], prompt_ids: list[list[int]],
                 completion_ids: list[list[int]], entries: list[dict[str, Any]]) -> Sequence[float] | torch.Tensor:
        ...


class RewardError(ValueError):
    """A reward function raised, or returned a wrong number of scores or a score that is not finite
    (the message names the function and the sample)."""


def _describe(name: str | None, fn: Callable[..., Any]) -> str:
    what = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    label = f"{module}.{what}" if module else what
    return f"reward function {name!r} ({label})" if name else f"reward function {label}"


def _sample(i: int, prompts: list[str], completions: list[str]) -> str:
    cut = lambda t: repr(t if len(t) <= 80 else t[:80] + "...")  # noqa: E731
    return f"completion {i} (prompt {cut(prompts[i])}, completion {cut(completions[i])})"


def call_reward(reward_fn: Callable[..., Any], *, prompts: list[str], completions: list[str],
                prompt_ids: list[list[int]], completion_ids: list[list[int]],
                entries: list[dict[str, Any]], name: str | None = None) -> torch.Tensor:
    """``reward_fn``'s scores of a batch of completions as a (N,) float32 tensor (on the CPU unless the
    function returned a tensor elsewhere).

    Raises :class:`RewardError` naming the function (``name`` and its class or function) when it
    returns another number of scores than completions, or a score that is NaN or infinite (naming
    the first such sample), or raises (then it is called on one completion at a time to name the
    first sample it fails on). Nothing is trained on a batch whose rewards failed."""
    kwargs = dict(prompts=prompts, completions=completions, prompt_ids=prompt_ids, completion_ids=completion_ids,
                  entries=entries)
    try:
        scores = reward_fn(**kwargs)
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    except Exception as e:  # noqa: BLE001 - the user's code: name it and the sample, keep the cause
        raise RewardError(f"{_describe(name, reward_fn)} raised {type(e).__name__}: {e}"
                          f"{_failing_sample(reward_fn, kwargs)}") from e
    if scores.numel() != len(completions):
        raise RewardError(f"{_describe(name, reward_fn)} returned {scores.numel()} scores for {len(completions)} "
                          "completions (one score per completion)")
    bad = torch.nonzero(~torch.isfinite(scores)).flatten().tolist()
    if bad:
        i = bad[0]
        raise RewardError(f"{_describe(name, reward_fn)} returned {float(scores[i])} for {_sample(i, prompts, completions)}"
                          f"{f' and {len(bad) - 1} more non-finite scores' if len(bad) > 1 else ''}; rewards must "
                          "be finite numbers")
    return scores


def _failing_sample(reward_fn: Callable[..., Any], kwargs: dict[str, list[Any]]) -> str:
    """``" on completion i (...)"`` for the first completion the function fails on alone, else ``""``."""
    for i in range(len(kwargs["completions"])):
        try:
            reward_fn(**{k: v[i:i + 1] for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001
            return " on " + _sample(i, kwargs["prompts"], kwargs["completions"])
    return ""


class TokenCountReward:
    """``weight`` per occurrence of one token in the response: the simplest rule-based reward (a
    test of whether PPO learns at all). ``token``: a token id, or a string that is exactly one
    token of ``tokenizer`` (the run's: ``gpt2`` or a trained tokenizer's folder; e.g. ``" the"``)."""

    def __init__(self, token: int | str, weight: float = 1.0, tokenizer: str | None = "gpt2"):
        if isinstance(token, str):
            ids = get_tokenizer(tokenizer).encode_ordinary(token)
            if len(ids) != 1:
                raise ValueError(f"TokenCountReward token={token!r} is {len(ids)} tokens {ids} of tokenizer "
                                 f"{tokenizer}; give a string that is exactly one token, or its id")
            token = ids[0]
        self.token_id, self.weight = int(token), float(weight)

    def __call__(self, *, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        return [self.weight * ids.count(self.token_id) for ids in completion_ids]


class RegexCountReward:
    """``weight`` per match of the regular expression ``pattern`` in the response text, counting
    at most ``max_count`` matches (None = all); e.g. ``pattern: "(?i)\\bplease\\b"``."""

    def __init__(self, pattern: str, weight: float = 1.0, max_count: int | None = None):
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"RegexCountReward pattern={pattern!r} is not a regular expression: {e}") from None
        self.weight, self.max_count = float(weight), max_count

    def __call__(self, *, completions: list[str], **kwargs: Any) -> list[float]:
        counts = [len(self.pattern.findall(text)) for text in completions]
        if self.max_count is not None:
            counts = [min(c, self.max_count) for c in counts]
        return [self.weight * c for c in counts]


class AnswerReward:
    """1 when the completion's final answer (:func:`gptlab.data.answers.extract_answer`: the last
    ``\\boxed{...}`` or ``Answer:`` line) matches the entry's reference ``answer`` by ``grader``
    (``numeric`` | ``exact``), else 0; a completion without an answer scores 0. The verifiable reward
    of ``data=problems``."""

    def __init__(self, grader: str = "numeric"):
        self.grade = get_grader(grader)

    def __call__(self, *, completions: list[str], entries: list[dict[str, Any]], **kwargs: Any) -> list[float]:
        scores = []
        for i, (text, entry) in enumerate(zip(completions, entries)):
            if "answer" not in entry:
                raise ValueError(f"entry of completion {i} has no 'answer' (keys: {sorted(entry)}); AnswerReward "
                                 "needs problems with answers (data=problems)")
            scores.append(float(self.grade(extract_answer(text), str(entry["answer"]))))
        return scores


class FormatReward:
    """1 when the completion states a final answer the graders can read (a ``\\boxed{...}`` or an
    ``Answer:`` line), else 0: the format reward of reasoning-from-scratch ch. 7 and TRL's examples."""

    def __call__(self, *, completions: list[str], **kwargs: Any) -> list[float]:
        return [float(extract_answer(text) is not None) for text in completions]


class RewardModel(ConfigRules):
    """A trained reward model (``task=reward_model``) as a reward function: each response is scored
    at the last token of ``prompt ids + response ids`` (no end-of-text), exactly as the reward model
    was trained on preference pairs. Loaded by the one inference loader
    (:func:`gptlab.inference.load_model` with ``expect="reward"``), so a language model or a
    classifier given here is a clear error.

    Args:
        ckpt_path: the reward model's checkpoint; or
        init_from + adapter_path: its base weights and its LoRA adapter file (which holds the head).
        precision: ``32`` | ``bf16`` | ``bf16-mixed`` | ``auto`` (as the loader's).
        batch_size: sequences per forward pass (None = the whole rollout batch at once).
        max_length: keep the first N tokens of each sequence (None = the reward model's context).

    The model is loaded on the CPU; PPO moves it to the policy's device (:meth:`to`). Its recorded
    ``prompt_style`` is checked against the prompts' style by the task.
    """

    RULES = {"adapter_path": existing_file(), "precision": PRECISION_RULE, "batch_size": integer(ge=1, optional=True),
             "max_length": integer(ge=1, optional=True)}
    MISSING = ("a task=reward_model checkpoint (reward_checkpoint=<path> with experiment=ch08_ppo / ch08_ppo_scratch, "
               "else task.reward.ckpt_path=<path>), or init_from=<its base> with adapter_path=<its adapter file>")

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        """The reward model's source: a checkpoint or base weights that can be read, before anything is loaded."""
        ckpt, init = node.get("ckpt_path"), node.get("init_from")
        if ckpt is None and init is None:
            return [Problem(f"{{node}}ckpt_path=None, {{node}}init_from=None: expected the reward model: {cls.MISSING}",
                            f"the reward model needs {cls.MISSING}")]
        found = checkpoint_file_problems("ckpt_path", ckpt) + init_from_problems("init_from", init)
        return super().check_relations(node) + found

    def __init__(self, ckpt_path: str | Path | None = None, init_from: str | Path | None = None,
                 adapter_path: str | Path | None = None, precision: str = "32", batch_size: int | None = None,
                 max_length: int | None = None):
        if ckpt_path is None and init_from is None:
            raise ValueError(f"the reward model needs {self.MISSING}")
        self.loaded = load_model(ckpt_path=ckpt_path, init_from=init_from, adapter_path=adapter_path,
                                 expect="reward", precision=precision)
        self.model = self.loaded.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.prompt_style = self.loaded.prompt_style
        self.tokenizer = self.loaded.tokenizer  # PPO checks it is the policy's: the model reads the policy's ids
        self.batch_size = batch_size
        context = self.model.config.context_length
        self.max_length = min(max_length or context, context)

    def to(self, device: torch.device | str) -> "RewardModel":
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, *, prompt_ids: list[list[int]], completion_ids: list[list[int]], **kwargs: Any) -> torch.Tensor:
        rows = [(p + c)[: self.max_length] for p, c in zip(prompt_ids, completion_ids)]
        step = self.batch_size or max(1, len(rows))
        scores = []
        for start in range(0, len(rows), step):
            # right padding with id 0: causal attention keeps it out of the last real token's score
            ids, mask = right_pad(rows[start:start + step], 0, self.device)  # (b, T)
            with self.loaded.autocast():
                scores.append(reward_scores(self.model, ids, mask).float())
        return torch.cat(scores)


__all__ = ["RewardFunction", "RewardError", "call_reward", "TokenCountReward", "RegexCountReward", "AnswerReward",
           "FormatReward", "RewardModel"]
