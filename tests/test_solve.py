"""gptlab-solve and gptlab.solving: majority votes, best-of-N choices and grading on canned samples;
batched sampling of N completions per problem; the tool end to end on a tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gptlab.solving as solving
from gptlab.cli import solve
from gptlab.data.problems import generate_problems
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.solving import Sampled, accuracy, majority_vote, sample_solutions, solve_problems
from gptlab.tasks.pretrain import PretrainTask

ENTRIES = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 + 4?", "answer": "7"}]
CANNED = [["Answer: 5", "Answer: 4", "so \\boxed{4}", "no answer"],          # majority 4 (2 votes), logprob best: 5
          ["Answer: 7", "Answer: 8", "Answer: 8", "Answer: 7"]]             # tie 7 / 8: the first seen (7) wins
LOGPROBS = [[-0.1, -0.5, -0.9, -0.2], [-0.3, -0.1, -0.4, -0.8]]


def test_majority_vote_counts_normalised_answers_and_ignores_missing_ones():
    assert majority_vote(["1 2", "12", "13", None]) == "1 2"
    assert majority_vote(["8", "7", "7", "8"]) == "8"  # a tie goes to the answer seen first
    assert majority_vote([None, None]) is None


@pytest.fixture
def canned(monkeypatch):
    calls = []

    def fake(model, prompt_ids, n, max_new_tokens, temperature, top_k, top_p, style, with_logprob=False, tokenizer=None):
        calls.append((n, temperature, with_logprob))
        return Sampled([CANNED[i][:n] for i in range(len(prompt_ids))],
                       [LOGPROBS[i][:n] for i in range(len(prompt_ids))] if with_logprob else None)

    monkeypatch.setattr(solving, "sample_solutions", fake)
    return calls


@pytest.mark.parametrize("method, predictions, correct", [
    ("greedy", ["5", "7"], [False, True]),
    ("self_consistency", ["4", "7"], [True, True]),
    ("best_of_n", ["5", "8"], [False, False]),        # the highest mean log-prob: confident, and wrong
])
def test_each_method_chooses_its_answer_and_grades_it(canned, method, predictions, correct):
    rows = solve_problems(None, ENTRIES, [e["prompt"] for e in ENTRIES], [[1], [2]], method, n=4)
    assert [r["prediction"] for r in rows] == predictions and [r["correct"] for r in rows] == correct
    assert accuracy(rows) == sum(correct) / 2
    assert canned[0] == ((1, 0.0, False) if method == "greedy" else (4, 0.8, method == "best_of_n"))
    if method == "best_of_n":
        assert rows[0]["scores"] == LOGPROBS[0]


def test_best_of_n_can_rank_by_a_reward_function(canned):
    def prefers_short(*, completions, **kwargs):
        return [-len(c) for c in completions]

    rows = solve_problems(None, ENTRIES, ["a", "b"], [[1], [2]], "best_of_n", n=4, scorer="reward",
                          reward_fn=prefers_short)
    assert [r["prediction"] for r in rows] == ["5", "7"]
    with pytest.raises(ValueError, match="needs a reward function"):
        solve_problems(None, ENTRIES, ["a", "b"], [[1], [2]], "best_of_n", scorer="reward")


def test_n_samples_of_every_problem_come_from_one_batched_generation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0))
    prompts = [[464, 318, 362], [1212, 10]]
    out = sample_solutions(model.eval(), prompts, 3, 5, 1.0, prompt_style="raw", with_logprob=True)
    assert [len(t) for t in out.texts] == [3, 3] and all(-20 < lp < 0 for row in out.logprob for lp in row)
    greedy = sample_solutions(model, prompts, 2, 5, 0.0, prompt_style="raw")
    assert greedy.texts[0][0] == greedy.texts[0][1]  # temperature 0: the samples are the greedy answer


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    task = PretrainTask(model=dict(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_layers=1,
                                   drop_rate=0.0), sample_prompt=None)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    path = tmp_path_factory.mktemp("lm") / "lm.ckpt"
    torch.save(ckpt, path)
    return path


def test_the_tool_writes_one_line_per_problem_and_the_accuracy(tiny_lm, tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"prompt": p["prompt"], "answer": p["answer"]}) + "\n"
                                for p in generate_problems(6, seed=1)))
    code, out, err = run_entry(solve.main, "gptlab-solve", f"ckpt_path={tiny_lm}", f"data.path={problems}",
                               "data.train_ratio=0.5", "data.test_ratio=0.5", "data.batch_size=1",
                               "method=self_consistency", "n=3", "max_new_tokens=4", "output=out/sc.jsonl",
                               "progress=false")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out/sc.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "out/sc.jsonl.summary.json").read_text())
    assert len(rows) == 3 and all(len(r["completions"]) == 3 and "correct" in r for r in rows)
    assert summary["problems"] == 3 and summary["n"] == 3 and summary["accuracy"] == accuracy(rows)
    assert "accuracy" in out


@pytest.mark.parametrize("args, expected", [
    (["method=vote"], "method='vote'"),
    (["n=0"], "n=0: expected an integer >= 1"),
    (["method=best_of_n", "scorer=reward"], "scorer='reward' with reward_checkpoint=None"),
    (["method=self_consistency", "temperature=0"], "temperature=0 with method=self_consistency"),
    (["data.max_digits=0"], "data.max_digits=0"),
])
def test_bad_settings_are_refused_before_anything_is_loaded(args, expected, tiny_lm, tmp_path, monkeypatch, run_entry):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_entry(solve.main, "gptlab-solve", f"ckpt_path={tiny_lm}", "output=o.jsonl", *args)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "o.jsonl").exists()
