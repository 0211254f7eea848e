"""Supervised instruction fine-tuning (book chapter 7): next-token loss on prompt/response
sequences, and at test time a generated response for every test entry, written to
``responses.json`` in the run folder (the input of ``gptlab-judge``)."""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics

from gptlab.tasks.base import LanguageModelTask
from gptlab.tasks.mixins import ResponseGenerationMixin


class InstructionTask(ResponseGenerationMixin, LanguageModelTask):
    """SFT on ``{"input_ids", "labels", "attention_mask"}`` batches (``labels`` = -100 where
    ignored: padding and, with ``data.mask_prompt``, the prompt).

    Logs ``train/loss``, ``val/loss``, ``val/ppl`` and ``test/loss``. In the test stage every test
    batch (which also carries left-padded ``prompt_ids``, ``prompt_attention_mask`` and the raw
    ``entries``) is answered by batched KV-cache generation; the answers are written to
    ``<run dir>/<responses_file>`` as the entries plus ``model_response``, and the first
    ``log_examples`` go to TensorBoard as text (:class:`~gptlab.tasks.mixins.ResponseGenerationMixin`).

    Args:
        prompt_style: the data's prompt style (used to cut the generated text into a response).
        generate_on_test: generate responses in the test stage (False: only ``test/loss``).
        max_new_tokens, temperature, top_k, top_p: generation settings (temperature 0 = greedy);
            generation stops at ``<|endoftext|>``.
        responses_file: file name inside the run folder (``trainer.default_root_dir``).
        log_examples: how many test responses to log to TensorBoard.
        **kwargs: :class:`GPTTask` arguments (model, init_from, optimizer, ...).
    """

    task_name = "instruct"

    def __init__(self, prompt_style: str = "alpaca", generate_on_test: bool = True, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 responses_file: str = "responses.json", log_examples: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        self.test_loss = torchmetrics.MeanMetric()
        self.reset_responses()

    # ----------------------------------------------------------------- test: loss + responses
    def on_test_epoch_start(self) -> None:
        self.reset_responses()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.loss_fn(batch)
        self.test_loss.update(loss, weight=(batch["labels"] != -100).sum())
        if self.hparams.generate_on_test:
            self.collect_responses(batch)

    def on_test_epoch_end(self) -> None:
        if self.test_loss.update_count:
            loss = self.test_loss.compute()
            self.test_loss.reset()
            self.log("test/loss", loss, sync_dist=True)
            self.log("test/ppl", torch.exp(loss), sync_dist=True)
        if self.hparams.generate_on_test:
            self.flush_responses()
