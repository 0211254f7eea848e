"""The command-line tools, and the one factory that makes their entry points.

A gptlab tool is a function of a Hydra config: ``run(cfg)`` in ``gptlab/cli/<tool>.py``, composed from
``conf/<config>.yaml``. :func:`entry_point` turns it into the console entry (``main``), so every tool
behaves the same way:

* ``--help``/``-h`` prints a page written from the config file (:func:`gptlab.config_tree.render`)
  without importing Hydra, torch or Lightning;
* a refused command line is one ``<prog>: error: ...`` line and exit status 2: a mistyped key names
  the keys that are there and the closest one (``did you mean trainer.max_steps?``), a wrong group
  option lists the valid ones closest first, an option whose Hydra plugin is not installed names the
  ``pip install`` extra, and a mandatory value left out (``???``) names the key and what it is for;
* an error a user can fix (:data:`USER_ERRORS`) is one ``<prog>: error: ...`` line: exit status 2 for
  refused input (:class:`~gptlab.errors.InvalidInput`: a config value, a file, a checkpoint), 1 when
  the work itself failed (a download, the judge server); anything else (a bug) keeps its traceback,
  and ``HYDRA_FULL_ERROR=1`` shows tracebacks for the rest too;
* arguments named in ``verbatim`` (``text="You won!"``) are taken as typed, past Hydra's override
  grammar, and handed to ``run`` as keyword arguments.

A new tool is a config file, a module and one line in ``pyproject.toml``::

    # conf/serve.yaml: a header comment (``# gptlab-serve: what it does``, then example commands
    # indented by three spaces), then every key with its default and a comment

    # gptlab/cli/serve.py
    from gptlab.cli import entry_point

    def run(cfg: DictConfig) -> None:
        from gptlab.serving import serve  # heavy imports inside the function: --help stays instant
        ...                               # pre-flight check, then the work

    main = entry_point("serve", run)      # options: prog=, groups= (listed in --help), verbatim=

    if __name__ == "__main__":
        main()

    # pyproject.toml, [project.scripts]: gptlab-serve = "gptlab.cli.serve:main"

The factory lives here, in the tools' own package, because it is the command line's machinery
(arguments, messages on stderr, exit statuses) and nothing below the command line needs it. A tool
module imports this package and library modules only, never another tool module; the helper modules
``ddp.py``, ``hparams.py``, ``runs.py`` and ``hydra_callbacks.py`` are parts of ``gptlab-train``. This
module imports nothing heavy at module level: Hydra and OmegaConf load only once a tool runs.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from gptlab.config_tree import CONFIG_DIR, read_keys, register_model_presets, render
from gptlab.errors import InvalidInput

if TYPE_CHECKING:
    from omegaconf import DictConfig

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ImportError)
"""Exceptions that report a mistake the user can fix (their messages name the key, value or file)."""
WORK_FAILURES = (("gptlab.weights.download", "DownloadError"), ("gptlab.judge", "JudgeError"))
"""Failures of the work whose message says all there is to say (a download, the judge server): one
line and exit status 1, always. Named by module rather than imported, so that this module stays
light: an exception class whose module was never loaded cannot have been raised."""
PLUGINS = {  # (config group, option prefix) -> (module the option needs, pip extra that installs it)
    ("hydra/launcher", "parallel"): ("hydra_plugins.hydra_joblib_launcher", "launchers"),
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "launchers"),
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    ("hydra/launcher", "submitit"): ("hydra_plugins.hydra_submitit_launcher", "launchers"),
    ("hparams_search", ""): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
}
"""Options that need an optional Hydra plugin (``hparams_search=*``: the Optuna sweeper)."""
_FULL_ERROR = "HYDRA_FULL_ERROR"


# --------------------------------------------------------------------------- the factory
def entry_point(config: str, run: Callable[..., Any], *, prog: str | None = None, groups: Sequence[str] = (),
                verbatim: Sequence[str] = ()) -> Callable[[], None]:
    """The console entry (``main()``) of a tool: ``run(cfg, **verbatim values)`` on the config
    composed from ``conf/<config>.yaml`` and the command line, with the behaviour described in this
    module's docstring.

    ``prog``: the command's name (default ``gptlab-<config>``); ``groups``: config groups the tool
    composes, listed with their options in ``--help``; ``verbatim``: keys whose ``key=...`` argument is
    taken as typed and passed to ``run`` as a keyword argument (None when absent). ``run``'s return
    value goes back to Hydra (a sweeper optimises it)."""
    prog = prog or f"gptlab-{config}"

    def main() -> None:
        argv = sys.argv
        handle_help(config, prog, groups, argv)
        check_plugins(prog, argv)
        texts = {key: pop_text_argument(argv, key) for key in verbatim}
        call_hydra(config, prog, functools.partial(run, **texts), argv)

    main.__doc__ = f"Console entry of ``{prog}``: its ``--help``; everything else through Hydra."
    return main


def call_hydra(config: str, prog: str, job: Callable[[DictConfig], Any], argv: list[str]) -> None:
    """Compose ``config`` with Hydra from ``argv`` and call ``job(cfg)`` inside Hydra's run (run folder,
    logging, sweeps), after :func:`require_values` and within :func:`user_errors`. A command line
    Hydra refuses while composing is reported by :func:`explain_refusal`: one line per mistake, exit 2."""
    import hydra  # here, not at the top: --help never loads Hydra

    started = False
    refusals = _RaisedRefusals()
    tool_function = job.func if isinstance(job, functools.partial) else job

    # wraps: Hydra names the job (hydra.job.name, the log file train.log) after the tool's own module
    @functools.wraps(tool_function)
    def task(cfg: DictConfig) -> Any:
        nonlocal started
        started = True
        refusals.release()
        register_model_presets()  # again in the job: a launcher's worker process resolves configs it did not compose
        require_values(cfg, config, prog, _runtime_choices())
        with user_errors(prog):
            return job(cfg)

    with refusals:
        try:
            register_model_presets()
            hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config)(task)()
        except Exception as exc:  # noqa: BLE001 - a refusal is reported below, anything else re-raised
            lines = None if started else explain_refusal(exc, config, argv)
            if lines is None:
                raise
            for line in lines:
                sys.stderr.write(f"{prog}: error: {line}\n")
            raise SystemExit(2) from None


def _runtime_choices() -> dict[str, Any]:
    """Hydra's record of the group options the running job was composed from (empty outside a job)."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


class _RaisedRefusals:
    """While Hydra composes the config it raises what it refuses instead of printing its own report
    (its documented ``HYDRA_FULL_ERROR=1`` switch), so that :func:`call_hydra` can say it in one line;
    the user's own setting is back in force once the tool runs (:meth:`release`) and afterwards."""

    active: list["_RaisedRefusals"] = []

    def __init__(self) -> None:
        self.users_value = os.environ.get(_FULL_ERROR)
        self.held = False

    def __enter__(self) -> "_RaisedRefusals":
        os.environ[_FULL_ERROR] = "1"
        self.held = True
        self.active.append(self)
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.users_value is None:
            os.environ.pop(_FULL_ERROR, None)
        else:
            os.environ[_FULL_ERROR] = self.users_value

    def __exit__(self, *exc: Any) -> None:
        self.release()
        self.active.remove(self)


def full_tracebacks() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``), also while Hydra composes."""
    held = [r for r in _RaisedRefusals.active if r.held]
    value = held[-1].users_value if held else os.environ.get(_FULL_ERROR)
    return value == "1"


# --------------------------------------------------------------------------- before Hydra
def handle_help(config_name: str, prog: str, group_names: Sequence[str] = (), argv: list[str] | None = None) -> None:
    """Print the tool's help page (:func:`~gptlab.config_tree.render`) and exit 0 when ``--help``/``-h``
    is on the command line."""
    argv = sys.argv if argv is None else argv
    if any(a in ("--help", "-h") for a in argv[1:]):
        sys.stdout.write(render(config_name, prog, group_names))
        raise SystemExit(0)


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


# --------------------------------------------------------------------------- inside the run
def require_values(cfg: DictConfig, config_name: str, prog: str, choices: dict[str, Any] | None = None) -> None:
    """Exit with one line per mandatory key (``???`` in the config) left unset, naming the key and
    what it is for (the comment beside it in the tool's config or in the group option that set it:
    ``choices`` maps groups to their chosen options, Hydra's ``runtime.choices``). A value that only
    points at a missing one (``init_from: ${sft_checkpoint}``) is not reported twice."""
    missing = unset_keys(cfg)
    if not missing:
        return
    comments = key_comments(config_name, choices or {})
    for key in missing:
        sys.stderr.write(f"{prog}: missing value for {key}=... ({comments.get(key) or 'required'}); "
                         f"see {prog} --help\n")
    raise SystemExit(2)


def unset_keys(cfg: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose own value is ``???`` (Hydra's hydra node aside), found without resolving
    any interpolation: OmegaConf's ``missing_keys`` resolves them, and one that points at a ``???``
    (``init_from: ${sft_checkpoint}``) raises instead of being reported."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    found: list[str] = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg)) if isinstance(cfg, ListConfig) else ()
    for key in keys:
        if not prefix and key == "hydra":
            continue
        dotted = f"{prefix}{key}" if isinstance(key, str) else f"{prefix.rstrip('.')}[{key}]"
        if OmegaConf.is_missing(cfg, key):
            found.append(dotted)
        elif not OmegaConf.is_interpolation(cfg, key) and isinstance(cfg._get_node(key), (DictConfig, ListConfig)):
            found += unset_keys(cfg[key], f"{dotted}.")
    return sorted(found)


def key_comments(config_name: str, choices: dict[str, Any]) -> dict[str, str]:
    """Dotted key -> its comment, from the tool's config file and the files of the chosen group options
    (a ``# @package _global_`` file, like an experiment preset, speaks of top-level keys)."""
    root = Path(CONFIG_DIR)
    files = [("", root / f"{config_name}.yaml")]
    files += [(group.replace("/", "."), root / group / f"{option}.yaml") for group, option in choices.items()
              if isinstance(option, str) and not group.startswith("hydra")]
    comments: dict[str, str] = {}
    for package, path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        prefix = "" if not package or "@package _global_" in text else f"{package}."
        comments.update({f"{prefix}{k}": c for k, _, c in read_keys(text) if c})
    return comments


def _loaded_class(module: str, name: str) -> type | None:
    return getattr(sys.modules.get(module), name, None)


def _work_failure(exc: BaseException) -> bool:
    return any(cls is not None and isinstance(exc, cls) for cls in (_loaded_class(m, n) for m, n in WORK_FAILURES))


def user_error(exc: BaseException) -> BaseException | None:
    """``exc`` (or the error Hydra's ``instantiate`` wrapped) when it is one of :data:`USER_ERRORS` or
    :data:`WORK_FAILURES`; None for anything else."""
    wrapper = _loaded_class("hydra.errors", "InstantiationException")
    while wrapper is not None and isinstance(exc, wrapper) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc if isinstance(exc, USER_ERRORS) or _work_failure(exc) else None


@contextlib.contextmanager
def user_errors(prog: str) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` and :data:`WORK_FAILURES` into ``<prog>: error: <message>`` on stderr
    and exit status 2 for refused input (:class:`~gptlab.errors.InvalidInput`), 1 for the rest;
    anything else (a bug) keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows tracebacks for all but
    refused input and work failures, whose messages say everything."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - sorted below
        err = user_error(e)
        if err is None or (full_tracebacks() and not isinstance(err, InvalidInput) and not _work_failure(err)):
            raise
        sys.stderr.write(f"{prog}: error: {err}\n")
        # 2: input refused before any work (as argparse does for bad arguments); 1: the work failed
        raise SystemExit(2 if isinstance(err, InvalidInput) else 1) from None


# --------------------------------------------------------------------------- refused command lines
def explain_refusal(exc: BaseException, config_name: str, argv: Sequence[str]) -> list[str] | None:
    """The message lines for a command line Hydra refused while composing ``config_name`` (``exc``):
    an unknown group option (naming it and listing the valid ones, closest first), unknown keys (each
    with the keys that are there and the closest one), or Hydra's own message for anything else it
    refused (a malformed override); None when ``exc`` is not a refusal."""
    from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if not isinstance(exc, CompactHydraException):
        return None
    missing = getattr(exc, "missing_cfg_file", None) if isinstance(exc, MissingConfigException) else None
    if missing and "/" in missing and exc.options:
        group, _, option = missing.rpartition("/")
        ranked = closest_first(option, exc.options)
        return [f"{group}={option}: no such option; did you mean {group}={ranked[0]}? "
                f"{group} options (closest first): {', '.join(ranked)}"]
    if isinstance(exc.__cause__, (ConfigAttributeError, ConfigKeyError)):  # "Key 'lrr' is not in struct"
        found = unknown_keys(config_name, argv)
        if found:
            return [f"unknown key {key}; {parent} has: {', '.join(keys)}"
                    + (f"; did you mean {guess}?" if guess else "") + f" (add a new key with +{key}=...)"
                    for key, parent, keys, guess in found]
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, OverrideParseException):
        message = f"cannot read the argument {exc.override!r}: {message}"
    return [message]


def closest_first(word: str, choices: Sequence[str]) -> list[str]:
    """``choices`` ordered by similarity to ``word`` (difflib's ratio), the closest first."""
    score = {c: difflib.SequenceMatcher(None, word, c).ratio() for c in choices}
    return sorted(choices, key=lambda c: (-score[c], c))


def _search_path(argv: Sequence[str]) -> list[str]:
    """``hydra.searchpath`` for the ``--config-dir``/``-cd`` folders of a command line."""
    dirs = [b for a, b in zip(argv, argv[1:]) if a in ("--config-dir", "-cd")]
    dirs += [a.split("=", 1)[1] for a in argv if a.startswith("--config-dir=")]
    return [f"hydra.searchpath=[{','.join(f'file://{Path(d).resolve()}' for d in dirs)}]"] if dirs else []


def unknown_keys(config_name: str, argv: Sequence[str]) -> list[tuple[str, str, list[str], str | None]]:
    """The plain ``key=value`` overrides on ``argv`` whose key the composed config does not have:
    ``(key, the deepest node above it that exists, that node's keys, the closest existing key or
    None)`` each. Composes the config with the command's group choices (``task=dpo``) but none of its
    values, so it works where Hydra itself refused."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import DictConfig, OmegaConf

    overrides = [a for a in argv[1:] if "=" in a and not a.startswith(("-", "+", "~", "hydra."))]
    group_choices = [a for a in overrides if (Path(CONFIG_DIR) / a.split("=", 1)[0]).is_dir()]  # task=dpo, ...
    GlobalHydra.instance().clear()
    register_model_presets()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=group_choices + _search_path(argv))
    except Exception:  # noqa: BLE001 - the group choices themselves fail: Hydra's message stands
        return []
    finally:
        GlobalHydra.instance().clear()
    every = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    found = []
    for key in (a.split("=", 1)[0] for a in overrides if a not in group_choices):
        parts = key.split(".")
        depth = len(parts) - 1
        while depth and not isinstance(OmegaConf.select(cfg, ".".join(parts[:depth])), DictConfig):
            depth -= 1  # a.b.c with no a.b: the keys of a
        node = OmegaConf.select(cfg, ".".join(parts[:depth])) if depth else cfg
        if isinstance(node, DictConfig) and parts[depth] not in node.keys():  # `in` is False for ??? values
            keys = sorted(str(k) for k in node.keys() if not str(k).startswith("_"))
            found.append((key, ".".join(parts[:depth]) or "the config", keys, closest_key(key, every)))
    return found


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if not str(k).startswith("_"):
                out.append(f"{prefix}{k}")
                out += _dotted_keys(v, f"{prefix}{k}.")
    return out


def closest_key(key: str, every: Sequence[str]) -> str | None:
    """The existing key a mistyped ``key`` most likely meant: a close sibling (``trainer.max_step`` ->
    ``trainer.max_steps``), else a key of the same or a close name elsewhere (``task.lr`` ->
    ``task.optimizer.lr``), else the closest full path; None when nothing is close."""
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in every if k.rpartition(".")[0] == parent]
    match = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if match:
        return f"{parent}.{match[0]}" if parent else match[0]

    def ratio(a: str, b: str) -> float:
        return difflib.SequenceMatcher(None, a, b).ratio()

    elsewhere = [k for k in every if ratio(leaf, k.rpartition(".")[2]) >= 0.75]
    if elsewhere:
        return max(elsewhere, key=lambda k: (ratio(leaf, k.rpartition(".")[2]), ratio(key, k)))
    match = difflib.get_close_matches(key, every, n=1, cutoff=0.75)
    return match[0] if match else None


__all__ = ["entry_point", "call_hydra", "CONFIG_DIR", "register_model_presets", "handle_help", "check_plugins", "PLUGINS", "pop_text_argument",
           "require_values", "unset_keys", "key_comments", "user_errors", "user_error", "USER_ERRORS", "WORK_FAILURES", "full_tracebacks",
           "explain_refusal", "unknown_keys", "closest_key", "closest_first"]
