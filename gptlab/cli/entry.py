"""What every entry point shares: its ``--help``, written from its own primary config file (what the
tool does and its examples from the file's header comment, then every key with its default and its
comment: the YAML stays the one place a key is documented; Hydra's generic page is still
``--hydra-help``), one-line messages for missing mandatory values, and one-line errors for
mistakes a user can fix (a wrong value, a missing file) instead of tracebacks."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from gptlab.errors import InvalidInput
from gptlab.weights import DownloadError

from gptlab.cli import CONFIG_DIR

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$")
_DEFAULT = re.compile(r"^\s*-\s*(?:override\s+)?(?P<group>[\w/]+)\s*:\s*(?P<option>[\w.-]+)")
_SKIP_BLOCKS = ("defaults", "hydra")
HYDRA_LINES = ["Any key: key=value (new keys: +key=value); a config group: group=option.",
               "--cfg job prints the composed config without running; -m runs a sweep (a,b,c values);",
               "--config-dir DIR adds your own configs and presets (gptlab-config ls / cp); --hydra-help: Hydra's options."]


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
    """Config group -> its options (file names without ``.yaml``), for ``gptlab-train --help``."""
    root = Path(config_dir)
    out: dict[str, list[str]] = {}
    for yaml_file in sorted(root.rglob("*.yaml")):
        rel = yaml_file.relative_to(root)
        if len(rel.parts) > 1:
            out.setdefault("/".join(rel.parts[:-1]), []).append(yaml_file.stem)
    return out


def render(config_name: str, prog: str, group_names: Sequence[str] = ()) -> str:
    """The help page of ``prog``, whose primary config is ``<CONFIG_DIR>/<config_name>.yaml``;
    ``group_names``: config groups the tool composes (listed with their options)."""
    text = (Path(CONFIG_DIR) / f"{config_name}.yaml").read_text()
    description, examples = header(text)
    keys = read_keys(text)
    width = min(44, max((len(f"{k}={v}") for k, v, _ in keys), default=0) + 2)
    lines = [f"{prog}: " + (description[0].split(":", 1)[-1].strip() if description else ""), *description[1:], ""]
    if examples:
        lines += ["Examples:", *(f"  {e.strip()}" for e in examples), ""]
    if group_names:
        available = groups()
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


def handle_help(config_name: str, prog: str, group_names: Sequence[str] = (), argv: list[str] | None = None) -> None:
    """Print :func:`render` and exit when ``--help``/``-h`` is on the command line."""
    argv = sys.argv if argv is None else argv
    if any(a in ("--help", "-h") for a in argv[1:]):
        sys.stdout.write(render(config_name, prog, group_names))
        raise SystemExit(0)


_STARTED: list[str] = []
"""Configs whose tool got as far as :func:`require_values` in this process."""


def require_values(cfg: DictConfig, config_name: str, prog: str) -> None:
    """Exit with one line per mandatory key (``???`` in the config) left unset, naming the key and
    what it is for."""
    _STARTED.append(config_name)  # the config composed: a later exit is the tool's own
    missing = sorted(OmegaConf.missing_keys(cfg))
    if not missing:
        return
    comments = {k: c for k, _, c in read_keys((Path(CONFIG_DIR) / f"{config_name}.yaml").read_text())}
    for key in missing:
        sys.stderr.write(f"{prog}: missing value for {key}=... ({comments.get(key) or 'required'}); "
                         f"see {prog} --help\n")
    raise SystemExit(2)


PLUGINS = {  # (config group, option prefix) -> (module the option needs, pip extra that installs it)
    ("hydra/launcher", "parallel"): ("hydra_plugins.hydra_joblib_launcher", "launchers"),
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "launchers"),
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    ("hydra/launcher", "submitit"): ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    ("hparams_search", ""): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}
"""Options that need an optional Hydra plugin (``hparams_search=*``: the Optuna sweeper)."""


def _installed(module: str) -> bool:
    parent = module.rpartition(".")[0]
    return (not parent or importlib.util.find_spec(parent) is not None) and importlib.util.find_spec(module) is not None


def check_plugins(prog: str, argv: list[str] | None = None) -> None:
    """Exit naming the ``pip install`` extra when the command line picks an option whose Hydra
    plugin is not installed (Hydra itself would only say it cannot load the plugin's config)."""
    for arg in (sys.argv if argv is None else argv)[1:]:
        group, sep, value = arg.lstrip("+~").partition("=")
        if not sep:
            continue
        for (g, prefix), (module, extra) in PLUGINS.items():
            if group == g and value.startswith(prefix) and not _installed(module):
                sys.stderr.write(f'{prog}: {arg} needs the Hydra plugin {module}, which is not installed: '
                                 f'pip install "gptlab[{extra}]"\n')
                raise SystemExit(2)


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, DownloadError, ImportError)
"""Exceptions that report a mistake the user can fix (their messages name the key, value or file)."""


def user_error(exc: BaseException) -> BaseException | None:
    """``exc`` (or the error Hydra's ``instantiate`` wrapped) when it is one of :data:`USER_ERRORS`."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc if isinstance(exc, USER_ERRORS) else None


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` into ``<prog>: error: <message>`` on stderr and exit status 2 for
    refused input (:class:`~gptlab.errors.InvalidInput`: a config value, file or checkpoint), 1 for
    other failures; anything else (a bug) keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows tracebacks for all."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - sorted below
        err = user_error(e)
        if err is None or (os.environ.get("HYDRA_FULL_ERROR") == "1" and not isinstance(err, InvalidInput)):
            raise
        sys.stderr.write(f"{prog}: error: {err}\n")
        # 2: input refused before any work (as argparse does for bad arguments); 1: the work failed
        raise SystemExit(2 if isinstance(err, InvalidInput) else 1) from None



def unknown_keys(config_name: str, argv: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """The plain ``key=value`` overrides on ``argv`` whose key the composed config does not have:
    ``(key, its parent node, the keys that node has)`` each. Composes the config with the command's
    group choices (``task=dpo``) but none of its values, so it works where Hydra itself refused."""
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith(("-", "+", "~", "hydra."))]
    groups = [a for a in overrides if (Path(CONFIG_DIR) / a.split("=", 1)[0]).is_dir()]  # task=dpo, ...
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=groups)
    except Exception:  # noqa: BLE001 - a bad group choice: Hydra's own message lists the options
        return []
    finally:
        GlobalHydra.instance().clear()
    found = []
    for key in (a.split("=", 1)[0] for a in overrides if a not in groups):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and leaf not in node.keys():  # `in` is False for ??? values
            found.append((key, parent or "the config", sorted(str(k) for k in node.keys() if not str(k).startswith("_"))))
    return found


def call_hydra(hydra_main: Callable[[], Any], config_name: str, prog: str, argv: list[str] | None = None) -> None:
    """Run a ``@hydra.main`` function; when Hydra refuses the command line before the tool runs
    because a key does not exist, add one line per such key naming the keys that are there, and exit
    with status 2 (refused input)."""
    _STARTED.clear()
    try:
        hydra_main()
    except SystemExit as e:
        if e.code in (0, None) or config_name in _STARTED:
            raise
        bad = unknown_keys(config_name, sys.argv if argv is None else argv)
        for key, parent, keys in bad:
            sys.stderr.write(f"{prog}: error: unknown key {key}; {parent} has: {', '.join(keys)} "
                             f"(add a new key with +{key}=...)\n")
        if bad:
            raise SystemExit(2) from None
        raise

def pop_text_argument(argv: list[str], key: str = "text") -> str | None:
    """Remove ``<key>=...`` arguments (default ``text=``) from ``argv``; the last one's value,
    verbatim (None if none).

    Hydra's override grammar rejects many characters of ordinary messages (``!``, ``(``, ``,``
    lists, ``${`` interpolations) unless the value is quoted once more inside the shell quotes, so
    the text never goes through it."""
    value = None
    for arg in list(argv[1:]):
        name, sep, rest = arg.partition("=")
        if sep and name.lstrip("+") == key:
            argv.remove(arg)
            value = rest
    if value and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # already quoted for Hydra ('text="..."'): one level of quotes off
    return value


__all__ = ["check_plugins", "PLUGINS", "render", "handle_help", "require_values", "read_keys", "header", "groups",
           "user_errors", "unknown_keys", "call_hydra", "user_error", "USER_ERRORS", "pop_text_argument"]
