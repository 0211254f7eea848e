"""Every config value checked before anything is built, for ``gptlab-train`` and every inference tool.

Why a validation pass rather than Hydra structured configs (dataclass schemas): a schema checks
types, but not ranges (``lr > 0``), choices held in code (prompt styles, LoRA targets), relations
between keys (``data.max_length <= model.context_length``) or files (does ``ckpt_path`` exist, is it
intact); and each config group option (six data modules, three tasks) would need a schema repeating
the keys its class already declares. Here one table per tool maps a dotted key to a check; keys a
config does not have are skipped, so the same table serves every group option, and a key that moves
is one line to change. The pass reads the composed config, builds
nothing, and reports every bad value at once, each as ``key=value: expected <what is allowed>``.

``gptlab-train`` runs it from a Hydra callback before the run folder is created (nothing is written
for a refused run) and again in ``train()`` for callers that skip Hydra; the inference tools run it
first thing in their ``run()``. :func:`gptlab.cli.entry.user_errors` turns the error into one line
on stderr and exit status 2.
"""

from __future__ import annotations

import codecs
import glob
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from gptlab.callbacks import ACTIONS as NONFINITE_ACTIONS
from gptlab.checkpoint_io import verify_checkpoint
from gptlab.data.instruct import PROMPT_STYLES
from gptlab.errors import ConfigError, InvalidInput
from gptlab.judge import BACKENDS as JUDGE_BACKENDS
from gptlab.model.config import GPTConfig
from gptlab.model.generation import sampling_problems
from gptlab.model.lora import SCALINGS as LORA_SCALINGS
from gptlab.model.lora import TARGETS as LORA_TARGETS
from gptlab.weights.formats import pretrained_names, resolve_pretrained_name
from gptlab.weights.readers import safe_torch_load
from gptlab.tasks.base import resume_changes
from gptlab.tasks.classify import POOLINGS, TRAINABLE
from gptlab.tasks.optim import LR_SCHEDULES, WEIGHT_DECAY_ON, optimizer_class

Check = Callable[[Any], "str | None"]
"""A check returns None for a valid value, else what would be allowed (``"an integer >= 1"``)."""

_ABSENT = object()


# ----------------------------------------------------------------------------- checks
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
           integer: bool = False, optional: bool = False) -> Check:
    """A number (an integer when ``integer``) within the given bounds; None too when ``optional``."""
    bounds = [f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    if len(bounds) == 2 and ge is not None and lt is not None:
        bounds = [f"in [{ge:g}, {lt:g})"]
    elif len(bounds) == 2 and gt is not None and le is not None:
        bounds = [f"in ({gt:g}, {le:g}]"]
    allowed = f"{'an integer' if integer else 'a number'}{' ' + ' and '.join(bounds) if bounds else ''}" + \
        (" or null" if optional else "")

    def check(v: Any) -> str | None:
        if v is None:
            return None if optional else allowed
        ok = (_is_int(v) if integer else _is_number(v)) and (gt is None or v > gt) and (ge is None or v >= ge) \
            and (lt is None or v < lt) and (le is None or v <= le)
        return None if ok else allowed
    return check


def integer(**bounds: Any) -> Check:
    return number(integer=True, **bounds)


def choice(*options: Any, optional: bool = False) -> Check:
    allowed = f"one of {list(options)}" + (" or null" if optional else "")

    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        # 1 == True in Python: compare types too, so true is not taken for the choice 1
        return None if any(v == o and type(v) is type(o) for o in options) else allowed
    return check


def boolean(optional: bool = False) -> Check:
    return choice(True, False, optional=optional)


def text(nonempty: bool = True, optional: bool = False) -> Check:
    allowed = ("a non-empty string" if nonempty else "a string") + (" or null" if optional else "")

    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        return None if isinstance(v, str) and (v.strip() or not nonempty) else allowed
    return check


def strings(subset_of: Sequence[str] | None = None, nonempty: bool = False, optional: bool = False,
            unique: bool = False) -> Check:
    """A list of strings (each one of ``subset_of`` when given)."""
    allowed = ("a non-empty list" if nonempty else "a list") + \
        (f" of {list(subset_of)}" if subset_of else " of strings") + (" without duplicates" if unique else "") + \
        (" or null" if optional else "")

    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) and (v or not nonempty) \
            and (not subset_of or set(v) <= set(subset_of)) and (not unique or len(set(v)) == len(v))
        return None if ok else allowed
    return check


def warmup(v: Any) -> str | None:
    """``warmup_steps``: an integer number of steps, or a fraction of all steps below 1."""
    ok = _is_number(v) and v >= 0 and (v < 1 or float(v).is_integer())
    return None if ok else "an integer >= 0 (steps) or a number in [0, 1) (a fraction of all steps)"


def limit_batches(v: Any) -> str | None:
    ok = v is None or (_is_int(v) and v >= 0) or (_is_number(v) and 0 <= v <= 1)
    return None if ok else "an integer >= 0 (batches), a number in [0, 1] (a fraction) or null"


def val_check_interval(v: Any) -> str | None:
    ok = v is None or (_is_int(v) and v >= 1) or (_is_number(v) and 0 < v <= 1)
    return None if ok else "an integer >= 1 (batches), a number in (0, 1] (a fraction of an epoch) or null"


def max_steps(v: Any) -> str | None:
    return None if _is_int(v) and (v == -1 or v >= 1) else "-1 (no limit) or an integer >= 1"


def encoding(v: Any) -> str | None:
    try:
        codecs.lookup(v)
    except (LookupError, TypeError):
        return "a text encoding Python knows (utf-8, latin-1, cp1252, ...)"
    return None


def cache_file(v: Any) -> str | None:
    ok = v is None or v is False or (isinstance(v, str) and bool(v))
    return None if ok else "a file path, null (beside the responses) or false (off)"


def url(v: Any) -> str | None:
    ok = v is None or (isinstance(v, str) and v.startswith(("http://", "https://")) and len(v) > 8)
    return None if ok else "an http:// or https:// URL or null"


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


def existing_file(dash_is_stdin: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None or (dash_is_stdin and v == "-"):
            return None
        if isinstance(v, str) and Path(v).expanduser().is_file():
            return None
        return f"a file that exists{' (or - for stdin)' if dash_is_stdin else ''} or null (cwd: {os.getcwd()})"
    return check


PRECISIONS = ("64-true", "64", 64, "32-true", "32", 32, "16-mixed", "16", 16, "bf16-mixed", "bf16-true", "16-true",
              "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def device(v: Any) -> str | None:
    allowed = "auto, cpu, cuda, cuda:<index> or mps"
    if not isinstance(v, str):
        return allowed
    if v in ("auto", "cpu"):
        return None
    if v == "mps":
        return None if torch.backends.mps.is_available() else "auto or cpu (no MPS device is available here)"
    if v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()):
        if not torch.cuda.is_available():
            return "auto or cpu (no CUDA device is available here)"
        if ":" in v and int(v[5:]) >= torch.cuda.device_count():
            return f"cuda:0 ... cuda:{torch.cuda.device_count() - 1} (the CUDA devices here)"
        return None
    return allowed


def accelerator(v: Any) -> str | None:
    if v in ("gpu", "cuda") and not torch.cuda.is_available():
        return "cpu or auto: no CUDA GPU is visible here (trainer=cpu)"
    return choice(*ACCELERATORS)(v)


# ----------------------------------------------------------------------------- tables

def optimizer_target(v: Any) -> str | None:
    """``task.optimizer._target_``: an optimizer class of ``torch.optim``."""
    try:
        optimizer_class(str(v))
    except ValueError:
        return "an optimizer of torch.optim (e.g. torch.optim.AdamW, torch.optim.SGD)"
    return None


# task.optimizer.lr <= 10: no optimizer of torch.optim trains a network above it, and a value such as
# 1e38 overflows float32 inside the optimizer's step (a raw traceback) instead of being refused here
TRAIN_RULES: dict[str, Check] = {
    "seed": integer(), "compile": boolean(), "train": boolean(), "test": boolean(), "task_name": text(),
    "float32_matmul_precision": choice("highest", "high", "medium", optional=True),
    "task.optimizer._target_": optimizer_target, "task.optimizer.lr": number(gt=0, le=10),
    "task.optimizer.weight_decay": number(ge=0), "task.optimizer.eps": number(gt=0),
    "task.optimizer.fused": boolean(optional=True), "task.weight_decay_on": choice(*WEIGHT_DECAY_ON),
    "task.lr_schedule.name": choice(*LR_SCHEDULES), "task.lr_schedule.warmup_steps": warmup,
    "task.lr_schedule.min_lr": number(ge=0), "task.grad_clip": number(ge=0, optional=True),
    "task.sample_prompt": text(nonempty=False, optional=True),
    "task.pooling": choice(*POOLINGS), "task.trainable": choice(*TRAINABLE),
    "task.trainable_blocks": integer(ge=1), "task.num_classes": integer(ge=2, optional=True),
    "task.max_length": integer(ge=1, optional=True), "task.labels": strings(optional=True, unique=True),
    "task.f1_average": choice("auto", "binary", "macro", "micro", "weighted"),
    "task.prompt_style": choice(*PROMPT_STYLES), "task.generate_on_test": boolean(),
    "task.log_examples": integer(ge=0), "task.responses_file": text(),
    "task.beta": number(gt=0), "task.loss_type": choice("sigmoid", "ipo", "hinge"),
    "task.label_smoothing": number(ge=0, lt=0.5), "task.logp_reduction": choice("sum", "mean"),
    "task.kl_coef": number(ge=0), "task.ppo_epochs": integer(ge=1), "task.num_mini_batches": integer(ge=1),
    "task.clip_range": number(gt=0), "task.gamma": number(ge=0, le=1), "task.lam": number(ge=0, le=1),
    "adapter.name": choice("lora", "qlora"), "adapter.block_size": integer(ge=1),
    "adapter.scaler_block_size": integer(ge=1),
    "adapter.compute_dtype": choice("auto", "float32", "bfloat16", "float16"), "adapter.rank": integer(ge=1), "adapter.alpha": number(gt=0),
    "adapter.dropout": number(ge=0, lt=1), "adapter.scaling": choice(*LORA_SCALINGS),
    "adapter.targets": strings(LORA_TARGETS, nonempty=True), "adapter.train_extra": strings(),
    "data.path": existing_paths, "data.batch_size": integer(ge=1), "data.val_batch_size": integer(ge=1, optional=True),
    "data.num_workers": integer(ge=0), "data.shuffle": boolean(), "data.drop_last": boolean(),
    "data.pin_memory": boolean(), "data.max_length": integer(ge=1, optional=True),
    "data.stride": integer(ge=1, optional=True), "data.train_ratio": number(gt=0, le=1),
    "data.val_ratio": number(ge=0, lt=1), "data.test_ratio": number(ge=0, lt=1),
    "data.memmap": choice(True, False, "auto"), "data.format": choice("auto", "tsv", "csv"),
    "data.encoding": encoding, "data.labels": strings(optional=True, unique=True),
    "data.max_examples": integer(ge=1, optional=True), "data.max_entries": integer(ge=1, optional=True),
    "data.prompt_style": choice(*PROMPT_STYLES), "data.allowed_max_length": integer(ge=1, optional=True),
    "data.max_prompt_length": integer(ge=1, optional=True), "data.split_seed": integer(),
    "data.max_record_bytes": integer(ge=1, optional=True),
    "data.num_train": integer(ge=1), "data.num_val": integer(ge=1), "data.vocab_size": integer(ge=1),
    "data.pad_id": integer(ge=0), "data.ignore_index": integer(),
    "trainer.max_steps": max_steps, "trainer.max_epochs": integer(ge=-1, optional=True),
    "trainer.min_epochs": integer(ge=0, optional=True), "trainer.accumulate_grad_batches": integer(ge=1),
    "trainer.log_every_n_steps": integer(ge=1), "trainer.check_val_every_n_epoch": integer(ge=1, optional=True),
    "trainer.val_check_interval": val_check_interval, "trainer.num_sanity_val_steps": integer(ge=-1),
    "trainer.limit_train_batches": limit_batches, "trainer.limit_val_batches": limit_batches,
    "trainer.limit_test_batches": limit_batches, "trainer.precision": choice(*PRECISIONS),
    "trainer.accelerator": accelerator, "trainer.enable_progress_bar": boolean(),
    "callbacks.step_checkpoint.every_n_train_steps": integer(ge=1), "callbacks.step_checkpoint.keep_every": boolean(),
    "callbacks.nonfinite_guard.action": choice(*NONFINITE_ACTIONS),
    "callbacks.nonfinite_guard.max_consecutive_skips": integer(ge=0),
    "callbacks.model_checkpoint.save_top_k": integer(ge=-1), "callbacks.model_checkpoint.mode": choice("min", "max"),
    "callbacks.throughput.log_every_n_steps": integer(ge=1),
}

_SOURCE = {"ckpt_path": text(optional=True), "init_from": text(optional=True),
           "adapter_path": existing_file(), "device": device, "precision": choice("auto", "32", 32, "bf16")}
_SAMPLING = {"seed": integer(), "use_kv_cache": boolean()}

GENERATE_RULES: dict[str, Check] = {**_SOURCE, **_SAMPLING, "prompt": text(), "stop_at_eos": boolean(),
                                    "stream": boolean()}
CHAT_RULES: dict[str, Check] = {**_SOURCE, **_SAMPLING, "instruction": text(optional=True),
                                "input": text(nonempty=False, optional=True),
                                "prompt_style": choice(*PROMPT_STYLES, optional=True)}
CLASSIFY_RULES: dict[str, Check] = {**_SOURCE, "input": existing_file(dash_is_stdin=True),
                                    "output": text(optional=True), "batch_size": integer(ge=1),
                                    "max_length": integer(ge=1, optional=True),
                                    "labels": strings(optional=True, unique=True),
                                    "pooling": choice(*POOLINGS, optional=True), "progress": boolean()}
EVAL_RULES: dict[str, Check] = {**_SOURCE, "splits": strings(("train", "val", "all"), nonempty=True),
                                "max_batches": integer(ge=1, optional=True), "output": text(optional=True),
                                "progress": boolean(), "model.context_length": integer(ge=1, optional=True),
                                **{k: v for k, v in TRAIN_RULES.items() if k.startswith("data.")}}
EXPORT_RULES: dict[str, Check] = {"ckpt_path": text(optional=True), "init_from": text(optional=True),
                                  "adapter_path": existing_file(), "n_heads": integer(ge=1, optional=True),
                                  "out_dir": text(),
                                  "dtype": choice("float32", "fp32", "float16", "fp16", "bfloat16", "bf16",
                                                  optional=True)}
JUDGE_RULES: dict[str, Check] = {
    "responses": existing_file(), "response_key": text(), "output": text(optional=True), "progress": boolean(),
    "judge.backend": choice(*JUDGE_BACKENDS), "judge.model": text(), "judge.url": url,
    "judge.timeout": number(gt=0), "judge.retries": integer(ge=0), "judge.backoff": number(ge=0),
    "judge.seed": integer(), "judge.temperature": number(ge=0), "judge.num_ctx": integer(ge=1),
    "judge.parse_retries": integer(ge=0), "judge.api_key": text(optional=True), "judge.cache": cache_file,
}


# ----------------------------------------------------------------------------- running the checks
def _get(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key`` (containers as plain lists/dicts); ``_ABSENT`` when the config has
    no such key or it cannot be resolved yet (Hydra reports those itself)."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's job runtime can resolve
        return _ABSENT
    return value


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, str) or value else "''"


def apply_rules(cfg: DictConfig, rules: Mapping[str, Check]) -> list[str]:
    """``key=value: expected <allowed>`` for every key of ``rules`` present in ``cfg`` whose check fails."""
    problems = []
    for key, check in rules.items():
        value = _get(cfg, key)
        if value is _ABSENT:
            continue
        allowed = check(value)
        if allowed:
            problems.append(f"{key}={_show(value)}: expected {allowed}")
    return problems


def _sampling(cfg: DictConfig, names: Mapping[str, str]) -> list[str]:
    """Sampling arguments through the library's own check; ``names`` maps argument -> config key."""
    args = {arg: _get(cfg, key) for arg, key in names.items()}
    args = {arg: (None if v is _ABSENT else v) for arg, v in args.items()}
    if _get(cfg, names["max_new_tokens"]) is _ABSENT:
        return []
    return [f"{names[arg]}={_show(value)}: expected {allowed}"
            for arg, value, allowed in sampling_problems(**args)]


def _model(cfg: DictConfig) -> list[str]:
    node = _get(cfg, "model")
    if not isinstance(node, dict):
        return []
    try:
        GPTConfig.from_dict(node)
    except (ValueError, TypeError) as e:
        return [f"model.{e}"]
    return []


def _not_longer_than_context(cfg: DictConfig, keys: Sequence[str]) -> list[str]:
    ctx = _get(cfg, "model.context_length")
    if not _is_int(ctx):
        return []
    out = []
    for key in keys:
        v = _get(cfg, key)
        if _is_int(v) and v > ctx:
            out.append(f"{key}={v}: expected at most model.context_length={ctx} (the model has no position beyond it)")
    return out


def _checkpoint(key: str, path: Any, *, resumable: bool = False) -> list[str]:
    """A checkpoint file that exists, is intact (checksums) and, when ``resumable``, holds the
    optimizer and loop state a resume needs."""
    if path is None:
        return []
    p = Path(str(path)).expanduser()
    if not p.is_file():
        return [f"{key}={str(path)!r}: expected a checkpoint file that exists (cwd: {os.getcwd()})"]
    try:
        if resumable:
            ckpt = safe_torch_load(p)  # checksums verified, weights_only=True
            if "optimizer_states" not in ckpt or "loops" not in ckpt:
                return [f"{key}={str(path)!r}: holds weights only (a best-* checkpoint), not the training state "
                        f"a resume needs; resume from last.ckpt, or start from these weights with init_from="]
        elif p.suffix == ".ckpt" or _is_zip(p):
            verify_checkpoint(p)
    except InvalidInput as e:
        return [f"{key}: {e}"]
    return []


def _is_zip(p: Path) -> bool:
    """Whether ``p`` starts like a zip archive (what ``torch.save`` writes)."""
    with open(p, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _init_from(key: str, value: Any) -> list[str]:
    if value is None or not isinstance(value, str):
        return []
    if Path(value).expanduser().exists():
        return _checkpoint(key, value) if Path(value).expanduser().is_file() else []
    if resolve_pretrained_name(value) is None:
        return [f"{key}={value!r}: expected a pretrained model name ({', '.join(pretrained_names())}) "
                f"or a file or folder that exists (cwd: {os.getcwd()})"]
    return []


def _one_source(cfg: DictConfig) -> list[str]:
    ckpt, init = _get(cfg, "ckpt_path"), _get(cfg, "init_from")
    ckpt, init = (None if v is _ABSENT else v for v in (ckpt, init))
    if bool(ckpt) == bool(init):
        return [f"ckpt_path={_show(ckpt)}, init_from={_show(init)}: expected exactly one of them "
                "(a gptlab checkpoint, or pretrained weights)"]
    return _checkpoint("ckpt_path", ckpt) + _init_from("init_from", init)


def raise_problems(problems: Sequence[str], what: str = "config") -> None:
    if problems:
        n = len(problems)
        raise ConfigError(f"{n} invalid {what} value{'s' if n > 1 else ''} (nothing was built or written):\n  "
                          + "\n  ".join(problems))


# ----------------------------------------------------------------------------- per tool
def validate_train_config(cfg: DictConfig) -> None:
    """Check a composed ``gptlab-train`` config; raises :class:`ConfigError` listing every bad value."""
    problems = apply_rules(cfg, TRAIN_RULES) + _model(cfg)
    problems += _not_longer_than_context(cfg, ["data.max_length", "data.allowed_max_length"])
    problems += _sampling(cfg, {"max_new_tokens": "task.sample_max_new_tokens", "temperature": "task.sample_temperature",
                                "top_k": "task.sample_top_k"})
    problems += _sampling(cfg, {"max_new_tokens": "task.max_new_tokens", "temperature": "task.temperature",
                                "top_k": "task.top_k", "top_p": "task.top_p"})
    lr, min_lr = _get(cfg, "task.optimizer.lr"), _get(cfg, "task.lr_schedule.min_lr")
    if _is_number(lr) and _is_number(min_lr) and lr > 0 and min_lr > lr:
        problems.append(f"task.lr_schedule.min_lr={min_lr}: expected at most the peak task.optimizer.lr={lr} "
                        "(the schedule decays to it)")
    if _get(cfg, "trainer.max_steps") == -1 and _get(cfg, "trainer.max_epochs") in (-1, None):
        problems.append("trainer.max_steps=-1 with trainer.max_epochs=-1: expected a limit on one of them "
                        "(the LR schedule is laid out over the run's length)")
    problems += _init_from("init_from", None if _get(cfg, "init_from") is _ABSENT else _get(cfg, "init_from"))
    ckpt = _get(cfg, "ckpt_path")
    if ckpt not in (None, _ABSENT) and _get(cfg, "train") is not False:
        problems += _checkpoint("ckpt_path", ckpt, resumable=True) or _resume_changes(cfg, ckpt)
    raise_problems(problems)


def _resume_changes(cfg: DictConfig, ckpt: Any) -> list[str]:
    """Optimizer and schedule values a resume from ``ckpt`` would ignore (:func:`resume_changes`)."""
    opt, sched, on = (_get(cfg, k) for k in ("task.optimizer", "task.lr_schedule", "task.weight_decay_on"))
    if not isinstance(opt, dict) or not isinstance(sched, dict):
        return []
    saved = safe_torch_load(Path(str(ckpt)).expanduser()).get("hyper_parameters") or {}
    try:
        changes = resume_changes(saved, opt, sched, on if isinstance(on, str) else "matrices")
    except (ValueError, TypeError):  # values the rules above already report
        return []
    return [f"ckpt_path={ckpt!s}: a resume keeps the checkpoint's optimizer state and would ignore or only "
            f"half-apply {change}; resume with the checkpoint's value, or start from its weights with "
            f"init_from={ckpt!s}" for change in changes]


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
    problems = apply_rules(cfg, GENERATE_RULES) + _one_source(cfg)
    problems += _sampling(cfg, {k: k for k in ("max_new_tokens", "temperature", "top_k", "top_p")})
    raise_problems(problems)


def validate_chat_config(cfg: DictConfig) -> None:
    problems = apply_rules(cfg, CHAT_RULES) + _one_source(cfg)
    problems += _sampling(cfg, {k: k for k in ("max_new_tokens", "temperature", "top_k", "top_p")})
    raise_problems(problems)


def validate_classify_config(cfg: DictConfig, text_arg: str | None) -> None:
    problems = apply_rules(cfg, CLASSIFY_RULES) + _one_source(cfg)
    text_value = text_arg if text_arg is not None else _get(cfg, "text")
    text_value = None if text_value is _ABSENT else text_value
    if (text_value is None) == (_get(cfg, "input") in (None, _ABSENT)):
        problems.append(f"text={_show(text_value)}, input={_show(_get(cfg, 'input'))}: expected exactly one of them "
                        "(text=\"...\" or input=<file with one text per line>)")
    raise_problems(problems)


def validate_eval_config(cfg: DictConfig) -> None:
    problems = apply_rules(cfg, EVAL_RULES) + _one_source(cfg)
    problems += _not_longer_than_context(cfg, ["data.max_length"])
    raise_problems(problems)


def validate_export_config(cfg: DictConfig) -> None:
    problems = apply_rules(cfg, EXPORT_RULES)
    ckpt, init = (None if (v := _get(cfg, k)) is _ABSENT else v for k in ("ckpt_path", "init_from"))
    if bool(ckpt) == bool(init):
        problems.append(f"ckpt_path={_show(ckpt)}, init_from={_show(init)}: expected exactly one of them")
    problems += _checkpoint("ckpt_path", ckpt) + _init_from("init_from", init)
    raise_problems(problems)


def validate_judge_config(cfg: DictConfig) -> None:
    raise_problems(apply_rules(cfg, JUDGE_RULES))
