"""Rules for config values, stated once, beside the class that owns the value.

A class that takes a config node (``GPTConfig``, the LoRA settings, a task, a data module, ...)
keeps a table of its keys' rules and checks a node without building anything::

    RULES = {"beta": number(gt=0), "loss_type": choice("sigmoid", "ipo", "hinge")}
    problems = check_node(node, RULES)        # -> [Problem, ...], empty when the node is valid

The same problems serve two readers. The command-line pre-flight lists every one at once, each as
``task.beta=0: expected a number > 0`` (:meth:`Problem.at` puts the node's path in front of the
key); a constructor raises them as one :class:`~gptlab.errors.ConfigError` in sentences a Python
caller reads (``beta=0 must be > 0``, ``unknown loss_type 'kto'; valid choices: [...]``;
:func:`raise_problems`). Keys a node does not hold are not checked: the class's own defaults apply.

A check is a callable ``check(value) -> None | <what is allowed>``, so a plain function works too.
"""

from __future__ import annotations

import codecs
import difflib
import glob
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from gptlab.errors import ConfigError

ABSENT = object()
"""What :func:`lookup` returns for a key the node does not hold."""


def show(value: Any) -> str:
    """A value as messages write it: ``repr``, and ``''`` for the empty string."""
    return repr(value) if not isinstance(value, str) or value else "''"


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class Problem:
    """One invalid value. ``text`` is the pre-flight line, its keys written relative to the node
    that owns them as ``{node}key``; ``sentence`` the same problem for a Python caller."""

    text: str
    sentence: str

    def at(self, node: str = "") -> str:
        """The pre-flight line with the node's path (``"task."``) in front of its keys."""
        return self.text.replace("{node}", node)

    def __str__(self) -> str:
        return self.sentence


def problem(key: str, value: Any, expected: str, sentence: str | None = None) -> Problem:
    """A problem with ``key=value: expected <expected>`` (``sentence``: the API wording, if other)."""
    return Problem(f"{{node}}{key}={show(value)}: expected {expected}", sentence or f"{key}={show(value)}: expected "
                                                                                   f"{expected}")


def require(key: str, value: Any, check: "Check") -> None:
    """Raise a :class:`ConfigError` with ``check``'s sentence unless ``value`` passes it."""
    found = check.problem(key, value)
    if found is not None:
        raise ConfigError(found.sentence)


def raise_problems(problems: Sequence[Problem], what: str = "setting") -> None:
    """Raise one :class:`ConfigError` holding every problem's sentence (nothing when there are none)."""
    if not problems:
        return
    if len(problems) == 1:
        raise ConfigError(problems[0].sentence)
    raise ConfigError(f"{len(problems)} invalid {what}s:\n  " + "\n  ".join(p.sentence for p in problems))


# ----------------------------------------------------------------------------- checks
class Check:
    """A rule for one value: ``allowed`` says what is valid; ``name`` (optional) is how a Python
    caller's message names the key (``task.weight_decay_on``) when not by its table key."""

    allowed: str = "a valid value"

    def __init__(self, name: str | None = None, why: str | None = None):
        self.name, self.why = name, why

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def __call__(self, value: Any) -> str | None:
        return None if self.ok(value) else self.allowed

    def sentence(self, name: str, value: Any) -> str:
        return f"{name}={show(value)}: expected {self.allowed}"

    def problem(self, key: str, value: Any) -> Problem | None:
        if self.ok(value):
            return None
        why = f": {self.why}" if self.why else ""
        return problem(key, value, self.allowed + why, self.sentence(self.name or key, value) + why)


class Number(Check):
    """A finite number (an integer when ``integer``) within bounds; None too when ``optional``."""

    def __init__(self, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
                 le: float | None = None, integer: bool = False, optional: bool = False, note: str | None = None,
                 name: str | None = None, why: str | None = None):
        super().__init__(name, why)
        self.gt, self.ge, self.lt, self.le, self.integer, self.optional = gt, ge, lt, le, integer, optional
        bounds = [f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
        if len(bounds) == 2 and ge is not None and lt is not None:
            bounds = [f"in [{ge:g}, {lt:g})"]
        elif len(bounds) == 2 and gt is not None and le is not None:
            bounds = [f"in ({gt:g}, {le:g}]"]
        elif len(bounds) == 2 and ge is not None and le is not None:
            bounds = [f"in [{ge:g}, {le:g}]"]
        self.bounds = " and ".join(bounds)
        self.allowed = f"{'an integer' if integer else 'a number'}{' ' + self.bounds if bounds else ''}" + \
            (" or null" if optional else "") + (f" ({note})" if note else "")

    def kind_ok(self, v: Any) -> bool:
        return is_int(v) if self.integer else is_number(v)

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.optional
        return self.kind_ok(v) and (self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge) \
            and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le)

    def sentence(self, name: str, value: Any) -> str:
        if value is not None and self.kind_ok(value) and self.bounds:
            return f"{name}={show(value)} must be {self.bounds}"
        return f"{name}={show(value)} must be {self.allowed}"


class Choice(Check):
    """One of ``options`` (compared with their types: ``true`` is not the choice ``1``)."""

    def __init__(self, *options: Any, optional: bool = False, name: str | None = None):
        super().__init__(name)
        self.options, self.optional = options, optional
        self.allowed = f"one of {list(options)}" + (" or null" if optional else "")

    def ok(self, v: Any) -> bool:
        if v is None and self.optional:
            return True
        return any(v == o and type(v) is type(o) for o in self.options)

    def sentence(self, name: str, value: Any) -> str:
        return f"unknown {name} {show(value)}; valid choices: {list(self.options)}"


class Predicate(Check):
    """Valid when ``test(value)`` is true; ``allowed`` says what that means."""

    def __init__(self, test: Callable[[Any], bool], allowed: str, name: str | None = None):
        super().__init__(name)
        self.test, self.allowed = test, allowed

    def ok(self, v: Any) -> bool:
        return bool(self.test(v))


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
           integer: bool = False, optional: bool = False, note: str | None = None, name: str | None = None,
           why: str | None = None) -> Number:
    """A number (an integer when ``integer``) within the given bounds; None too when ``optional``.
    ``note`` qualifies what is allowed; ``why`` follows every message about the value."""
    return Number(gt=gt, ge=ge, lt=lt, le=le, integer=integer, optional=optional, note=note, name=name, why=why)


def integer(**bounds: Any) -> Number:
    return number(integer=True, **bounds)


def choice(*options: Any, optional: bool = False, name: str | None = None) -> Choice:
    return Choice(*options, optional=optional, name=name)


def boolean(optional: bool = False) -> Choice:
    return Choice(True, False, optional=optional)


def text(nonempty: bool = True, optional: bool = False) -> Predicate:
    allowed = ("a non-empty string" if nonempty else "a string") + (" or null" if optional else "")
    return Predicate(lambda v: (v is None and optional) or (isinstance(v, str) and bool(v.strip() or not nonempty)),
                     allowed)


def strings(subset_of: Sequence[str] | None = None, nonempty: bool = False, optional: bool = False,
            unique: bool = False) -> Predicate:
    """A list of strings (each one of ``subset_of`` when given)."""
    allowed = ("a non-empty list" if nonempty else "a list") + \
        (f" of {list(subset_of)}" if subset_of else " of strings") + (" without duplicates" if unique else "") + \
        (" or null" if optional else "")

    def test(v: Any) -> bool:
        if v is None and optional:
            return True
        return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) and bool(v or not nonempty) \
            and (not subset_of or set(v) <= set(subset_of)) and (not unique or len(set(v)) == len(v))
    return Predicate(test, allowed)


def _encoding_known(v: Any) -> bool:
    try:
        codecs.lookup(v)
    except (LookupError, TypeError):
        return False
    return True


def encoding() -> Predicate:
    """A text encoding Python knows."""
    return Predicate(_encoding_known, "a text encoding Python knows (utf-8, latin-1, cp1252, ...)")


def existing_paths(v: Any) -> str | None:
    """A file or folder that exists, a glob that matches something, or a list of those; or null."""
    if v is None:
        return None
    for item in v if isinstance(v, (list, tuple)) else [v]:
        if not isinstance(item, str):
            return "a path (or a list of paths) or null"
        path = os.path.expanduser(item)
        if any(c in item for c in "*?["):
            if not glob.glob(path, recursive=True):
                return f"a path that exists (the glob {item!r} matches nothing; cwd: {os.getcwd()})"
        elif not os.path.exists(path):
            return f"a path that exists ({item!r} does not; cwd: {os.getcwd()})"
    return None


def existing_file(dash_is_stdin: bool = False) -> Callable[[Any], str | None]:
    """A file that exists (``-`` too when ``dash_is_stdin``) or null."""
    def check(v: Any) -> str | None:
        if v is None or (dash_is_stdin and v == "-"):
            return None
        if isinstance(v, str) and Path(v).expanduser().is_file():
            return None
        return f"a file that exists{' (or - for stdin)' if dash_is_stdin else ''} or null (cwd: {os.getcwd()})"
    return check


# ----------------------------------------------------------------------------- applying tables
def lookup(node: Mapping[str, Any], key: str) -> Any:
    """The value at the dotted ``key`` of a plain mapping, or :data:`ABSENT`."""
    value: Any = node
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ABSENT
        value = value[part]
    return value


def check_value(key: str, value: Any, check: Callable[[Any], str | None]) -> Problem | None:
    """One value against one check (a :class:`Check` or a plain ``value -> allowed | None`` function)."""
    if isinstance(check, Check):
        return check.problem(key, value)
    allowed = check(value)
    return problem(key, value, allowed) if allowed else None


def check_node(node: Any, rules: Mapping[str, Callable[[Any], str | None]],
               get: Callable[[Any, str], Any] = lookup) -> list[Problem]:
    """Every key of ``rules`` that ``node`` holds (``get(node, key)``, :data:`ABSENT` when it does not),
    checked; the problems in table order."""
    found = []
    for key, check in rules.items():
        value = get(node, key)
        if value is not ABSENT:
            p = check_value(key, value, check)
            if p is not None:
                found.append(p)
    return found


def ratios_fit(node: Mapping[str, Any], first: str, second: str, rest: str) -> list[Problem]:
    """A problem when the split ratios ``node[first] + node[second]`` exceed 1 (``rest``: what the
    remainder is for, ``"validates"``)."""
    a, b = node.get(first), node.get(second)
    if is_number(a) and is_number(b) and a + b > 1:
        return [problem(second, b, f"at most 1 - {{node}}{first}={a} (the rest {rest})")]
    return []


def unknown_keys(node: Mapping[str, Any], valid: Iterable[str], what: str) -> list[Problem]:
    """A problem per key of ``node`` outside ``valid``, naming the closest valid key."""
    valid = sorted(valid)
    found = []
    for key in sorted(set(node) - set(valid)):
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        found.append(Problem(f"{{node}}{key}: unknown key; {what} has {valid}{hint}",
                             f"unknown {what} field(s) {[key]}{hint}; valid fields: {valid}"))
    return found


class ConfigRules:
    """A class that owns a config node keeps its keys' rules on itself: ``RULES`` (key -> check) on
    each class, merged along the MRO (a subclass's rule for a key replaces its base's; mixins add
    theirs), and :meth:`check_relations` for rules between keys. :meth:`check_config` applies both to
    a node without building anything (keys starting with ``_``, Hydra's, are left out)."""

    RULES: ClassVar[Mapping[str, Callable[[Any], str | None]]] = {}

    @classmethod
    def config_rules(cls) -> dict[str, Callable[[Any], str | None]]:
        rules: dict[str, Callable[[Any], str | None]] = {}
        for klass in reversed(cls.__mro__):
            rules.update(vars(klass).get("RULES", {}))
        return rules

    @classmethod
    def check_config(cls, node: Mapping[str, Any]) -> list[Problem]:
        """Every problem of ``node`` (a plain mapping of this class's constructor arguments)."""
        node = {k: v for k, v in dict(node).items() if not str(k).startswith("_")}
        return check_node(node, cls.config_rules()) + cls.check_relations(node)

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        """Problems between keys of ``node``; subclasses extend (``super().check_relations(node) + ...``)."""
        return []


__all__ = ["ABSENT", "ConfigRules", "Problem", "problem", "require", "raise_problems", "Check", "Number", "Choice", "Predicate", "number",
           "integer", "choice", "boolean", "text", "strings", "encoding", "existing_paths", "existing_file", "lookup",
           "check_value", "check_node", "ratios_fit", "unknown_keys", "show", "is_int", "is_number"]
