"""Problems with verifiable answers, for RL with verifiable rewards (``task=grpo``) and for
``gptlab-solve``: a seeded generator of arithmetic and word problems, and user JSON / JSON-lines files
of ``{"prompt", "answer"}`` entries.

Generated problems. Arithmetic over operands of ``min_digits``..``max_digits`` digits with the chosen
``operators`` (``+ - *``; subtraction never goes below 0), and with probability ``word_problems``
one of a few word-problem templates (the same operations in a sentence). With ``spaced_digits``
numbers are written one digit per token (``4 6``): GPT-2's BPE merges digit runs into tokens a small
model can only memorise (``/work/shared/ALIGNMENT.md`` 4b). Every problem carries a worked
``solution`` ending in an ``Answer:`` line (the SFT examples of ``experiment=rlvr_arith_scratch``).
The test problems are drawn first from their own seeded stream; training problems never repeat
one (nor each other), so the test set stays the same whatever the number of training problems.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from gptlab.checks import Predicate, Problem, boolean, integer, number, problem, strings
from gptlab.data.answers import GRADERS
from gptlab.data.prompts import PromptDataModule, PromptDataError
from gptlab.data.records import read_json_records

OPERATORS = ("+", "-", "*")
_NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana")
_ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps")
_MAX_DRAWS_PER_PROBLEM = 50


class ProblemDataError(PromptDataError):
    """A malformed problem file or entry (the message names the file and the entry)."""


def write_number(n: int, spaced: bool) -> str:
    """``n`` in digits, one digit per token (``- 1 2``) when ``spaced``."""
    if not spaced:
        return str(n)
    return ("- " if n < 0 else "") + " ".join(str(abs(n)))


def _operands(rng: random.Random, min_digits: int, max_digits: int, op: str) -> tuple[int, int]:
    def draw() -> int:
        d = rng.randint(min_digits, max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)

    a, b = draw(), draw()
    if op == "-" and b > a:
        a, b = b, a
    return a, b


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_problem(rng: random.Random, min_digits: int = 1, max_digits: int = 2, operators: Sequence[str] = ("+", "-"),
                 word_problems: float = 0.0, spaced_digits: bool = True) -> dict[str, str]:
    """One problem ``{"prompt", "answer", "solution"}`` drawn with ``rng`` (module docstring)."""
    op = rng.choice(list(operators))
    a, b = _operands(rng, min_digits, max_digits, op)
    result = _apply(a, op, b)
    w = lambda n: write_number(n, spaced_digits)  # noqa: E731 - local shorthand
    equation = f"{w(a)} {op} {w(b)} = {w(result)}"
    if word_problems and rng.random() < word_problems:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        prompt = {"+": f"{name} has {w(a)} {item} and gets {w(b)} more. How many {item} does {name} have now?",
                  "-": f"{name} has {w(a)} {item} and gives away {w(b)}. How many {item} are left?",
                  "*": f"{name} has {w(a)} boxes of {w(b)} {item} each. How many {item} is that in all?"}[op]
    else:
        prompt = f"What is {w(a)} {op} {w(b)}?"
    return {"prompt": prompt, "answer": str(result), "solution": f"{equation}\nAnswer: {w(result)}"}


def generate_problems(n: int, seed: int = 0, exclude: Iterable[str] = (), **settings: Any) -> list[dict[str, str]]:
    """``n`` different problems (:func:`make_problem` with ``settings``) drawn from ``random.Random(seed)``,
    none of whose prompt is in ``exclude``. Raises ValueError when the settings cannot give that many."""
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[dict[str, str]] = []
    for _ in range(n * _MAX_DRAWS_PER_PROBLEM + 100):
        if len(out) == n:
            break
        p = make_problem(rng, **settings)
        if p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    if len(out) < n:
        raise ValueError(f"only {len(out)} different problems found for {n} requested with {settings}; widen the "
                         "digit range, add operators or word problems, or ask for fewer")
    return out


def split_problems(num_train: int, num_test: int, seed: int = 0, num_val: int = 0, **settings: Any
                   ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(train, val, test) generated problems that share none: the test set from seed ``seed`` alone
    (the same for any ``num_train`` / ``num_val``), the validation set from a second stream without
    the test prompts, the training set from a third without either."""
    test = generate_problems(num_test, seed=seed, **settings)
    seen = {p["prompt"] for p in test}
    val = generate_problems(num_val, seed=seed + 2_000_003, exclude=seen, **settings) if num_val else []
    seen |= {p["prompt"] for p in val}
    train = generate_problems(num_train, seed=seed + 1_000_003, exclude=seen, **settings)
    return train, val, test


def load_problems(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a JSON / JSON-lines problem file, each ``{"prompt": str, "answer": str | number, ...}``
    (other keys kept; a number answer becomes its text). Errors name the file and the entry (and line)."""
    records = read_json_records(path, "problem data", ProblemDataError)
    out = []
    for i, entry in enumerate(records.entries):
        where = records.where(i)
        if not isinstance(entry, dict):
            raise ProblemDataError(f"{where} must be an object with 'prompt' and 'answer', got {type(entry).__name__}")
        if "answer" not in entry:
            raise ProblemDataError(f"{where} has no 'answer' (keys: {sorted(entry)}); every problem needs the answer "
                                   "its completions are graded against")
        answer = entry["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise ProblemDataError(f"{where}: 'answer' must be a non-empty string or a number, got {answer!r}")
        if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ProblemDataError(f"{where} needs a non-empty string 'prompt' (keys: {sorted(entry)})")
        out.append({**entry, "instruction": entry["prompt"], "input": "", "answer": str(answer)})
    return out


def sft_examples(problems: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Instruction-data entries (``data=instruct``) that teach the worked solutions: instruction = prompt,
    output = solution."""
    return [{"instruction": p["prompt"], "input": "", "output": p["solution"]} for p in problems]


def write_problem_files(out_dir: str | Path, num_train: int, num_test: int, seed: int = 0,
                        num_sft: int | None = None, num_val: int = 0, **settings: Any) -> dict[str, Path]:
    """Generate and write ``train.jsonl`` / ``test.jsonl`` (and ``val.jsonl`` when ``num_val``;
    ``{"prompt", "answer", "solution"}``) and ``sft.json`` (the first ``num_sft`` training problems as
    instruction data) into ``out_dir``."""
    train, val, test = split_problems(num_train, num_test, seed, num_val, **settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"train": train, "test": test, **({"val": val} if num_val else {})}
    paths = {name: out / f"{name}.jsonl" for name in parts} | {"sft": out / "sft.json"}
    for name, rows in parts.items():
        paths[name].write_text("".join(json.dumps(p) + "\n" for p in rows), encoding="utf-8")
    paths["sft"].write_text(json.dumps(sft_examples(train[:num_sft]), indent=1) + "\n", encoding="utf-8")
    return paths


class ProblemDataModule(PromptDataModule):
    """Problems as GRPO prompts: batches as :class:`~gptlab.data.prompts.PromptDataModule`'s
    (left-padded ``prompt_ids``, ``entries`` holding each problem's ``answer`` for the reward).

    Args:
        path: a JSON / JSON-lines file of ``{"prompt", "answer"}`` (split by ``train_ratio`` /
            ``test_ratio`` like any record file); None = generated problems:
        num_train, num_val, num_test: how many generated training, validation and test problems (they
            share none; the validation ones are graded greedily during training, ``val/...``);
        seed: the generator's seed (the same seed gives the same problems);
        min_digits, max_digits, operators, word_problems, spaced_digits: what the problems look like
            (:func:`make_problem`).
        grader: ``numeric`` | ``exact``: how answers are compared (read by the rewards and gptlab-solve).
        **kwargs: :class:`PromptDataModule` arguments (batch size, prompt style, ...).
    """

    what, unit, default_path = "problems", "problems", None
    RULES = {"num_train": integer(ge=1), "num_val": integer(ge=0), "num_test": integer(ge=0), "seed": integer(),
             "min_digits": integer(ge=1), "max_digits": integer(ge=1), "operators": strings(OPERATORS, nonempty=True),
             "word_problems": number(ge=0, le=1), "spaced_digits": boolean(),
             "grader": Predicate(lambda v: v in GRADERS, f"one of {sorted(GRADERS)}")}

    @classmethod
    def check_relations(cls, node: Any) -> list[Problem]:
        found = super().check_relations(node)
        lo, hi = node.get("min_digits"), node.get("max_digits")
        if isinstance(lo, int) and isinstance(hi, int) and hi < lo:
            found.append(problem("max_digits", hi, f"a number >= {{node}}min_digits={lo}",
                                 f"max_digits={hi} must be >= min_digits={lo}"))
        return found

    def __init__(self, num_train: int = 2000, num_test: int = 200, num_val: int = 0, seed: int = 0,
                 min_digits: int = 1, max_digits: int = 2, operators: Sequence[str] = ("+", "-"),
                 word_problems: float = 0.0, spaced_digits: bool = True, grader: str = "numeric", **kwargs: Any):
        super().__init__(**kwargs)
        self.grader = grader

    @property
    def generator_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"min_digits": hp.min_digits, "max_digits": hp.max_digits, "operators": tuple(hp.operators),
                "word_problems": hp.word_problems, "spaced_digits": hp.spaced_digits}

    def load_entries(self) -> list[dict[str, Any]]:
        return load_problems(self.path)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or self.path is not None:
            return super().setup(stage)
        hp = self.hparams
        parts = split_problems(hp.num_train, hp.num_test, hp.seed, hp.num_val, **self.generator_settings)
        self.train_set, self.val_set, self.test_set = (
            self.make_dataset([{**p, "instruction": p["prompt"], "input": ""} for p in part]) for part in parts)
        self.after_split(f", seed {hp.seed}")


__all__ = ["OPERATORS", "ProblemDataError", "write_number", "make_problem", "generate_problems", "split_problems",
           "load_problems", "sft_examples", "write_problem_files", "ProblemDataModule"]
