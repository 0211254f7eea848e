"""Sequence classification (book chapter 6; with ``adapter=lora`` appendix E): the GPT backbone
with its language-model head swapped for a ``num_classes`` linear layer, read at the last real
token of every (right-padded) text (``pooling="last_token"``), or at the last position as the book
does (``last_position``, the ``ch06_*``/``appE_*`` presets).

Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` and
``test/f1``; at the end of the test stage the confusion matrix goes to TensorBoard as a figure
(``test/confusion_matrix``, needs matplotlib) and to ``<run dir>/confusion_matrix.{json,txt}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gptlab.checks import Problem, choice, integer, is_int, problem, strings, text
from gptlab.inference import predict_texts
from gptlab.model.heads import POOLINGS, class_logits
from gptlab.tasks.base import GPTTask

TRAINABLE = ("head", "last_block", "last_n_blocks", "all")
"""What trains (without an adapter): ``head`` the new head only; ``last_block`` the last transformer
block, the final norm and the head (the book); ``last_n_blocks`` the same with the last
``trainable_blocks`` blocks; ``all`` every parameter."""


F1_AVERAGES = ("auto", "binary", "macro", "micro", "weighted")


class ClassificationTask(GPTTask):
    """Text classification on ``{"input_ids", "attention_mask", "label"}`` batches.

    Args:
        num_classes: size of the new head; None = ``len(labels)``.
        labels: class names in id order (``[ham, spam]``), kept in the checkpoint for
            ``gptlab-classify``; None = taken from the data module at fit time.
        pooling: ``last_token`` | ``last_position`` (the book) | ``mean`` (see
            :data:`gptlab.model.heads.POOLINGS`).
        trainable: ``head`` | ``last_block`` | ``last_n_blocks`` | ``all`` (see :data:`TRAINABLE`).
            With ``adapter=lora`` the adapter decides instead: LoRA weights (+ ``train_extra``) train.
        trainable_blocks: k for ``last_n_blocks``.
        max_length: the longest text (tokens) the classifier was trained on, stored for prediction;
            None = the data module's ``max_length`` at fit time.
        f1_average: ``auto`` (binary F1 of class 1 for two classes, else macro), ``binary``,
            ``macro``, ``micro`` or ``weighted``.
        confusion_matrix_file: JSON file in the run folder (a ``.txt`` table is written beside it).
        **kwargs: :class:`GPTTask` arguments (model, init_from, adapter, optimizer, ...).
    """

    task_name = "classify"
    kind = "classifier"
    RULES = {"num_classes": integer(ge=2, optional=True), "labels": strings(optional=True, unique=True),
             "pooling": choice(*POOLINGS, name="pooling"), "trainable": choice(*TRAINABLE, name="trainable"),
             "trainable_blocks": integer(ge=1), "max_length": integer(ge=1, optional=True),
             "f1_average": choice(*F1_AVERAGES, name="f1_average"), "confusion_matrix_file": text()}

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        found = super().check_relations(node)
        labels, n = node.get("labels"), node.get("num_classes")
        if isinstance(labels, (list, tuple)) and is_int(n) and len(labels) != n:
            found.append(problem("num_classes", n, f"{len(labels)}, the number of {{node}}labels={list(labels)}",
                                 f"num_classes={n} but {len(labels)} labels {list(labels)}"))
        if labels is None and n is None:
            found.append(Problem("{node}num_classes=None, {node}labels=None: expected one of them (e.g. "
                                 "{node}num_classes=2)", "ClassificationTask needs num_classes or labels "
                                                          "(e.g. task.num_classes=2)"))
        classes = len(labels) if isinstance(labels, (list, tuple)) else n
        if node.get("f1_average") == "binary" and is_int(classes) and classes != 2:
            found.append(problem("f1_average", "binary", f"another average for {classes} classes (binary needs 2)",
                                 f"f1_average=binary needs 2 classes, got {classes}"))
        return found

    def __init__(self, num_classes: int | None = None, labels: Sequence[str] | None = None,
                 pooling: str = "last_token", trainable: str = "last_block", trainable_blocks: int = 1,
                 max_length: int | None = None, f1_average: str = "auto",
                 confusion_matrix_file: str = "confusion_matrix.json", **kwargs: Any):
        super().__init__(**kwargs)
        n = self.num_classes
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.test_acc = torchmetrics.classification.MulticlassAccuracy(n, average="micro")
        self.val_loss, self.test_loss = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
        average = f1_average if f1_average != "auto" else ("binary" if n == 2 else "macro")
        if average == "binary":
            self.test_f1 = torchmetrics.classification.BinaryF1Score()
        else:
            self.test_f1 = torchmetrics.classification.MulticlassF1Score(n, average=average)
        self.test_confusion = torchmetrics.classification.MulticlassConfusionMatrix(n)
        self.confusion_matrix: list[list[int]] | None = None

    @property
    def num_classes(self) -> int:
        hp = self.hparams
        return int(hp.num_classes) if hp.num_classes is not None else len(hp.labels)

    @property
    def label_names(self) -> list[str]:
        labels = self.hparams.labels
        return list(labels) if labels else [str(i) for i in range(self.num_classes)]

    # ----------------------------------------------------------------- backbone surgery
    def configure_backbone(self) -> None:
        """Swap the LM head for a ``num_classes`` classifier (with a bias, as in the book), then
        set ``requires_grad`` by ``trainable``; an adapter applied next can target the new head."""
        D = self.model.config.emb_dim
        old = self.model.out_head
        self.model.out_head = nn.Linear(D, self.num_classes, device=old.weight.device, dtype=old.weight.dtype)
        for p in self.model.parameters():
            p.requires_grad_(self.hparams.trainable == "all")
        for module in self.trainable_modules():
            for p in module.parameters():
                p.requires_grad_(True)

    def trainable_modules(self) -> list[nn.Module]:
        """The modules the ``trainable`` policy unfreezes."""
        m, hp = self.model, self.hparams
        if hp.trainable == "all":
            return [m]
        modules: list[nn.Module] = [m.out_head]
        if hp.trainable in ("last_block", "last_n_blocks"):
            k = 1 if hp.trainable == "last_block" else int(hp.trainable_blocks)
            if not 1 <= k <= len(m.blocks):
                raise ValueError(f"trainable_blocks={k} must be between 1 and n_layers={len(m.blocks)}")
            modules += [*m.blocks[-k:], m.final_norm]
        return modules

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes) for ``input_ids`` (B, T) (right-padded; mask 1 = real)."""
        return class_logits(self.model, input_ids, attention_mask, self.hparams.pooling)

    def logits_fn(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`forward` on a batch, through :meth:`compiled`."""
        return self.compiled(self.forward)(batch["input_ids"], batch.get("attention_mask"))

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of a batch's class logits and its ``label``."""
        return F.cross_entropy(self.logits_fn(batch), batch["label"])

    # ----------------------------------------------------------------- fit
    def setup(self, stage: str) -> None:
        """Take the class names and the padded length from the data module when not configured,
        so the checkpoint holds what ``gptlab-classify`` needs."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "label_names", None)
        if names is not None:
            if self.hparams.labels is None:
                if len(names) != self.num_classes:
                    raise ValueError(f"the data has {len(names)} classes {names}; task.num_classes={self.num_classes}")
                self.hparams.labels = list(names)
            elif list(self.hparams.labels) != list(names):
                raise ValueError(f"task.labels={list(self.hparams.labels)} differ from the data's labels {names}")
        if self.hparams.max_length is None and isinstance(getattr(dm, "max_length", None), int):
            self.hparams.max_length = dm.max_length

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.logits_fn(batch)
        loss = F.cross_entropy(logits, batch["label"])
        self.train_acc(logits.argmax(dim=-1), batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log_progress(batch)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.logits_fn(batch)
        y = batch["label"]
        self.val_loss.update(F.cross_entropy(logits, y), weight=y.numel())  # mean over examples
        self.val_acc.update(logits.argmax(dim=-1), y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    # ----------------------------------------------------------------- test
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.logits_fn(batch)
        y = batch["label"]
        preds = logits.argmax(dim=-1)
        self.test_loss.update(F.cross_entropy(logits, y), weight=y.numel())
        self.test_acc.update(preds, y)
        self.test_f1.update(preds, y)
        self.test_confusion.update(preds, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)
        self.log("test/f1", self.test_f1, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        if self.test_confusion.update_count == 0:
            return
        matrix = self.test_confusion.compute().cpu()  # (C, C): rows true, columns predicted
        self.test_confusion.reset()
        self.confusion_matrix = matrix.tolist()
        if self.trainer.is_global_zero:
            self.write_confusion_matrix(matrix)
            self.log_confusion_figure(matrix)

    def write_confusion_matrix(self, matrix: torch.Tensor) -> Path:
        """``matrix`` as JSON (labels, counts, per-class recall) and as a text table in the run folder."""
        path = Path(self.trainer.default_root_dir) / self.hparams.confusion_matrix_file
        path.parent.mkdir(parents=True, exist_ok=True)
        labels, counts = self.label_names, matrix.tolist()
        total = int(matrix.sum())
        recall = {name: (row[i] / sum(row) if sum(row) else None) for i, (name, row) in enumerate(zip(labels, counts))}
        doc = json.dumps({"labels": labels, "rows": "true label", "columns": "predicted label", "matrix": "@",
                          "n": total, "accuracy": float(matrix.diagonal().sum()) / max(1, total),
                          "recall": recall}, indent=2)
        rows = ",\n    ".join(json.dumps(row) for row in counts)  # one matrix row per line
        path.write_text(doc.replace('"@"', f"[\n    {rows}\n  ]") + "\n", encoding="utf-8")
        width = max(8, *(len(n) + 2 for n in labels))
        lines = ["rows: true label, columns: predicted label", " " * width + "".join(f"{n:>{width}}" for n in labels)]
        lines += [f"{name:<{width}}" + "".join(f"{c:>{width}}" for c in row) for name, row in zip(labels, counts)]
        path.with_suffix(".txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        rank_zero_info(f"confusion matrix written to {path}:\n" + "\n".join(lines))
        return path

    def log_confusion_figure(self, matrix: torch.Tensor) -> None:
        """The confusion matrix as an image to every logger that takes one (TensorBoard)."""
        loggers = [lg for lg in self.loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
        if not loggers:
            return
        try:
            image = confusion_matrix_image(matrix, self.label_names)
        except ImportError:
            rank_zero_warn("matplotlib is not installed: no confusion-matrix figure in TensorBoard "
                           "(pip install 'gptlab[plot]'); the matrix is in the run folder")
            return
        for lg in loggers:
            lg.experiment.add_image("test/confusion_matrix", image, global_step=self.global_step, dataformats="HWC")

    # ----------------------------------------------------------------- prediction
    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Class probabilities (N, num_classes) of raw ``texts``, truncated to ``max_length``."""
        was_training = self.training
        self.eval()
        try:
            return predict_texts(self.model, texts, self.hparams.pooling, self.hparams.max_length, batch_size,
                                 tokenizer=self.tokenizer, progress=progress)
        finally:
            self.train(was_training)

    def prediction_metadata(self) -> dict[str, Any]:
        """What ``gptlab-classify`` needs (labels, pooling, max_length), also in adapter files, so
        ``gptlab-classify init_from=... adapter_path=...`` works without the checkpoint."""
        hp = self.hparams
        return {"labels": self.label_names, "num_classes": self.num_classes, "pooling": hp.pooling,
                "max_length": hp.max_length}


def confusion_matrix_image(matrix: torch.Tensor, labels: Sequence[str]) -> Any:
    """An (H, W, 3) uint8 numpy image of the confusion matrix: counts in the cells, rows = true label.
    Draws with matplotlib's Agg canvas (no pyplot, no display); raises ImportError without it."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = matrix.numpy()
    n = len(labels)
    fig = Figure(figsize=(1.2 + 0.9 * n, 1.0 + 0.9 * n), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), labels=list(labels))
    ax.set_yticks(range(n), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = m.max() / 2 if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center",
                    color="white" if m[i, j] > threshold else "black")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
