"""What every task shares: build (or load) the backbone, adapters, freezing, the optimizer node and
LR schedule (built by :mod:`gptlab.optim`), gradient clipping, tokens seen, optional
``torch.compile``, and what a checkpoint records about the task (reloading one:
:func:`gptlab.tasks.registry.load_task`). Also the bases of next-token tasks
(:class:`LanguageModelTask`) and of tasks trained on preference pairs (:class:`PairwiseTask`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
import torch.nn as nn
import torchmetrics
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from gptlab.callbacks import forget_step_grad_norm, step_grad_norm
from gptlab.checks import ConfigRules, Problem, boolean, choice, is_number, number, problem, raise_problems
from gptlab.errors import ConfigError
from gptlab.model.adapters import apply_adapter
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import save_adapter
from gptlab.optim import (LR_SCHEDULE_RULES, OPTIMIZER_RULES, WEIGHT_DECAY_ON, build_lr_scheduler, build_optimizer,
                          fold_legacy_keys, lr_schedule_config, optimizer_config, parameter_groups,
                          refuse_resume_changes, resume_changes)
from gptlab.tokenizer import check_same_tokenizer, get_tokenizer, tokenizer_from_record, tokenizer_record
from gptlab.weights.checkpoint import TOKENIZER_KEY, load_backbone

def validation_step_number(updates_done: int) -> int:
    """The step a validation after ``updates_done`` optimizer updates is shown at, on the console and
    in every logger: the 0-based index of the last update (the book's ``global_step``; Lightning's
    step of that update's training metrics), -1 before the first."""
    return updates_done - 1


class GPTTask(ConfigRules, L.LightningModule):
    """Base LightningModule around the shared :class:`GPT` backbone.

    Args:
        model: GPTConfig fields (a Hydra ``model`` node); with ``init_from`` they override the
            pretrained config (e.g. ``drop_rate``).
        init_from: start from pretrained weights: ``gpt2-small|gpt2-medium|gpt2-large|gpt2-xl``, a
            Hugging Face folder, a book-style state dict or a gptlab checkpoint.
        adapter: adapter settings (``adapter=lora``: ``name``, ``rank``, ``alpha``, ...) or None.
        optimizer: the optimizer node (``task.optimizer``): ``_target_`` (a ``torch.optim`` class,
            default ``torch.optim.AdamW``), ``_partial_: true`` and its arguments (``lr``, ``betas``,
            ``eps``, ``weight_decay``, ``fused``: null = fused where torch has the kernel, CUDA and
            CPU); None or a node without ``_target_`` = AdamW (:data:`gptlab.optim.DEFAULT_OPTIMIZER`,
            updated by the node). Kept as a plain dict; built in :meth:`configure_optimizers`.
        lr_schedule: ``name`` (``constant``, ``cosine``, ``linear``) after ``warmup_steps`` of linear
            warmup (an int, or a float < 1 read as a fraction of all steps), decaying to ``min_lr``.
        weight_decay_on: ``matrices`` (linear-layer weight matrices only) or ``all`` (every
            trainable parameter, the book); see :data:`gptlab.optim.WEIGHT_DECAY_ON`.
        grad_clip: clip the global gradient norm to this (None/0 = off). Done here rather than by
            the Trainer so fused AdamW keeps working under bf16-mixed.
        compile: run the forward passes through ``torch.compile`` (compiled once, on first use:
            :meth:`compiled`).
        tokenizer: the ``tiktoken.Encoding`` the task's text goes through (samples, generated
            answers, rewards), recorded in every checkpoint; None = the checkpoint's own when one is
            loaded, else GPT-2's. Not a hyperparameter: a checkpoint holds the tokenizer itself.

    Subclasses set ``task_name`` (their name in :data:`gptlab.tasks.registry.TASKS`, recorded in
    checkpoints and adapter files) and ``kind`` (what the model predicts: ``lm`` or ``classifier``;
    the inference loader checks it).
    """

    task_name: str = ""
    kind: str = "lm"
    RULES = {"weight_decay_on": choice(*WEIGHT_DECAY_ON, name="task.weight_decay_on"),
             "grad_clip": number(ge=0, optional=True), "compile": boolean(),
             **{f"optimizer.{k}": v for k, v in OPTIMIZER_RULES.items()},
             **{f"lr_schedule.{k}": v for k, v in LR_SCHEDULE_RULES.items()}}
    """The rules of the arguments every task takes (subclasses add theirs: :class:`~gptlab.checks.ConfigRules`)."""

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        found = super().check_relations(node)
        lr = (node.get("optimizer") or {}).get("lr")
        min_lr = (node.get("lr_schedule") or {}).get("min_lr")
        if is_number(lr) and is_number(min_lr) and lr > 0 and min_lr > lr:
            found.append(problem("lr_schedule.min_lr", min_lr, f"at most the peak {{node}}optimizer.lr={lr} "
                                                               "(the schedule decays to it)"))
        return found

    def __init__(self, model: Mapping[str, Any] | None = None, init_from: str | None = None,
                 adapter: Mapping[str, Any] | None = None, optimizer: Mapping[str, Any] | None = None,
                 lr_schedule: Mapping[str, Any] | None = None, weight_decay_on: str = "matrices",
                 grad_clip: float | None = 1.0, compile: bool = False, tokenizer: Any = None, **kwargs: Any):
        super().__init__()
        optimizer, lr_schedule = fold_legacy_keys(kwargs, optimizer, lr_schedule)
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown argument(s) {sorted(kwargs)}")
        # validated now, built in configure_optimizers; stored complete, as plain containers
        optimizer, lr_schedule = optimizer_config(optimizer), lr_schedule_config(lr_schedule)
        # hparams go to the logger once, at the end, together with the final metrics (cli/train.py);
        # they hold the arguments of every __init__ of the task's classes
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self._tokenizer = tokenizer
        self.hparams.optimizer, self.hparams.lr_schedule = optimizer, lr_schedule
        raise_problems(type(self).check_config(self.hparams), "task setting")  # before the backbone is built
        self.tokens_seen = 0  # input tokens trained on (pads included, as the book counts), all ranks
        self.examples_seen = 0
        self.model = self.build_backbone()
        self.configure_backbone()
        if adapter:
            self.apply_adapter(dict(adapter))
        self._compiled: dict[Any, Callable[..., Any]] = {}

    @property
    def tokenizer(self) -> Any:
        """The task's ``tiktoken.Encoding`` (GPT-2's unless one was given or a checkpoint loaded)."""
        return self._tokenizer if self._tokenizer is not None else get_tokenizer()

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
        n_train, n_total = self.trainable_parameter_count(), self.total_parameter_count()
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
    def compiled(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``fn``, or with ``compile=true`` its ``torch.compile`` (``options``: its keyword arguments),
        compiled on first use and kept for every later call."""
        if not self.hparams.compile:
            return fn
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, **options)
        return self._compiled[fn]

    def compute_loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """Scalar next-token loss of ``batch`` (``input_ids``, ``labels``): the mean over its target
        tokens, or their sum (``reduction="sum"``)."""
        return self.model.loss(batch["input_ids"], batch["labels"], reduction=reduction)

    def loss_fn(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """:meth:`compute_loss`, through :meth:`compiled`."""
        return self.compiled(self.compute_loss)(batch, reduction)

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

    def gather_rows(self, rows: list[Any]) -> list[Any]:
        """Every rank's ``rows`` (any picklable objects), concatenated in rank order, on every rank;
        ``rows`` itself on one process. Every rank must call it (a collective): for test-stage
        outputs and sample tables that rank 0 writes alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return list(rows)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, list(rows))
        return [row for part in gathered for row in part]

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
        total = self.schedule_steps() if self._trainer is not None else 1
        scheduler = build_lr_scheduler(optimizer, hp.lr_schedule, hp.optimizer["lr"], total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip = self.hparams.grad_clip or gradient_clip_val
        if clip:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = step_grad_norm(self, optimizer)  # the one NonFiniteGuard computed for this step, if it ran
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        forget_step_grad_norm(self)  # new gradients: the kept norm is stale

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain strings and dicts only: a checkpoint never names code to import (gptlab.weights.checkpoint)
        checkpoint["gptlab_task"] = self.task_name
        checkpoint["gptlab_kind"] = self.kind
        checkpoint["gptlab_model_config"] = self.model.config.to_dict()
        checkpoint[TOKENIZER_KEY] = tokenizer_record(self.tokenizer)
        checkpoint["gptlab_prediction"] = self.prediction_metadata()
        checkpoint["gptlab_progress"] = {"tokens_seen": self.tokens_seen, "examples_seen": self.examples_seen}
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            # the length the LR schedule was laid out for: a resume must not change it (see below)
            checkpoint["gptlab_schedule_steps"] = self.schedule_steps()

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
        recorded = tokenizer_from_record(checkpoint.get(TOKENIZER_KEY))
        if self._tokenizer is not None:  # resuming: the run's tokenizer must be the one the weights learned
            check_same_tokenizer(recorded, self._tokenizer, "the checkpoint", "the run's tokenizer")
        self._tokenizer = recorded

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # every validation point on the training curves' axis: Lightning logs the k-th update's training
        # metrics at step k - 1 (the book's global_step), a validation inside fit after k updates at k - 1
        # too, but a standalone one (validate_before_fit, the final one) at k; "step" sets it to k - 1
        # for all of them (-1: before the first update)
        self.log("step", float(validation_step_number(self.global_step)), on_step=False, on_epoch=True, batch_size=1,
                 sync_dist=True)  # the same on every rank: reducing it keeps Lightning quiet under DDP

    def on_validation_end(self) -> None:
        # after the loggers and the best-checkpoint callback used it: a checkpoint saved later by step
        # (StepCheckpoint's step<N>) must not read this validation's step from the callback metrics
        self.trainer.callback_metrics.pop("step", None)

    def on_train_start(self) -> None:
        self.check_resumed_schedule()  # strategies that restore the checkpoint after on_fit_start (FSDP)

    def schedule_steps(self) -> int:
        """The optimizer steps the LR schedule is laid out over: the run's (Lightning's estimate, one
        step per batch). A task that takes several optimizer steps per batch (PPO) says its own."""
        return int(self.trainer.estimated_stepping_batches)

    def check_resumed_schedule(self) -> None:
        """Refuse a resume whose LR schedule would not continue the checkpoint's: a warmup fraction or
        a decaying schedule is laid out over the run's total steps, so changing them (max_steps,
        max_epochs, the data or the batch size) would make the learning rate jump."""
        saved = getattr(self, "_resumed_schedule_steps", None)
        if saved is None:
            return
        self._resumed_schedule_steps = None
        total = self.schedule_steps()
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
        """Parameters the optimizer trains (a tied matrix counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters() if p.requires_grad}.values())

    def total_parameter_count(self) -> int:
        """Every parameter of the task's modules: the backbone and what the task adds beside it (PPO's
        value head), a tied matrix counted once; not a frozen reference copy (not a submodule)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


class LanguageModelTask(GPTTask):
    """What next-token tasks share (pretraining, instruction SFT): ``train/loss`` per step and
    epoch, and a token-weighted ``val/loss`` / ``val/ppl`` over the whole validation set.

    Under DDP the training loss is the mean over the target tokens of the GLOBAL batch (every
    rank's), as on one process with the same batch: each rank's token mean is scaled by its share
    of the global token count before DDP averages the gradients (one all-reduce of a count per
    step; ranks whose batches hold different numbers of unmasked tokens would otherwise weigh a
    token differently, and a rank without any would make the loss NaN). ``train/loss`` is then reduced over ranks (``sync_dist``).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.val_loss = torchmetrics.MeanMetric()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            # the sum over this rank's tokens (0, not NaN, when a rank's batch has none)
            total = self.trainer.strategy.reduce((batch["labels"] != -100).sum().float(), reduce_op="sum")
            loss = self.loss_fn(batch, "sum") * (world / total.clamp(min=1))
        else:
            loss = self.loss_fn(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
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


class StageMeans(nn.Module):
    """One ``MeanMetric`` per (stage, metric name): the mean over examples, not over batches, synced
    across ranks; logged as ``<stage>/<name>`` (names may hold slashes: ``rewards/chosen``).

    Call :meth:`reset` at the start of every epoch: the states are then created in that loop's grad
    mode (a ``validate()`` runs under inference mode, whose tensors a later fit's no-grad validation
    could not update in place).
    """

    def __init__(self, names: Sequence[str], stages: Sequence[str] = ("val", "test")):
        super().__init__()
        self.names = tuple(names)
        self.means = nn.ModuleDict({stage: nn.ModuleDict({_metric_key(n): torchmetrics.MeanMetric() for n in self.names})
                                    for stage in stages})

    def reset(self, stage: str) -> None:
        for metric in self.means[stage].values():
            metric.reset()

    def update(self, stage: str, values: Mapping[str, torch.Tensor], weight: int) -> None:
        for name, value in values.items():
            self.means[stage][_metric_key(name)].update(value.detach(), weight=weight)

    def log(self, module: L.LightningModule, stage: str, prog_bar: Sequence[str] = ()) -> None:
        """Log every metric that got values this epoch, then reset."""
        for name in self.names:
            metric = self.means[stage][_metric_key(name)]
            if metric.update_count:
                module.log(f"{stage}/{name}", metric.compute(), prog_bar=name in prog_bar, sync_dist=True)
            metric.reset()


def _metric_key(name: str) -> str:
    """A ModuleDict key for a metric name (no dots or slashes)."""
    return name.replace("/", "__").replace(".", "_")


class PairwiseTask(GPTTask):
    """What tasks trained on preference pairs share (DPO, the reward model): one dict of metrics per
    batch (:meth:`pair_metrics`, ``loss`` first), logged as ``train/<name>`` per step and epoch
    (means over every rank's pairs under DDP: the ranks' batches are equally large), and
    as example-weighted means over the whole validation / test set (``val/<name>``, ``test/<name>``).

    Subclasses set :attr:`metrics` (the names :meth:`pair_metrics` returns) and :attr:`progress_bar`.
    """

    metrics: tuple[str, ...] = ("loss",)
    progress_bar: tuple[str, ...] = ("loss",)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.eval_metrics = StageMeans(self.metrics)

    def pair_metrics(self, batch: Mapping[str, Any], split: str) -> dict[str, torch.Tensor]:
        """The loss (mean over the batch's pairs) and the task's metrics of one batch of ``split``."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        metrics = self.pair_metrics(batch, "train")
        B = batch["chosen_input_ids"].size(0)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=B,
                     prog_bar=name in self.progress_bar, sync_dist=True)
        return metrics["loss"]

    def _accumulate(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        self.eval_metrics.update(stage, self.pair_metrics(batch, stage), weight=batch["chosen_input_ids"].size(0))

    def on_validation_epoch_start(self) -> None:
        self.eval_metrics.reset("val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._accumulate("val", batch)

    def on_validation_epoch_end(self) -> None:
        self.eval_metrics.log(self, "val", prog_bar=self.progress_bar)

    def on_test_epoch_start(self) -> None:
        self.eval_metrics.reset("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._accumulate("test", batch)

    def on_test_epoch_end(self) -> None:
        self.eval_metrics.log(self, "test")
