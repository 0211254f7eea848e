"""Final answers in model output, and graders that compare them with a reference: what verifiable
rewards (``task=grpo``), self-consistency voting and problem-set accuracy (``gptlab-solve``) read.

An answer is the content of the last ``\\boxed{...}`` in the text (nested braces allowed), else the
rest of the last line that starts with ``Answer:`` (case-insensitive); a text holding neither has
no answer (``None``), which every grader scores 0 (reasoning-from-scratch: no ``\\boxed{}`` -> 0).
"""

from __future__ import annotations

import math
import re
from typing import Callable

_ANSWER_LINE = re.compile(r"^[ \t]*answer[ \t]*:[ \t]*(.*?)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_DIGIT_GAP = re.compile(r"(?<=[\d.,\-]) +(?=[\d.,])")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed: no answer


def extract_answer(text: str) -> str | None:
    """The final answer in ``text`` (module docstring), stripped; None when there is none (or it is empty)."""
    found = _last_boxed(text)
    if found is None:
        lines = _ANSWER_LINE.findall(text)
        found = lines[-1] if lines else None
    if found is None:
        return None
    found = found.strip()
    return found or None


def normalize_answer(answer: str) -> str:
    """An answer as graders compare it: surrounding whitespace, ``$`` and a final ``.`` dropped,
    inner whitespace collapsed, and digits written one per token (``4 6``, ``- 1 2``) joined (``46``, ``-12``)."""
    s = answer.strip().strip("$").strip()
    s = s[:-1].rstrip() if s.endswith(".") else s
    s = " ".join(s.split())
    s = re.sub(r"^- (?=\d)", "-", s)
    return _DIGIT_GAP.sub("", s)


def parse_number(answer: str) -> float | None:
    """The number an answer states (thousands separators allowed), or None when it is not one number."""
    s = normalize_answer(answer).replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def grade_exact(predicted: str | None, reference: str) -> bool:
    """True when the normalised answers are the same string (:func:`normalize_answer`)."""
    return predicted is not None and normalize_answer(predicted) == normalize_answer(str(reference))


def grade_numeric(predicted: str | None, reference: str, rel_tol: float = 1e-6) -> bool:
    """True when both answers are numbers equal within ``rel_tol`` (``92`` = ``92.0`` = ``9 2``);
    otherwise the exact comparison (a reference that is not a number)."""
    if predicted is None:
        return False
    ref = parse_number(str(reference))
    if ref is None:
        return grade_exact(predicted, reference)
    got = parse_number(predicted)
    return got is not None and math.isclose(got, ref, rel_tol=rel_tol, abs_tol=rel_tol)


GRADERS: dict[str, Callable[[str | None, str], bool]] = {"exact": grade_exact, "numeric": grade_numeric}
"""Grader name -> ``grade(predicted answer or None, reference) -> bool``."""


def get_grader(name: str) -> Callable[[str | None, str], bool]:
    """The grader called ``name`` (:data:`GRADERS`)."""
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; valid choices: {sorted(GRADERS)}")
    return GRADERS[name]


__all__ = ["extract_answer", "normalize_answer", "parse_number", "grade_exact", "grade_numeric", "GRADERS",
           "get_grader"]
