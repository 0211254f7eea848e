"""What every task shares: build (or load) the backbone, adapters, freezing, the optimizer node and
LR schedule (built by :mod:`gptlab.tasks.optim`), gradient clipping, tokens seen, optional
``torch.compile``, and what a checkpoint records about the task (reloading one:
:func:`gptlab.tasks.registry.load_task`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import torchmetrics
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from gptlab.errors import ConfigError
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import save_adapter
from gptlab.tasks.adapters import apply_adapter
from gptlab.tasks.checkpoint import load_backbone
from gptlab.tasks.optim import (WEIGHT_DECAY_ON, build_lr_scheduler, build_optimizer, lr_schedule_config,
                                optimizer_config, parameter_groups)

# hyperparameters of checkpoints written before the optimizer became a node -> their new place
_LEGACY_OPTIMIZER_KEYS = {"lr": "lr", "weight_decay": "weight_decay", "betas": "betas", "eps": "eps",
                          "fused_adamw": "fused"}
_LEGACY_SCHEDULE_KEYS = {"lr_schedule": "name", "warmup_steps": "warmup_steps", "min_lr": "min_lr"}


def _fold_legacy_keys(kwargs: dict[str, Any], optimizer: Mapping[str, Any] | None,
                      lr_schedule: Mapping[str, Any] | str | None) -> tuple[dict[str, Any] | None, Any]:
    """Move the flat optimizer keys of older checkpoints' hyperparameters (``lr``, ``betas``,
    ``lr_schedule="cosine"``, ...) out of ``kwargs`` into the ``optimizer`` / ``lr_schedule`` nodes."""
    legacy_opt = {new: kwargs.pop(old) for old, new in _LEGACY_OPTIMIZER_KEYS.items() if old in kwargs}
    legacy_sched = {new: kwargs.pop(old) for old, new in _LEGACY_SCHEDULE_KEYS.items() if old in kwargs}
    if isinstance(lr_schedule, str):  # lr_schedule="cosine" was the schedule's name
        legacy_sched["name"], lr_schedule = lr_schedule, None
    if legacy_opt:
        optimizer = {**dict(optimizer or {}), **legacy_opt}
    if legacy_sched:
        lr_schedule = {**dict(lr_schedule or {}), **legacy_sched}
    return optimizer, lr_schedule


IMPLEMENTATION_KEYS = ("_partial_", "fused", "foreach", "capturable", "differentiable")
"""Optimizer arguments that choose a kernel, not the arithmetic: a resume may change them."""


def resume_changes(saved_hparams: Mapping[str, Any], optimizer: Mapping[str, Any] | None,
                   lr_schedule: Mapping[str, Any] | None, weight_decay_on: str = "matrices") -> list[str]:
    """What a resume from a checkpoint whose task hyperparameters are ``saved_hparams`` would not
    apply as asked: ``"task.optimizer.lr=0.001 (the checkpoint's: 0.0004)"`` for each differing value.

    A resume restores the optimizer's state, and with it every value of its parameter groups (``lr``,
    ``betas``, ``eps``, ``weight_decay``, ...): a new value would be silently ignored, while the LR
    schedule (rebuilt from the config) would follow part of it (its floor ``min_lr / lr``, its
    warmup, its shape), so the learning rate would jump and the new checkpoint would record a rate
    never used. ``weight_decay_on`` changes the parameter groups the state belongs to. Kernel choices
    (:data:`IMPLEMENTATION_KEYS`) may change.
    """
    saved = dict(saved_hparams)
    saved_opt, saved_sched = _fold_legacy_keys(saved, saved.pop("optimizer", None), saved.pop("lr_schedule", None))
    pairs = [("task.optimizer", optimizer_config(saved_opt), optimizer_config(optimizer)),
             ("task.lr_schedule", lr_schedule_config(saved_sched), lr_schedule_config(lr_schedule))]
    changes = []
    for prefix, before, now in pairs:
        for key in sorted(set(before) | set(now)):
            if key in IMPLEMENTATION_KEYS:
                continue
            old, new = _plain(before.get(key)), _plain(now.get(key))
            if old != new:
                changes.append(f"{prefix}.{key}={new} (the checkpoint's: {old})")
    old_on = saved.get("weight_decay_on", "matrices")
    if old_on != weight_decay_on:
        changes.append(f"task.weight_decay_on={weight_decay_on} (the checkpoint's: {old_on})")
    return changes


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def refuse_resume_changes(changes: list[str], ckpt_path: Any) -> None:
    """Raise :class:`ConfigError` listing ``changes`` (from :func:`resume_changes`), if any."""
    if changes:
        raise ConfigError(
            f"ckpt_path={ckpt_path}: a resume continues the checkpoint's optimizer and LR schedule, which would "
            f"ignore or only half-apply {'; '.join(changes)}. Resume with the checkpoint's values (see its run's "
            f".hydra/config.yaml), or start a new run from its weights with init_from={ckpt_path}")


class GPTTask(L.LightningModule):
    """Base LightningModule around the shared :class:`GPT` backbone.

    Args:
        model: GPTConfig fields (a Hydra ``model`` node); with ``init_from`` they override the
            pretrained config (e.g. ``drop_rate``).
        init_from: start from pretrained weights: ``gpt2-small|gpt2-medium|gpt2-large|gpt2-xl``, a
            Hugging Face folder, a book-style state dict or a gptlab checkpoint.
        adapter: adapter settings (``adapter=lora``: ``name``, ``rank``, ``alpha``, ...) or None.
        optimizer: the optimizer node (``task.optimizer``): ``_target_`` (a ``torch.optim`` class,
            default ``torch.optim.AdamW``), ``_partial_: true`` and its arguments (``lr``, ``betas``,
            ``eps``, ``weight_decay``, ``fused``: null = fused on CUDA); None or a node without
            ``_target_`` = AdamW (:data:`gptlab.tasks.optim.DEFAULT_OPTIMIZER`, updated by the node).
            Kept as a plain dict; built in :meth:`configure_optimizers`.
        lr_schedule: ``name`` (``constant``, ``cosine``, ``linear``) after ``warmup_steps`` of linear
            warmup (an int, or a float < 1 read as a fraction of all steps), decaying to ``min_lr``.
        weight_decay_on: ``matrices`` (linear-layer weight matrices only) or ``all`` (every
            trainable parameter, the book); see :data:`gptlab.tasks.optim.WEIGHT_DECAY_ON`.
        grad_clip: clip the global gradient norm to this (None/0 = off). Done here rather than by
            the Trainer so fused AdamW keeps working under bf16-mixed.
        compile: wrap the training/eval step in ``torch.compile``.

    Subclasses set ``task_name`` (their name in :data:`gptlab.tasks.registry.TASKS`, recorded in
    checkpoints and adapter files) and ``kind`` (what the model predicts: ``lm`` or ``classifier``;
    the inference loader checks it).
    """

    task_name: str = ""
    kind: str = "lm"

    def __init__(self, model: Mapping[str, Any] | None = None, init_from: str | None = None,
                 adapter: Mapping[str, Any] | None = None, optimizer: Mapping[str, Any] | None = None,
                 lr_schedule: Mapping[str, Any] | None = None, weight_decay_on: str = "matrices",
                 grad_clip: float | None = 1.0, compile: bool = False, **kwargs: Any):
        super().__init__()
        optimizer, lr_schedule = _fold_legacy_keys(kwargs, optimizer, lr_schedule)
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown argument(s) {sorted(kwargs)}")
        # validated now, built in configure_optimizers; stored complete, as plain containers
        optimizer, lr_schedule = optimizer_config(optimizer), lr_schedule_config(lr_schedule)
        if weight_decay_on not in WEIGHT_DECAY_ON:
            raise ValueError(f"unknown task.weight_decay_on {weight_decay_on!r}; "
                             f"valid choices: {list(WEIGHT_DECAY_ON)}")
        # hparams go to the logger once, at the end, together with the final metrics (cli/train.py)
        self.save_hyperparameters(logger=False)
        self.hparams.optimizer, self.hparams.lr_schedule = optimizer, lr_schedule
        self.tokens_seen = 0  # input tokens trained on (pads included, as the book counts), all ranks
        self.examples_seen = 0
        self.model = self.build_backbone()
        self.configure_backbone()
        if adapter:
            self.apply_adapter(dict(adapter))
        self._compiled_loss = None

    # ----------------------------------------------------------------- backbone
    def build_backbone(self) -> GPT:
        """The GPT the task wraps: pretrained when ``init_from`` is set, else random init."""
        model_cfg = dict(self.hparams.model or {})
        if self.hparams.init_from:
            # only the fields a user may change on a pretrained model; its shape comes from the weights
            keep = ("drop_rate", "context_length", "activation_checkpointing")
            overrides = {k: model_cfg[k] for k in keep if k in model_cfg}
            return load_backbone(self.hparams.init_from, **overrides)
        return GPT(GPTConfig.from_dict(model_cfg))

    def configure_backbone(self) -> None:
        """Hook for task-specific surgery before adapters (swap the head, freeze layers)."""

    def apply_adapter(self, adapter: dict[str, Any]) -> None:
        """Apply the ``adapter`` config group (``adapter=lora``, ``adapter=qlora``) to the backbone, after
        :meth:`configure_backbone`: the same for every task, no task-specific code."""
        label = apply_adapter(self.model, adapter)
        n_train, n_total = self.trainable_parameter_count(), self.model.num_params()
        rank_zero_info(f"{label} (rank {adapter.get('rank')}): {n_train:,} trainable parameters "
                       f"({100 * n_train / max(1, n_total):.2f}% of {n_total:,})")

    def adapter_path(self) -> Path:
        """Where the adapter-only file of this run goes: next to the checkpoints."""
        ckpt_cb = self.trainer.checkpoint_callback
        folder = getattr(ckpt_cb, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints"
        return Path(folder) / "adapter.safetensors"

    def save_adapter(self, path: str | Path | None = None) -> Path | None:
        """Write the LoRA adapter (LoRA weights, ``train_extra`` weights, a task head, and the
        settings) to ``path`` (default :meth:`adapter_path`); None when the model has no LoRA.
        ``gptlab.model.lora.load_adapter(base_model, path)`` gives this model back exactly."""
        if getattr(self.model, "lora_config", None) is None:
            return None
        return save_adapter(self.model, path or self.adapter_path(), self.adapter_metadata())

    def adapter_metadata(self) -> dict[str, Any]:
        """Settings stored in an adapter file besides LoRA's own: the base it applies to, the task
        and kind (checked by the inference loader) and :meth:`prediction_metadata`."""
        return {"init_from": self.hparams.init_from, "task": self.task_name, "kind": self.kind,
                **self.prediction_metadata()}

    def prediction_metadata(self) -> dict[str, Any]:
        """What inference needs besides the weights (class names, prompt style, ...); tasks add theirs."""
        return {}

    def on_fit_end(self) -> None:
        # the adapter of the final weights, kilobytes to megabytes, beside the full checkpoints
        if self.trainer.is_global_zero:
            path = self.save_adapter()
            if path is not None:
                rank_zero_info(f"LoRA adapter saved to {path}")

    # ----------------------------------------------------------------- steps
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss of ``batch``. Subclasses override; default: next-token loss."""
        return self.model.loss(batch["input_ids"], batch["labels"])

    def loss_fn(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``compute_loss``, compiled on first use when ``compile=true``."""
        if not self.hparams.compile:
            return self.compute_loss(batch)
        if self._compiled_loss is None:
            self._compiled_loss = torch.compile(self.compute_loss)
        return self._compiled_loss(batch)

    def log_progress(self, batch: dict[str, torch.Tensor]) -> None:
        """Count this training batch and log ``train/tokens_seen`` (input tokens, pads included, as
        the book's ``input_batch.numel()``) and ``train/examples_seen``, summed over all ranks: the
        x-axes of the book's loss plots. Both survive a resume (kept in the checkpoint)."""
        ids = batch["input_ids"]
        world = self.trainer.world_size if self._trainer is not None else 1
        self.tokens_seen += ids.numel() * world
        self.examples_seen += ids.size(0) * world
        self.log_dict({"train/tokens_seen": float(self.tokens_seen), "train/examples_seen": float(self.examples_seen)},
                      on_step=True, on_epoch=False)

    def on_fit_start(self) -> None:
        # trainer.validate before fit (validate_before_fit) updates the metrics under inference mode,
        # which fit's own (no-grad) validation may not touch again: start fit with fresh states
        for metric in self.modules():
            if isinstance(metric, torchmetrics.Metric):
                metric.reset()
        self.check_resumed_schedule()

    # ----------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters, by ``weight_decay_on``: weight decay on
        linear-layer matrices only (``decay`` / ``no_decay`` groups), or on every parameter."""
        hp = self.hparams
        return parameter_groups(self, hp.optimizer.get("weight_decay", 0.0), hp.weight_decay_on)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = build_optimizer(hp.optimizer, self.parameter_groups())
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        scheduler = build_lr_scheduler(optimizer, hp.lr_schedule, hp.optimizer["lr"], total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip = self.hparams.grad_clip or gradient_clip_val
        if clip:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain strings and dicts only: a checkpoint never names code to import (gptlab.tasks.checkpoint)
        checkpoint["gptlab_task"] = self.task_name
        checkpoint["gptlab_kind"] = self.kind
        checkpoint["gptlab_model_config"] = self.model.config.to_dict()
        checkpoint["gptlab_progress"] = {"tokens_seen": self.tokens_seen, "examples_seen": self.examples_seen}
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            # the length the LR schedule was laid out for: a resume must not change it (see below)
            checkpoint["gptlab_schedule_steps"] = int(self.trainer.estimated_stepping_batches)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:  # a resume (not a test)
            hp = self.hparams
            refuse_resume_changes(resume_changes(checkpoint.get("hyper_parameters") or {}, hp.optimizer,
                                                 hp.lr_schedule, hp.weight_decay_on), self.trainer.ckpt_path)
        progress = checkpoint.get("gptlab_progress") or {}
        self.tokens_seen = int(progress.get("tokens_seen", 0))
        self.examples_seen = int(progress.get("examples_seen", 0))
        self._resumed_schedule_steps = checkpoint.get("gptlab_schedule_steps")
        self._resumed_step = checkpoint.get("global_step")

    def on_train_start(self) -> None:
        self.check_resumed_schedule()  # strategies that restore the checkpoint after on_fit_start (FSDP)

    def check_resumed_schedule(self) -> None:
        """Refuse a resume whose LR schedule would not continue the checkpoint's: a warmup fraction or
        a decaying schedule is laid out over the run's total steps, so changing them (max_steps,
        max_epochs, the data or the batch size) would make the learning rate jump."""
        saved = getattr(self, "_resumed_schedule_steps", None)
        if saved is None:
            return
        self._resumed_schedule_steps = None
        total = int(self.trainer.estimated_stepping_batches)
        schedule = self.hparams.lr_schedule
        name, warmup = schedule["name"], schedule.get("warmup_steps") or 0
        if total == saved or (name == "constant" and not 0 < warmup < 1):
            return
        raise ConfigError(
            f"the checkpoint's LR schedule ({name}, warmup_steps={warmup}) spans {saved} optimizer steps, "
            f"this run's would span {total}: the learning rate would jump at step {self._resumed_step}. "
            f"Resume with the original trainer.max_steps / max_epochs, data and batch size (see the run's "
            f".hydra/config.yaml), or train with task.lr_schedule.name=constant and warmup_steps in steps")

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters() if p.requires_grad}.values())


class LanguageModelTask(GPTTask):
    """What next-token tasks share (pretraining, instruction SFT): ``train/loss`` per step and
    epoch, and a token-weighted ``val/loss`` / ``val/ppl`` over the whole validation set."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.val_loss = torchmetrics.MeanMetric()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss_fn(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log_progress(batch)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.loss_fn(batch)
        # weight by real target tokens so the mean is over tokens, not over batches
        self.val_loss.update(loss, weight=(batch["labels"] != -100).sum())

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(loss), sync_dist=True)
