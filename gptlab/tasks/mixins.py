"""Pieces of LightningModules that several tasks mix in: test-stage answers written to
``responses.json`` (instruction tuning, DPO, PPO) and the reference model of DPO and PPO (and GRPO)
with its checkpoint state. Mix them in before the task's base class."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info

from gptlab.alignment.reference import CHECKPOINT_KEY, Reference
from gptlab.checks import Problem, boolean, choice, integer, problem, text
from gptlab.data.prompt_styles import PROMPT_STYLES, format_input
from gptlab.inference import generate_answers
from gptlab.model.generation import SAMPLING_RULES


class ResponseGenerationMixin:
    """Test-stage answers for a task whose test batches carry left-padded ``prompt_ids`` /
    ``prompt_attention_mask``, the entries' ``index`` and the raw ``entries``: batched KV-cache
    generation, gathered over ranks, written to ``<run dir>/<responses_file>`` as the entries plus
    ``model_response``, the first ``log_examples`` logged to TensorBoard as text.

    Reads the task's hparams ``prompt_style``, ``max_new_tokens``, ``temperature``, ``top_k``,
    ``top_p``, ``responses_file`` and ``log_examples``; mix in before the task's base class.
    """

    responses_path: Path | None = None
    RULES = {"prompt_style": choice(*PROMPT_STYLES, name="prompt style"), "generate_on_test": boolean(),
             "responses_file": text(), "log_examples": integer(ge=0), **SAMPLING_RULES}

    def prediction_metadata(self) -> dict[str, Any]:
        """The prompt style, so the tuned model is prompted the way it was trained (``gptlab-chat``)."""
        return {"prompt_style": self.hparams.prompt_style}

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


class ReferenceMixin:
    """The reference model of a task that tunes a policy against one (DPO, PPO, GRPO): a
    :class:`gptlab.alignment.reference.Reference` in :attr:`reference`, moved and cast with the task,
    built from the starting weights before a checkpoint is restored, marked stale by the first
    optimizer step, and saved in checkpoints under :data:`~gptlab.alignment.reference.CHECKPOINT_KEY`
    (older checkpoints' keys load too).

    The task calls :meth:`init_reference` in its ``__init__`` (after the backbone exists) and
    :meth:`build_reference` where it sets up for training.
    """

    reference: Reference

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        found = super().check_relations(node)
        if node.get("reference") == "adapters_off" and not node.get("adapter"):
            others = [m for m in cls.config_rules()["reference"].options if m not in ("auto", "adapters_off")]
            why = (f"without one the policy has nothing to switch off; use reference="
                   f"{' or reference='.join(others)}")
            found.append(problem("reference", "adapters_off", f"an adapter (adapter=lora): {why}",
                                 f"task.reference=adapters_off needs an adapter (adapter=lora): {why}"))
        return found

    def init_reference(self, mode: str, logps_tag: str | None = None) -> None:
        """A reference of ``mode`` (``auto``: ``adapters_off`` with an adapter, else ``copy``)."""
        self.reference = Reference(Reference.resolve(mode, bool(self.hparams.adapter)), logps_tag)

    @property
    def reference_mode(self) -> str:
        """``copy``, ``adapters_off`` or ``precomputed`` (``auto`` resolved)."""
        return self.reference.mode

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen copy (``copy`` mode, once built), else None."""
        return self.reference.model

    def build_reference(self) -> None:
        """The frozen copy of the policy as it is now (``copy`` mode). Before a checkpoint is
        restored, so the copy holds the STARTING weights, never trained ones."""
        self.reference.build(self.model)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # .to(device) / .half() / precision plugins reach the reference copy too
        super()._apply(fn, *args, **kwargs)
        if "reference" in self.__dict__:
            self.reference.apply_(fn, *args, **kwargs)
        return self

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.reference.policy_trained = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # a copy built from scratch cannot be rebuilt from init_from on resume: it goes in the file
        state = self.reference.state_dict(keep_model=not self.hparams.init_from)
        if len(state) > 1:
            checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reference.load_state_dict(Reference.checkpoint_state(checkpoint), self.model)


__all__ = ["ResponseGenerationMixin", "ReferenceMixin"]
