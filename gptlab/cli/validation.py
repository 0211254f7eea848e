"""The pre-flight of every command-line tool: the composed config checked before anything is built,
every bad value listed at once (``key=value: expected <what is allowed>``).

The rules are not written here: each sits beside the class that owns the value
(:mod:`gptlab.checks`). The ``model`` node is checked by :class:`~gptlab.model.config.GPTConfig`, the
``adapter`` node by the adapter it names (:func:`~gptlab.model.adapters.check_adapter_config`), and
every node with a ``_target_`` (the task, the data module, each callback) by the class it names, as
Hydra will build it (``check_config``; the class is imported as ``instantiate`` would import it, and
nothing is built). Sampling arguments follow :data:`~gptlab.model.generation.SAMPLING_RULES`, files
and pretrained names :mod:`gptlab.weights.checkpoint`, devices and precisions :mod:`gptlab.inference`.
This module keeps what no gptlab class owns: the tools' own keys, Lightning's ``Trainer`` and
``ModelCheckpoint`` settings, and the relations between nodes (a data length against the model's
context). Nothing here imports Lightning: the inference tools' pre-flight stays light.

``gptlab-train`` runs it from a Hydra callback before the run folder is created (nothing is written
for a refused run) and again in ``train()`` for callers that skip Hydra; the other tools run it first
thing in their ``run()``. :func:`gptlab.cli.user_errors` turns the error into one line on
stderr and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from gptlab.checks import (ABSENT, Predicate, Problem, boolean, check_node, choice, existing_file, existing_paths,
                           integer, is_int, is_number, number, show, strings, text)
from gptlab.data.answers import GRADERS
from gptlab.data.prompt_styles import PROMPT_STYLES
from gptlab.errors import ConfigError
from gptlab.inference import PRECISION_RULE, check_device
from gptlab.judge import Judge
from gptlab.model.adapters import check_adapter_config
from gptlab.model.config import GPTConfig
from gptlab.model.generation import SAMPLING_RULES
from gptlab.model.heads import POOLINGS
from gptlab.optim import resume_changes
from gptlab.tokenizer import TokenizerError, check_vocab_fits, get_tokenizer
from gptlab.weights.checkpoint import (check_gptlab_checkpoint, checkpoint_file_problems, init_from_problems,
                                     is_training_checkpoint, tokenizer_problems)
from gptlab.weights.loading import TORCH_SUFFIXES
from gptlab.weights.readers import safe_torch_load
from gptlab.solving import BEST_OF_N_SCORERS, SOLVE_METHODS

Check = Callable[[Any], "str | None"]
"""A check returns None for a valid value, else what would be allowed (``"an integer >= 1"``)."""


# ----------------------------------------------------------------------------- what no gptlab class owns
def _limit_batches(v: Any) -> bool:
    return v is None or (is_int(v) and v >= 0) or (is_number(v) and 0 <= v <= 1)


def _val_check_interval(v: Any) -> bool:
    return v is None or (is_int(v) and v >= 1) or (is_number(v) and 0 < v <= 1)


PRECISIONS = ("64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16-true", "16-true",
              "transformer-engine", "transformer-engine-float16")
"""``trainer.precision`` values Lightning's Trainer takes."""
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def accelerator(v: Any) -> str | None:
    if v in ("gpu", "cuda") and not torch.cuda.is_available():
        return "cpu or auto: no CUDA GPU is visible here (trainer=cpu)"
    return choice(*ACCELERATORS)(v)


TRAIN_RULES: dict[str, Check] = {
    "seed": integer(), "compile": boolean(), "train": boolean(), "test": boolean(), "task_name": text(),
    "tokenizer": text(),
    "float32_matmul_precision": choice("highest", "high", "medium", optional=True),
    "data.path": existing_paths,
    "trainer.max_steps": Predicate(lambda v: is_int(v) and (v == -1 or v >= 1), "-1 (no limit) or an integer >= 1"),
    "trainer.max_epochs": integer(ge=-1, optional=True), "trainer.min_epochs": integer(ge=0, optional=True),
    "trainer.accumulate_grad_batches": integer(ge=1), "trainer.log_every_n_steps": integer(ge=1),
    "trainer.check_val_every_n_epoch": integer(ge=1, optional=True),
    "trainer.val_check_interval": Predicate(_val_check_interval, "an integer >= 1 (batches), a number in (0, 1] "
                                                                 "(a fraction of an epoch) or null"),
    "trainer.num_sanity_val_steps": integer(ge=-1),
    **{f"trainer.limit_{s}_batches": Predicate(_limit_batches, "an integer >= 0 (batches), a number in [0, 1] "
                                                               "(a fraction) or null") for s in ("train", "val", "test")},
    "trainer.precision": choice(*PRECISIONS), "trainer.accelerator": accelerator,
    "trainer.enable_progress_bar": boolean(),
    "callbacks.model_checkpoint.save_top_k": integer(ge=-1), "callbacks.model_checkpoint.mode": choice("min", "max"),
}
"""``gptlab-train``'s own keys and Lightning's (the Trainer, its ModelCheckpoint)."""

SOURCE_RULES: dict[str, Check] = {"ckpt_path": text(optional=True), "init_from": text(optional=True),
                                  "tokenizer": text(optional=True),
                                  "adapter_path": existing_file(), "device": check_device,
                                  "precision": PRECISION_RULE}
"""Where an inference tool's model comes from, and where it runs."""
_GENERATION: dict[str, Check] = {**SOURCE_RULES, **SAMPLING_RULES, "seed": integer(), "use_kv_cache": boolean()}

GENERATE_RULES: dict[str, Check] = {**_GENERATION, "prompt": text(), "stop_at_eos": boolean(), "stream": boolean()}
CHAT_RULES: dict[str, Check] = {**_GENERATION, "instruction": text(optional=True),
                                "input": text(nonempty=False, optional=True),
                                "prompt_style": choice(*PROMPT_STYLES, optional=True)}
CLASSIFY_RULES: dict[str, Check] = {**SOURCE_RULES, "input": existing_file(dash_is_stdin=True),
                                    "output": text(optional=True), "batch_size": integer(ge=1),
                                    "max_length": integer(ge=1, optional=True),
                                    "labels": strings(optional=True, unique=True),
                                    "pooling": choice(*POOLINGS, optional=True), "progress": boolean()}
EVAL_RULES: dict[str, Check] = {**SOURCE_RULES, "splits": strings(("train", "val", "all"), nonempty=True),
                                "max_batches": integer(ge=1, optional=True), "output": text(optional=True),
                                "progress": boolean(), "model.context_length": integer(ge=1, optional=True),
                                "data.path": existing_paths}
EXPORT_RULES: dict[str, Check] = {"ckpt_path": text(optional=True), "init_from": text(optional=True),
                                  "tokenizer": text(optional=True),
                                  "adapter_path": existing_file(), "n_heads": integer(ge=1, optional=True),
                                  "out_dir": text(),
                                  "dtype": choice("float32", "fp32", "float16", "fp16", "bfloat16", "bf16",
                                                  optional=True)}
SERVE_RULES: dict[str, Check] = {
    **SOURCE_RULES, "seed": integer(), "model_name": text(optional=True), "prompt_style": choice(*PROMPT_STYLES, optional=True),
    "host": text(), "port": integer(ge=0, le=65535), "api_key": text(optional=True), "max_batch_size": integer(ge=1),
    "batch_window_ms": number(ge=0), "max_queue": integer(ge=1), "max_tokens": integer(ge=1),
    "max_body_bytes": integer(ge=1024), "drain_timeout": number(ge=0),
    "log_level": choice("critical", "error", "warning", "info", "debug", "trace"),
}
JUDGE_RULES: dict[str, Check] = {"responses": existing_file(), "baseline": existing_file(), "response_key": text(),
                                 "output": text(optional=True), "progress": boolean()}
RESPOND_RULES: dict[str, Check] = {**SOURCE_RULES, **SAMPLING_RULES, "split": choice("train", "val", "test"),
                                   "output": text(), "prompt_style": choice(*PROMPT_STYLES, optional=True),
                                   "batch_size": integer(ge=1), "max_prompt_length": integer(ge=1, optional=True),
                                   "progress": boolean()}
REWARD_RULES: dict[str, Check] = {**SOURCE_RULES, "responses": text(optional=True), "baseline": text(optional=True),
                                  "response_key": text(), "output": text(optional=True),
                                  "prompt_style": choice(*PROMPT_STYLES, optional=True), "batch_size": integer(ge=1),
                                  "max_length": integer(ge=1, optional=True)}
SOLVE_RULES: dict[str, Check] = {**SOURCE_RULES, **SAMPLING_RULES, "split": choice("train", "test"),
                                 "method": choice(*SOLVE_METHODS), "n": integer(ge=1),
                                 "scorer": choice(*BEST_OF_N_SCORERS), "reward_checkpoint": existing_file(),
                                 "grader": choice(*GRADERS, optional=True), "batch_size": integer(ge=1),
                                 "max_problems": integer(ge=1, optional=True), "output": text(),
                                 "summary": text(optional=True), "prompt_style": choice(*PROMPT_STYLES, optional=True),
                                 "seed": integer(), "progress": boolean()}


# ----------------------------------------------------------------------------- reading the config
def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` (containers as plain lists/dicts); ``ABSENT`` when the config has
    no such key or it cannot be resolved yet (Hydra reports those itself)."""
    try:
        value = OmegaConf.select(cfg, key, default=ABSENT)
        if isinstance(value, (DictConfig, ListConfig)):  # a ??? inside (a value still to give) stays "???"
            value = OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's job runtime can resolve
        return ABSENT
    return value


def _node(cfg: DictConfig, key: str) -> dict[str, Any] | None:
    """The node at ``key`` as a plain dict of its values that resolve now (an interpolation only
    Hydra's job runtime can resolve, like ``${paths.output_dir}``, leaves its key out); None when
    ``key`` is not a node."""
    try:
        node = OmegaConf.select(cfg, key, default=None)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(node, DictConfig):
        return None
    values = {k: _get(cfg, f"{key}.{k}") for k in node.keys()}
    return {k: v for k, v in values.items() if v is not ABSENT}


def _value(cfg: DictConfig, key: str) -> Any:
    """:func:`_get`, with None for an absent key."""
    value = _get(cfg, key)
    return None if value is ABSENT else value


def apply_rules(cfg: DictConfig, rules: Mapping[str, Check]) -> list[str]:
    """``key=value: expected <allowed>`` for every key of ``rules`` present in ``cfg`` whose check fails."""
    return [p.at() for p in check_node(cfg, rules, get=_get)]


def _at(problems: Sequence[Problem], node: str) -> list[str]:
    return [p.at(f"{node}.") for p in problems]


def owner_problems(cfg: DictConfig, key: str, extra: Mapping[str, Any] | None = None,
                   filled_later: Sequence[str] = ()) -> list[str]:
    """The problems of the node at ``key`` by the class its ``_target_`` names (its ``check_config``,
    given the node and the ``extra`` arguments Hydra's caller adds); none when it has no such check.
    ``filled_later``: keys the tool sets itself when the config leaves them null."""
    node = _node(cfg, key)
    if node is None or not isinstance(node.get("_target_"), str):
        return []
    node = {k: v for k, v in node.items() if not (k in filled_later and v is None)}
    try:
        owner = get_class(node["_target_"])
    except Exception as e:  # noqa: BLE001 - whatever the import raised, the key is what the user can fix
        return [f"{key}._target_={node['_target_']!r}: expected a class that can be imported ({type(e).__name__}: "
                f"{e})"]
    check = getattr(owner, "check_config", None)
    return _at(check({**node, **dict(extra or {})}), key) if check is not None else []


def _model(cfg: DictConfig) -> list[str]:
    node = _node(cfg, "model")
    return _at(GPTConfig.check_config(node), "model") if node is not None else []


def _adapter(cfg: DictConfig) -> list[str]:
    node = _node(cfg, "adapter")
    return _at(check_adapter_config(node), "adapter") if node is not None else []


def _not_longer_than_context(cfg: DictConfig, keys: Sequence[str]) -> list[str]:
    ctx = _get(cfg, "model.context_length")
    if not is_int(ctx):
        return []
    out = []
    for key in keys:
        v = _get(cfg, key)
        if is_int(v) and v > ctx:
            out.append(f"{key}={v}: expected at most model.context_length={ctx} (the model has no position beyond it)")
    return out


def _one_source(cfg: DictConfig) -> list[str]:
    """Exactly one of ``ckpt_path`` and ``init_from``, each a file or name that can be read."""
    ckpt, init = _value(cfg, "ckpt_path"), _value(cfg, "init_from")
    problems = []
    if bool(ckpt) == bool(init):
        problems.append(f"ckpt_path={show(ckpt)}, init_from={show(init)}: expected exactly one of them "
                        "(a gptlab checkpoint, or pretrained weights)")
    found = checkpoint_file_problems("ckpt_path", ckpt) + init_from_problems("init_from", init)
    return problems + [p.at() for p in found]


def _tokenizer(cfg: DictConfig) -> list[str]:
    """The run's tokenizer loads (its ranks match their hash), the model has a row for each of its
    ids, and the weights the run starts from or resumes were trained with it."""
    name = _get(cfg, "tokenizer")
    if not isinstance(name, str):
        return []
    try:
        tok = get_tokenizer(name)
        vocab = _get(cfg, "model.vocab_size")
        if is_int(vocab) and _value(cfg, "init_from") is None:
            check_vocab_fits(vocab, tok, f"model.vocab_size={vocab}: the model")
    except TokenizerError as e:
        return [str(e)]
    found = [p for key in ("init_from", "ckpt_path") for p in tokenizer_problems(key, _value(cfg, key), tok, name)]
    return [p.at() for p in found]


def raise_problems(problems: Sequence[str], what: str = "config") -> None:
    if problems:
        n = len(problems)
        raise ConfigError(f"{n} invalid {what} value{'s' if n > 1 else ''} (nothing was built or written):\n  "
                          + "\n  ".join(problems))


# ----------------------------------------------------------------------------- per tool
def validate_train_config(cfg: DictConfig) -> None:
    """Check a composed ``gptlab-train`` config; raises :class:`ConfigError` listing every bad value."""
    problems = apply_rules(cfg, TRAIN_RULES) + _model(cfg) + _adapter(cfg) + _tokenizer(cfg)
    task_extra = {"model": _value(cfg, "model"), "adapter": _value(cfg, "adapter"),
                  "init_from": _value(cfg, "init_from"), "compile": _value(cfg, "compile") or False}
    problems += owner_problems(cfg, "task", task_extra) + owner_problems(cfg, "task.reward") + owner_problems(cfg, "data")
    callbacks = OmegaConf.select(cfg, "callbacks", default=None)
    for name in callbacks.keys() if isinstance(callbacks, DictConfig) else ():
        problems += owner_problems(cfg, f"callbacks.{name}")
    problems += _not_longer_than_context(cfg, ["data.max_length", "data.allowed_max_length"])
    if _get(cfg, "trainer.max_steps") == -1 and _get(cfg, "trainer.max_epochs") in (-1, None):
        problems.append("trainer.max_steps=-1 with trainer.max_epochs=-1: expected a limit on one of them "
                        "(the LR schedule is laid out over the run's length)")
    init = _value(cfg, "init_from")
    found = init_from_problems("init_from", init)
    problems += [p.at() for p in found] or _starting_file_problems("init_from", init)
    ckpt = _value(cfg, "ckpt_path")
    if ckpt is not None and _get(cfg, "train") is not False:
        found = [p.at() for p in checkpoint_file_problems("ckpt_path", ckpt, resumable=True)]
        problems += found or (_resume_changes(cfg, ckpt) + _resume_problems(cfg, ckpt))
    raise_problems(problems)


def _resume_changes(cfg: DictConfig, ckpt: Any) -> list[str]:
    """Optimizer and schedule values a resume from ``ckpt`` would ignore (:func:`gptlab.optim.resume_changes`)."""
    opt, sched, on = (_get(cfg, k) for k in ("task.optimizer", "task.lr_schedule", "task.weight_decay_on"))
    if not isinstance(opt, dict) or not isinstance(sched, dict):
        return []
    saved = safe_torch_load(Path(str(ckpt)).expanduser()).get("hyper_parameters") or {}
    try:
        changes = resume_changes(saved, opt, sched, on if isinstance(on, str) else "matrices")
    except (ValueError, TypeError):  # values the task's own rules already report
        return []
    return [f"ckpt_path={ckpt!s}: a resume keeps the checkpoint's optimizer state and would ignore or only "
            f"half-apply {change}; resume with the checkpoint's value, or start from its weights with "
            f"init_from={ckpt!s}" for change in changes]


def _read_torch_file(key: str, path: Path) -> tuple[Any, list[str]]:
    """``(contents, [])`` of a torch file read as the loaders read it (weights only, memory-mapped, a
    training checkpoint only when gptlab wrote it), or ``(None, [the refusal])``."""
    try:
        obj = safe_torch_load(path)
        if is_training_checkpoint(obj):
            check_gptlab_checkpoint(obj, path)
    except (ValueError, RuntimeError, EOFError, OSError) as e:  # unsafe, unreadable, not gptlab's
        return None, [f"{key}={str(path)!r}: {e}"]
    return obj, []


def _starting_file_problems(key: str, value: Any) -> list[str]:
    """A torch file given as ``init_from`` is read here, before the run folder exists: one that names
    code (a pickled ``os.system``) or is another program's training checkpoint is refused up front."""
    path = Path(str(value)).expanduser() if isinstance(value, str) else None
    if path is None or not path.is_file() or path.suffix not in TORCH_SUFFIXES:
        return []
    return _read_torch_file(key, path)[1]


def _resume_problems(cfg: DictConfig, ckpt: str) -> list[str]:
    """What the checkpoint being resumed cannot continue into, each naming the checkpoint's value and
    the config's: another model shape (:meth:`GPTConfig.resume_problems`; unless the shape comes from
    ``init_from`` weights), another loader setup (the data module's ``resume_problems``)."""
    saved, problems = _read_torch_file("ckpt_path", Path(ckpt).expanduser())
    if saved is None:
        return problems
    model, node = (saved.get("hyper_parameters") or {}).get("model"), _node(cfg, "model")
    if isinstance(model, Mapping) and node is not None and _value(cfg, "init_from") is None:
        problems += _at(GPTConfig.resume_problems(model, node), "model")
    data_saved, data = saved.get("datamodule_hyper_parameters"), _node(cfg, "data")
    if isinstance(data_saved, Mapping) and data is not None and isinstance(data.get("_target_"), str):
        try:
            check = getattr(get_class(data["_target_"]), "resume_problems", None)
        except Exception:  # noqa: BLE001 - owner_problems reports a _target_ that cannot be imported
            check = None
        if check is not None:
            problems += _at(check(data_saved, data), "data")
    return [f"{p} [ckpt_path={ckpt}]" for p in problems]


def refuse_overwriting_checkpoints(folders: Sequence[str | Path], ckpt_path: str | None) -> None:
    """A fresh run must not write into a folder that holds another run's checkpoints (Lightning
    would overwrite ``last.ckpt``, or start numbering ``-v1`` files); resuming from one of them
    into the same folder is fine."""
    resume = Path(ckpt_path).expanduser().resolve() if ckpt_path else None
    for folder in folders:
        folder = Path(folder).expanduser()
        found = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        if found and not (resume is not None and resume.parent == folder.resolve()):
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            resumable = _resumable(folder, found)
            if resumable:
                what = f"Resume with ckpt_path={folder / resumable}"
            else:  # e.g. only best-*.ckpt: weights without the optimizer state
                what = (f"None of them holds the training state a resume needs (weights only); start from their "
                        f"weights with init_from={folder / found[-1]}")
            raise ConfigError(f"{folder} already holds checkpoints ({shown}); a fresh run there would overwrite "
                              f"them. {what}, or run in another folder (hydra.run.dir=...)")


def _resumable(folder: Path, names: Sequence[str]) -> str | None:
    """The checkpoint of ``names`` (in ``folder``) to resume from: ``last.ckpt`` if there, else the
    newest file that holds the optimizer and loop state; None when none does."""
    if "last.ckpt" in names:
        return "last.ckpt"
    for name in sorted(names, key=lambda n: (folder / n).stat().st_mtime, reverse=True):
        try:
            ckpt = safe_torch_load(folder / name)
        except Exception:  # noqa: BLE001 - an unreadable file is no candidate; the message still names it
            continue
        if isinstance(ckpt, dict) and "optimizer_states" in ckpt and "loops" in ckpt:
            return name
    return None


def validate_generate_config(cfg: DictConfig) -> None:
    raise_problems(apply_rules(cfg, GENERATE_RULES) + _one_source(cfg))


def validate_chat_config(cfg: DictConfig) -> None:
    raise_problems(apply_rules(cfg, CHAT_RULES) + _one_source(cfg))


def validate_serve_config(cfg: DictConfig) -> None:
    raise_problems(apply_rules(cfg, SERVE_RULES) + _one_source(cfg))


def validate_classify_config(cfg: DictConfig, text_arg: str | None) -> None:
    problems = apply_rules(cfg, CLASSIFY_RULES) + _one_source(cfg)
    text_value = text_arg if text_arg is not None else _value(cfg, "text")
    if (text_value is None) == (_value(cfg, "input") is None):
        problems.append(f"text={show(text_value)}, input={show(_value(cfg, 'input'))}: expected exactly one of them "
                        "(text=\"...\" or input=<file with one text per line>)")
    raise_problems(problems)


def validate_eval_config(cfg: DictConfig) -> None:
    # data.max_length follows model.context_length, which null leaves to the loaded model's
    problems = apply_rules(cfg, EVAL_RULES) + _one_source(cfg)
    problems += owner_problems(cfg, "data", filled_later=["max_length"])
    problems += _not_longer_than_context(cfg, ["data.max_length"])
    raise_problems(problems)


def validate_export_config(cfg: DictConfig) -> None:
    problems = apply_rules(cfg, EXPORT_RULES)
    ckpt, init = _value(cfg, "ckpt_path"), _value(cfg, "init_from")
    if bool(ckpt) == bool(init):
        problems.append(f"ckpt_path={show(ckpt)}, init_from={show(init)}: expected exactly one of them")
    problems += [p.at() for p in checkpoint_file_problems("ckpt_path", ckpt) + init_from_problems("init_from", init)]
    raise_problems(problems)


def validate_judge_config(cfg: DictConfig) -> None:
    node = _node(cfg, "judge")
    raise_problems(apply_rules(cfg, JUDGE_RULES) + (_at(Judge.check_config(node), "judge") if node is not None else []))


def validate_respond_config(cfg: DictConfig) -> None:
    """``gptlab-respond``: the model's source and sampling, the split, and the data node by its class."""
    raise_problems(apply_rules(cfg, RESPOND_RULES) + _one_source(cfg) + owner_problems(cfg, "data"))


def validate_reward_config(cfg: DictConfig) -> None:
    """``gptlab-reward``: the reward model's source, the response files, the scoring settings."""
    raise_problems(apply_rules(cfg, REWARD_RULES) + _one_source(cfg))


def validate_solve_config(cfg: DictConfig) -> None:
    """``gptlab-solve``: the model's source, the method and its samples, the problems (by their class)."""
    problems = apply_rules(cfg, SOLVE_RULES) + _one_source(cfg) + owner_problems(cfg, "data")
    if _get(cfg, "method") == "best_of_n" and _get(cfg, "scorer") == "reward" and not _value(cfg, "reward_checkpoint"):
        problems.append("scorer='reward' with reward_checkpoint=None: expected a reward model checkpoint "
                        "(reward_checkpoint=<a task=reward_model checkpoint>), or scorer=logprob")
    if _get(cfg, "method") != "greedy" and _get(cfg, "temperature") == 0:
        problems.append(f"temperature=0 with method={_get(cfg, 'method')}: expected a temperature > 0 (n greedy "
                        "samples are all the same answer); use method=greedy")
    raise_problems(problems)
