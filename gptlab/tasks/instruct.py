"""Supervised instruction fine-tuning (book chapter 7): next-token loss on prompt/response
sequences, and at test time a generated response for every test entry, written to
``responses.json`` in the run folder (the input of ``gptlab-judge``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info

from gptlab.data.instruct import extract_response, format_input, get_prompt_style, left_pad
from gptlab.model.generation import generate
from gptlab.tasks.base import LanguageModelTask
from gptlab.tokenizer import get_tokenizer


@torch.no_grad()
def generate_answers(model: torch.nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                     prompt_style: str = "alpaca", max_new_tokens: int = 256, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, tokenizer: Any = None) -> list[str]:
    """Answers to a left-padded batch of prompts (B, T): batched KV-cache generation (greedy at
    temperature 0), stopped at ``<|endoftext|>``, cut at the prompt style's stop markers, decoded
    with ``tokenizer`` (the model's ``tiktoken.Encoding``; None = GPT-2's)."""
    tok = tokenizer or get_tokenizer()
    eot = tok.eot_token
    out = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eot, attention_mask=attention_mask)
    new = out[:, prompt_ids.size(1):].tolist()  # the prompt is stripped by position
    answers = []
    for ids in new:
        ids = ids[: ids.index(eot)] if eot in ids else ids
        answers.append(extract_response(tok.decode(ids), prompt_style))
    return answers


def answer_entries(model: torch.nn.Module, entries: Sequence[Mapping[str, Any]], prompt_style: str = "alpaca",
                   max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                   top_p: float | None = None, batch_size: int = 8, max_prompt_length: int | None = None,
                   progress: bool = False, tokenizer: Any = None) -> list[str]:
    """Answers to every entry's instruction (+ input) in ``prompt_style``, generated in batches of
    ``batch_size`` left-padded prompts exactly as the test stage of a training run does
    (``tokenizer``: the model's; None = GPT-2's)."""
    from tqdm.auto import tqdm

    style = get_prompt_style(prompt_style)
    tok = tokenizer or get_tokenizer()
    device = next(model.parameters()).device
    answers: list[str] = []
    with tqdm(total=len(entries), unit="entry", desc="generating", disable=not progress) as bar:
        for start in range(0, len(entries), batch_size):
            part = entries[start:start + batch_size]
            ids, mask = left_pad(tok.encode_ordinary_batch([style.prompt(e) for e in part]), tok.eot_token,
                                 max_prompt_length)
            answers += generate_answers(model, ids.to(device), mask.to(device), prompt_style, max_new_tokens,
                                        temperature, top_k, top_p, tok)
            bar.update(len(part))
    return answers


class ResponseGenerationMixin:
    """Test-stage answers for a task whose test batches carry left-padded ``prompt_ids`` /
    ``prompt_attention_mask``, the entries' ``index`` and the raw ``entries``: batched KV-cache
    generation, gathered over ranks, written to ``<run dir>/<responses_file>`` as the entries plus
    ``model_response``, the first ``log_examples`` logged to TensorBoard as text.

    Reads the task's hparams ``prompt_style``, ``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``, ``responses_file`` and ``log_examples``; mix in before the task's base class.
    """

    responses_path: Path | None = None

    def reset_responses(self) -> None:
        self._responses: list[tuple[int, dict[str, Any]]] = []

    def collect_responses(self, batch: dict[str, Any]) -> None:
        """Answer every prompt of a test ``batch`` and keep the answers for :meth:`flush_responses`."""
        if "prompt_ids" not in batch:
            raise ValueError("test batches carry no 'prompt_ids'/'entries'; use a gptlab data module whose "
                             "test_dataloader adds them (data=instruct, data=preference)")
        answers = self.generate_responses(batch["prompt_ids"], batch["prompt_attention_mask"])
        for i, entry, answer in zip(batch["index"].tolist(), batch["entries"], answers):
            self._responses.append((i, {**entry, "model_response": answer}))

    def generate_responses(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        """:func:`generate_answers` with the task's generation settings."""
        hp = self.hparams
        return generate_answers(self.model, prompt_ids, attention_mask, hp.prompt_style, hp.max_new_tokens,
                                hp.temperature, hp.top_k, hp.top_p, self.tokenizer)

    def flush_responses(self) -> None:
        """Gather the collected answers from every rank, write them in test-set order, log examples."""
        responses = getattr(self, "_responses", [])
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, responses)
            responses = [r for part in gathered for r in part]
        # entries in test-set order; a DistributedSampler may have repeated a few to even out ranks
        ordered = [entry for _, entry in sorted(dict(responses).items())]
        self.reset_responses()
        if self.trainer.is_global_zero:
            self.responses_path = self.write_responses(ordered)
            self.log_examples(ordered)

    def write_responses(self, responses: list[dict[str, Any]]) -> Path:
        """``responses`` as JSON in the run folder; returns the path."""
        path = Path(self.trainer.default_root_dir) / self.hparams.responses_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(responses, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
        rank_zero_info(f"{len(responses)} test responses written to {path} "
                       f"(score them with: gptlab-judge responses={path})")
        return path

    def log_examples(self, responses: list[dict[str, Any]]) -> None:
        """The first ``log_examples`` responses to TensorBoard (``test/responses``)."""
        n = self.hparams.log_examples
        experiment = getattr(self.logger, "experiment", None)
        if not n or not hasattr(experiment, "add_text"):
            return
        blocks = []
        for entry in responses[:n]:
            reference = entry.get("output", entry.get("chosen", ""))
            blocks.append("\n\n".join([
                "**Prompt**\n\n```\n" + format_input(entry, self.hparams.prompt_style) + "\n```",
                "**Correct response**\n\n```\n" + reference + "\n```",
                "**Model response**\n\n```\n" + entry["model_response"] + "\n```"]))
        experiment.add_text("test/responses", "\n\n---\n\n".join(blocks), global_step=self.global_step)


class InstructionTask(ResponseGenerationMixin, LanguageModelTask):
    """SFT on ``{"input_ids", "labels", "attention_mask"}`` batches (``labels`` = -100 where
    ignored: padding and, with ``data.mask_prompt``, the prompt).

    Logs ``train/loss``, ``val/loss``, ``val/ppl`` and ``test/loss``. In the test stage every test
    batch (which also carries left-padded ``prompt_ids``, ``prompt_attention_mask`` and the raw
    ``entries``) is answered by batched KV-cache generation; the answers are written to
    ``<run dir>/<responses_file>`` as the entries plus ``model_response``, and the first
    ``log_examples`` go to TensorBoard as text (:class:`ResponseGenerationMixin`).

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
        get_prompt_style(prompt_style)
        self.test_loss = torchmetrics.MeanMetric()
        self.reset_responses()

    def prediction_metadata(self) -> dict[str, Any]:
        """The prompt style, so ``gptlab-chat`` wraps instructions the way the model was trained."""
        return {"prompt_style": self.hparams.prompt_style}

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
