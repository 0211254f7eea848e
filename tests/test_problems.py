"""data=problems: the seeded problem generator, problem files, answer extraction and graders."""

from __future__ import annotations

import json

import pytest

from gptlab.data.answers import extract_answer, grade_exact, grade_numeric, normalize_answer, parse_number
from gptlab.data.problems import (ProblemDataError, ProblemDataModule, generate_problems, load_problems, split_problems,
                                  write_problem_files)


@pytest.mark.parametrize("text, answer", [
    ("so the sum is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),       # the last box, nested braces
    ("4 + 5 = 9\nAnswer: 9", "9"),
    ("answer: 3\nwait\n  ANSWER:  1 2 ", "1 2"),                     # the last Answer line
    ("Answer: 7 and \\boxed{8}", "8"),                               # a box wins over a line
])
def test_the_final_answer_is_extracted(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text", ["the answer is 9", "Answer:   ", "\\boxed{12", "", "Final answer 3"])
def test_text_without_an_answer_has_none_and_scores_zero(text):
    assert extract_answer(text) is None
    assert not grade_numeric(extract_answer(text), "9") and not grade_exact(extract_answer(text), "9")


def test_graders_compare_normalised_answers():
    assert normalize_answer(" 1 2 3. ") == "123" and normalize_answer("- 4 5") == "-45"
    assert parse_number("1,234") == 1234 and parse_number("12 apples") is None and parse_number("nan") is None
    assert grade_numeric("9 2", "92") and grade_numeric("92.0", "92") and not grade_numeric("93", "92")
    assert grade_exact("9 2", "92") and not grade_exact("92.0", "92")
    assert grade_numeric("Paris", "paris") is False and grade_numeric("Paris", "Paris")  # not numbers: exact


def _value(problem):
    left, right = problem["solution"].split("\n")[0].split(" = ")
    a, op, b = (t.replace(" ", "") for t in left.replace(" + ", "|+|").replace(" - ", "|-|").replace(" * ", "|*|").split("|"))
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op], right.replace(" ", "")


def test_generated_problems_are_seeded_correct_and_never_shared_between_train_and_test():
    settings = dict(min_digits=1, max_digits=2, operators=("+", "-", "*"), word_problems=0.5)
    train, val, test = split_problems(300, 100, seed=7, **settings)
    assert val == []
    assert (train, val, test) == split_problems(300, 100, seed=7, **settings)
    assert split_problems(300, 100, seed=8, **settings)[2] != test
    assert split_problems(50, 100, seed=7, **settings)[2] == test           # the test set ignores num_train ...
    train3, val3, test3 = split_problems(300, 100, seed=7, num_val=40, **settings)
    assert test3 == test and len(val3) == 40                                 # ... and num_val
    prompts = [{p["prompt"] for p in part} for part in (train3, val3, test3)]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    prompts_train, prompts_test = {p["prompt"] for p in train}, {p["prompt"] for p in test}
    assert len(prompts_train) == 300 and len(prompts_test) == 100 and not prompts_train & prompts_test
    for p in train + test:
        value, written = _value(p)
        assert value == int(p["answer"]) == int(written) and value >= 0
        assert extract_answer(p["solution"]) is not None and grade_numeric(extract_answer(p["solution"]), p["answer"])
    assert any(p["prompt"].startswith("What is") for p in train) and any("How many" in p["prompt"] for p in train)


def test_digits_are_written_one_per_token_unless_asked_otherwise():
    spaced = generate_problems(20, seed=0, min_digits=3, max_digits=3)
    assert all(len(p["prompt"].split("What is ")[1].split(" + ")[0].split(" - ")[0].split()) == 3 for p in spaced)
    plain = generate_problems(20, seed=0, min_digits=3, max_digits=3, spaced_digits=False)
    assert all(p["prompt"].split()[2].isdigit() and len(p["prompt"].split()[2]) == 3 for p in plain)


def test_asking_for_more_problems_than_exist_is_a_clear_error():
    with pytest.raises(ValueError, match="only 100 different problems"):
        generate_problems(101, min_digits=1, max_digits=1, operators=("+",))


def test_a_problem_file_without_an_answer_names_the_file_and_the_entry(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": 2}\n\n{"prompt": "2+2?"}\n')
    with pytest.raises(ProblemDataError, match=r"p.jsonl: entry 1 \(line 3\) has no 'answer'"):
        load_problems(path)
    path.write_text('{"prompt": "1+1?", "answer": 2}\n{"prompt": "2+2?", "answer": 4\n')
    with pytest.raises(ProblemDataError, match=r"p.jsonl: invalid JSON at line 2"):
        load_problems(path)
    path.write_text('{"prompt": "1+1?", "answer": null}\n')
    with pytest.raises(ProblemDataError, match=r"entry 0 \(line 1\): 'answer' must be a non-empty string or a number"):
        load_problems(path)


def test_problem_files_load_as_prompts_with_their_answers(tmp_path):
    paths = write_problem_files(tmp_path, 30, 10, seed=3, num_sft=5)
    sft = json.loads(paths["sft"].read_text())
    assert len(sft) == 5 and sft[0]["output"].endswith("Answer: " + " ".join(load_problems(paths["train"])[0]["answer"]))
    dm = ProblemDataModule(path=str(paths["test"]), train_ratio=0.8, test_ratio=0.2, batch_size=4, prompt_style="raw")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_ids"].shape[0] == 4 and all(isinstance(e["answer"], str) for e in batch["entries"])
    assert batch["prompts"][0] in {p["prompt"] for p in load_problems(paths["test"])}


def test_the_generated_data_module_serves_train_and_test_problems():
    dm = ProblemDataModule(num_train=40, num_test=8, batch_size=4, prompt_style="raw")
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (40, 8)
    assert not {e["prompt"] for e in dm.train_set.entries} & {e["prompt"] for e in dm.test_set.entries}
    problems = ProblemDataModule.check_config({"min_digits": 3, "max_digits": 2, "operators": ["/"], "grader": "x"})
    assert len(problems) == 3 and "max_digits=2 must be >= min_digits=3" in str(problems[-1])
