"""A run's hyperparameters for the loggers: TensorBoard's HPARAMS tab gets the knobs a researcher
sweeps (model, data, task, adapter and trainer settings, the seed, the preset), not ``_target_``
paths, folders or Hydra internals, next to the run's real final metrics."""

from __future__ import annotations

from typing import Any, Mapping

from lightning.pytorch.loggers import TensorBoardLogger

SWEPT_GROUPS = ("model", "data", "task", "adapter", "trainer")
"""Config nodes whose leaves are hyperparameters."""
TOP_LEVEL = ("seed", "init_from", "compile", "tokenizer")
"""Top-level keys that are hyperparameters."""
NOT_HPARAMS = ("_target_", "_convert_", "_partial_", "_recursive_", "default_root_dir", "dirpath", "save_dir",
               "path", "cache_dir", "tokenizer", "responses_file", "confusion_matrix_file", "enable_progress_bar",
               "log_every_n_steps", "num_workers", "pin_memory", "enable_checkpointing", "enable_model_summary",
               "memmap", "strip_gutenberg", "shuffle", "drop_last", "val_batch_size", "num_sanity_val_steps",
               "limit_train_batches", "limit_val_batches", "deterministic", "check_val_every_n_epoch", "fused_adamw",
               "vocab_size", "ln_eps", "log_examples", "generate_on_test", "sample_prompt", "sample_max_new_tokens",
               "sample_temperature", "sample_top_k", "labels", "progress")
"""Leaf names that are plumbing, not hyperparameters (paths, files, display, workers)."""
FINAL_PREFIX = "final/"
"""The final metrics go to their own tags (``final/val/loss``), so rewriting them at the end never
adds a point to the curves they come from."""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": value} with TensorBoard-friendly scalar values."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (list, tuple)):
        out[prefix[:-1]] = str(list(d))
    else:
        out[prefix[:-1]] = d if isinstance(d, (int, float, str, bool)) else str(d)
    return out


def select_hparams(config: Mapping[str, Any], choices: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The hyperparameters of a resolved run config: every leaf of :data:`SWEPT_GROUPS` except
    plumbing (:data:`NOT_HPARAMS`), the :data:`TOP_LEVEL` keys, and the chosen ``experiment`` preset."""
    out: dict[str, Any] = {}
    for group in SWEPT_GROUPS:
        node = config.get(group)
        if isinstance(node, Mapping):
            out.update({k: v for k, v in flatten(dict(node), f"{group}.").items()
                        if k.rsplit(".", 1)[-1] not in NOT_HPARAMS})
        elif group == "adapter":
            out["adapter"] = "none" if node is None else str(node)
    out.update({k: ("none" if config.get(k) is None else config.get(k)) for k in TOP_LEVEL if k in config})
    experiment = (choices or {}).get("experiment")
    if experiment:
        out["experiment"] = experiment
    return out


def log_hparams(loggers: list[Any], hparams: dict[str, Any], final: dict[str, float], step: int) -> None:
    """Hyperparameters to every logger; TensorBoard also gets ``final`` as the session's metrics,
    written under ``final/<name>`` at the last step."""
    metrics = {f"{FINAL_PREFIX}{k}": v for k, v in final.items()}
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger) and metrics:
            lg.log_hyperparams(hparams, metrics=metrics, step=step)
        else:
            lg.log_hyperparams(hparams)


__all__ = ["flatten", "select_hparams", "log_hparams", "FINAL_PREFIX"]
