"""The config tree (``conf/``) as documents: where it is, its groups and their options, and what each
file says about itself (the header comment: a description and example commands; every key with its
default and its comment). The tools' ``--help`` pages and ``gptlab-config ls`` are written from here,
so the YAML stays the one place a key is documented. Reads text only (no Hydra, no YAML parser):
a help page costs no heavy import."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Sequence


def config_dir() -> str:
    """The config tree the entry points compose from.

    The repository's top-level ``conf/`` is the source of truth: a source checkout (an editable
    install, or ``PYTHONPATH`` pointing at it) reads it in place, so editing a YAML there takes effect.
    A regular install (``pip install .``) carries the same tree inside the package as ``gptlab.conf``
    (``pyproject.toml`` maps ``conf/`` there), so nothing is copied by hand.
    """
    checkout = Path(__file__).resolve().parents[1] / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    return str(files("gptlab.conf"))


CONFIG_DIR = config_dir()
VOCAB_FROM_TOKENIZER = "${gptlab.vocab_size:${tokenizer}}"
"""A model preset's ``vocab_size`` in the config tree: the number of ids of the run's ``tokenizer``
(``model.vocab_size=N`` still sets it; ``model.pad_vocab_multiple`` rounds the rows up)."""


def register_model_presets() -> None:
    """Every :class:`~gptlab.model.config.GPTConfig` preset as the config ``model/preset/<name>`` in
    Hydra's ConfigStore, its fields those of ``GPTConfig.from_name(name)``: ``conf/model/<name>.yaml``
    takes it as its defaults and states only what differs, so a preset's numbers are written once
    (``PRESETS``) and every field is still a key of the composed ``model`` node (``model.n_layers=2``
    works). Call it before composing ``CONFIG_DIR`` (the entry factory and the benchmarks do); calling
    it again changes nothing. A preset's ``vocab_size`` is :data:`VOCAB_FROM_TOKENIZER`: the model has
    a row for each id of the run's ``tokenizer`` (GPT-2's 50,257 by default, as in ``PRESETS``); the
    resolver it reads is registered here too (:func:`gptlab.tokenizer.register_resolvers`). Hydra, the
    model config and the tokenizer load here, not when this module is imported."""
    from hydra.core.config_store import ConfigStore

    from gptlab.model.config import PRESETS, GPTConfig
    from gptlab.tokenizer import register_resolvers

    register_resolvers()
    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group="model/preset", name=name,
                    node={**GPTConfig.from_name(name).to_dict(), "vocab_size": VOCAB_FROM_TOKENIZER})

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
_DEFAULT = re.compile(r"^\s*-\s*(?:override\s+)?(?P<group>[\w/]+)\s*:\s*(?P<option>[\w.-]+)")
_SKIP_BLOCKS = ("defaults", "hydra")
HYDRA_LINES = ["Any key: key=value (new keys: +key=value); a config group: group=option.",
               "--cfg job prints the composed config without running; -m runs a sweep (a,b,c values);",
               "--config-dir DIR adds your own configs and presets (gptlab-config ls / cp); --hydra-help: Hydra's options."]
"""The last lines of every help page: how a command line talks to Hydra."""


def read_keys(text: str) -> list[tuple[str, str, str]]:
    """``(dotted key, default, comment)`` for every key of a config file, in file order, without the
    ``defaults`` list and the ``hydra`` block; a mapping's own line is kept only when commented."""
    out: list[tuple[str, str, str]] = []
    stack: list[tuple[int, str]] = []
    skip_indent: int | None = None
    for line in text.splitlines():
        m = _KEY.match(line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key = len(m["indent"]), m["key"]
        if skip_indent is not None:
            if indent > skip_indent:
                continue
            skip_indent = None
        if indent == 0 and key in _SKIP_BLOCKS:
            skip_indent = 0
            continue
        stack = [(i, k) for i, k in stack if i < indent]
        dotted = ".".join([k for _, k in stack] + [key])
        value, comment = m["value"].strip(), (m["comment"] or "").strip()
        if value or comment:
            out.append((dotted, value, comment))
        if not value:
            stack.append((indent, key))
    return out


def header(text: str) -> tuple[list[str], list[str]]:
    """The header comment of a config file: (description lines, example command lines)."""
    description, examples = [], []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line[1:].rstrip()
        if body.strip().startswith("@package"):
            continue
        (examples if body.startswith("   ") or body.startswith("  gptlab") else description).append(body.strip())
    return [d for d in description if d], [e for e in examples if e]


def groups(config_dir: str | Path = CONFIG_DIR) -> dict[str, list[str]]:
    """Config group -> its options (file names without ``.yaml``), e.g. ``{"model": ["gpt2-large", ...]}``."""
    root = Path(config_dir)
    out: dict[str, list[str]] = {}
    for yaml_file in sorted(root.rglob("*.yaml")):
        rel = yaml_file.relative_to(root)
        if len(rel.parts) > 1:
            out.setdefault("/".join(rel.parts[:-1]), []).append(yaml_file.stem)
    return out


def primary_configs(config_dir: str | Path = CONFIG_DIR) -> list[str]:
    """The configs at the top of the tree, one per tool (``train``, ``generate``, ``eval``, ...), the
    training config first."""
    names = sorted(p.stem for p in Path(config_dir).glob("*.yaml"))
    return sorted(names, key=lambda n: n != "train")


_LEAD = re.compile(r"^(?:gptlab-[\w-]+(?: [\w=./-]+)*|\w+(?:\.\w+)+): ")
"""A description's lead-in that names the command or key (``gptlab-train debug=fdr: ``, ``task.optimizer: ``)."""
_ABBREVIATIONS = ("e.g", "i.e", "et al", "etc", "vs")


def first_sentence(text: str) -> str:
    """``text`` up to its first full stop or semicolon outside parentheses (``e.g.``, ``et al.`` do
    not end a sentence)."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        at_end = i + 1 == len(text) or text[i + 1] == " "
        if ch in ".;" and depth <= 0 and at_end and not text[:i].endswith(_ABBREVIATIONS):
            return text[:i].rstrip()
    return text.rstrip()


def describe(path: str | Path, width: int = 110) -> str:
    """What a config file is for, in one line: the first sentence of its header comment (which may run
    over several comment lines) without a lead-in naming the command or key, cut at a word with
    ``...`` past ``width`` characters; "" for a file without a header comment."""
    description, _ = header(Path(path).read_text())
    sentence = first_sentence(_LEAD.sub("", " ".join(description)))
    if len(sentence) > width:
        sentence = sentence[: width - 3].rsplit(" ", 1)[0] + "..."
    return sentence


def render(config_name: str, prog: str, group_names: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR) -> str:
    """The help page of ``prog``, whose primary config is ``<config_dir>/<config_name>.yaml``: what the
    tool does and its examples (the file's header comment), the config groups it composes
    (``group_names``, each with its options, the default marked ``*``), and every key with its default
    and comment."""
    text = (Path(config_dir) / f"{config_name}.yaml").read_text()
    description, examples = header(text)
    keys = read_keys(text)
    width = min(44, max((len(f"{k}={v}") for k, v, _ in keys), default=0) + 2)
    lines = [f"{prog}: " + (description[0].split(":", 1)[-1].strip() if description else ""), *description[1:], ""]
    if examples:
        lines += ["Examples:", *(f"  {e.strip()}" for e in examples), ""]
    if group_names:
        available = groups(config_dir)
        chosen = {m["group"]: m["option"] for line in text.splitlines() if (m := _DEFAULT.match(line))}
        lines.append("Config groups (group=option; * = the default):")
        for g in group_names:
            options = [f"{o}*" if chosen.get(g) == o else o for o in available.get(g, [])]
            lines.append(f"  {g:<16} {', '.join(options)}")
        lines.append("")
    lines.append("Keys (key=default  comment):")
    for k, v, c in keys:
        lines.append(f"  {f'{k}={v}':<{width}}{c}".rstrip())
    lines += ["", *HYDRA_LINES]
    return "\n".join(lines) + "\n"


__all__ = ["CONFIG_DIR", "VOCAB_FROM_TOKENIZER", "config_dir", "read_keys", "header", "groups", "primary_configs", "describe", "first_sentence", "render",
           "HYDRA_LINES"]
