"""What every task shares: build (or load) the backbone, adapters, freezing, AdamW + LR schedule,
gradient clipping, optional ``torch.compile``, and what a checkpoint records about the task
(reloading one: :func:`gptlab.tasks.registry.load_task`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn as nn
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info

from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import save_adapter
from gptlab.tasks.adapters import apply_adapter
from gptlab.tasks.checkpoint import load_backbone


def lr_lambda(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR multiplier at ``step``: linear warmup from 0 over ``warmup_steps``, then ``schedule``:
    ``constant``, ``cosine`` (to ``min_lr_ratio``) or ``linear`` (to ``min_lr_ratio``)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return min_lr_ratio + (1 - min_lr_ratio) * (1.0 - progress)
    raise ValueError(f"unknown lr schedule {schedule!r}; valid choices: ['constant', 'cosine', 'linear']")


class GPTTask(L.LightningModule):
    """Base LightningModule around the shared :class:`GPT` backbone.

    Args:
        model: GPTConfig fields (a Hydra ``model`` node); with ``init_from`` they override the
            pretrained config (e.g. ``drop_rate``).
        init_from: start from pretrained weights: ``gpt2-small|gpt2-medium|gpt2-large|gpt2-xl``, a
            Hugging Face folder, a book-style state dict or a gptlab checkpoint.
        adapter: adapter settings (``adapter=lora``: ``name``, ``rank``, ``alpha``, ...) or None.
        lr, weight_decay, betas, eps: AdamW; decay applies to weight matrices only.
        lr_schedule: ``constant``, ``cosine`` or ``linear``, after ``warmup_steps`` of linear warmup
            (an int, or a float < 1 read as a fraction of all steps); decays to ``min_lr``.
        grad_clip: clip the global gradient norm to this (None/0 = off). Done here rather than by
            the Trainer so fused AdamW keeps working under bf16-mixed.
        fused_adamw: None = fused kernel whenever the parameters are on CUDA.
        compile: wrap the training/eval step in ``torch.compile``.

    Subclasses set ``task_name`` (their name in :data:`gptlab.tasks.registry.TASKS`, recorded in
    checkpoints and adapter files) and ``kind`` (what the model predicts: ``lm`` or ``classifier``;
    the inference loader checks it).
    """

    task_name: str = ""
    kind: str = "lm"

    def __init__(self, model: Mapping[str, Any] | None = None, init_from: str | None = None,
                 adapter: Mapping[str, Any] | None = None, lr: float = 4e-4, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, lr_schedule: str = "cosine",
                 warmup_steps: float = 0, min_lr: float = 0.0, grad_clip: float | None = 1.0,
                 fused_adamw: bool | None = None, compile: bool = False, **kwargs: Any):
        super().__init__()
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown argument(s) {sorted(kwargs)}")
        # hparams go to the logger once, at the end, together with the final metrics (cli/train.py)
        self.save_hyperparameters(logger=False)
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
        """Apply the ``adapter`` config group (``adapter=lora``) to the backbone, after
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

    # ----------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on matrices of Linear layers only; biases, norms and
        embeddings (and a head tied to them) are not decayed."""
        no_decay_ids = {id(p) for m in self.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))
                        for p in m.parameters(recurse=False)}
        decay, no_decay, seen = [], [], set()
        for p in self.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
        # named groups: LearningRateMonitor logs lr-AdamW/decay and lr-AdamW/no_decay
        return [{"params": decay, "weight_decay": self.hparams.weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.parameter_groups()
        params = [p for g in groups for p in g["params"]]
        fused = hp.fused_adamw
        if fused is None:
            fused = bool(params) and all(p.is_cuda for p in params)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps, fused=fused)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        warmup = hp.warmup_steps
        warmup = int(warmup * total) if 0 < warmup < 1 else int(warmup)
        min_ratio = hp.min_lr / hp.lr if hp.lr else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, total, warmup, hp.lr_schedule, min_ratio))
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
