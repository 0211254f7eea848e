"""Next-token pretraining: cross-entropy, perplexity, and a text sample at every validation."""

from __future__ import annotations

from typing import Any

import torch

from gptlab.checks import boolean, text
from gptlab.model.generation import SAMPLING_RULES, generate
from gptlab.tasks.base import LanguageModelTask


class PretrainTask(LanguageModelTask):
    """Language-model pretraining on ``{"input_ids", "labels"}`` batches.

    Logs ``train/loss``, ``train/tokens_seen``, ``val/loss`` and ``val/ppl``; after each validation
    it continues ``sample_prompt`` and logs the text to TensorBoard (``samples``).

    Args:
        sample_prompt: the text continued after every validation (None = no samples).
        sample_max_new_tokens, sample_temperature, sample_top_k: its generation settings.
        sample_stop_at_eos: stop before ``<|endoftext|>`` (the book's ``generate(eos_id=50256)``;
            the text never shows the token); False = always ``sample_max_new_tokens`` tokens, as the
            book's chapter-5 ``generate_text_simple``.
        **kwargs: :class:`GPTTask` arguments (model, init_from, optimizer, ...).
    """

    task_name = "pretrain"
    RULES = {"sample_prompt": text(nonempty=False, optional=True), "sample_stop_at_eos": boolean(),
             **{f"sample_{k}": SAMPLING_RULES[k] for k in ("max_new_tokens", "temperature", "top_k")}}

    def __init__(self, sample_prompt: str | None = "Every effort moves you", sample_max_new_tokens: int = 40,
                 sample_temperature: float = 0.0, sample_top_k: int | None = None, sample_stop_at_eos: bool = True,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.last_sample: str | None = None

    def on_validation_epoch_end(self) -> None:
        logged = self.val_loss.update_count > 0
        super().on_validation_epoch_end()
        if logged and self.hparams.sample_prompt and not self.trainer.sanity_checking:
            self.log_sample()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self.loss_fn(batch)
        self.log("test/loss", loss, on_epoch=True)

    def log_sample(self) -> str:
        """Continue ``sample_prompt`` with the current weights; log and return the text."""
        tok = self.tokenizer
        eot = tok.eot_token
        ids = torch.tensor(tok.encode(self.hparams.sample_prompt), device=self.device)
        stop = self.hparams.sample_stop_at_eos
        out = generate(self.model, ids, self.hparams.sample_max_new_tokens,
                       temperature=self.hparams.sample_temperature, top_k=self.hparams.sample_top_k,
                       eos_id=eot if stop else None).tolist()
        if stop and eot in out[len(ids):]:  # generate() keeps the end-of-text token; the book stops before it
            out = out[:len(ids) + out[len(ids):].index(eot)]
        text = tok.decode(out)
        self.last_sample = text
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            experiment.add_text("samples", text, global_step=self.global_step)
        return text
