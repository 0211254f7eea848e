"""Pieces of LightningModules that several tasks mix in: test-stage answers written to
``responses.json`` (instruction tuning, DPO, PPO), the reference model of DPO, PPO and GRPO with its
checkpoint state, and what the online RL tasks (PPO, GRPO) share: reward functions kept out of
checkpoints, prompts cropped to fit, completions sampled and decoded for the rewards, and the sample
table. Mix them in before the task's base class."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gptlab.alignment.reference import CHECKPOINT_KEY, Reference
from gptlab.alignment.rollout import Completions, sample_completions
from gptlab.checks import Problem, boolean, choice, integer, problem, text
from gptlab.data.prompt_styles import PROMPT_STYLES, format_input
from gptlab.inference import generate_answers
from gptlab.model.generation import SAMPLING_RULES
from gptlab.rewards import call_reward
from gptlab.tokenizer import get_tokenizer


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
        responses = self.gather_rows(getattr(self, "_responses", []))
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


class OnlineRLMixin:
    """What the online RL tasks (PPO, GRPO) share around their rollouts.

    * Reward functions in :attr:`reward_fns` (name -> callable, built by Hydra from the run's config):
      never submodules, never in a checkpoint, moved to the task's device when fitting or testing.
    * :meth:`sample`: prompts cropped to ``context_length − max_new_tokens``, then
      ``num_generations`` completions each through the batched KV-cache generation.
    * :meth:`decoded`: the texts and ids a reward function reads (TRL's keyword convention, see
      :mod:`gptlab.rewards`), one row per completion; :meth:`call_rewards` calls each function.
    * :meth:`log_text_table`: a markdown table to every logger that takes text.

    Reads the hparams ``max_new_tokens``, ``top_k``, ``top_p``, ``stop_token_id``, ``generation_cache``.
    """

    reward_fns: dict[str, Callable[..., Any]]
    _warned_crop = False

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per batch of prompts (PPO: epochs × minibatches; GRPO: ``num_iterations``)."""
        raise NotImplementedError

    def schedule_steps(self) -> int:
        """The run's optimizer steps, the unit ``trainer.max_steps`` and the LR schedule count in:
        iterations (prompt batches × epochs) × :attr:`steps_per_iteration`, at most ``max_steps``.
        (Lightning's estimate mixes units under manual optimisation: batches, capped by max_steps.)
        The task steps its scheduler after every optimizer step, the unit this sizes it in."""
        trainer = self.trainer
        estimate = trainer.estimated_stepping_batches  # also loads the training data, so its length is known
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if epochs == -1 or math.isinf(batches):
            return int(estimate)  # no epoch limit: max_steps alone (optimizer steps)
        steps = int(batches) * max(epochs, 1) * self.steps_per_iteration
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("reward_fn", "reward_fns"):  # a reward model must not become a submodule (nor be saved)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def move_rewards(self) -> None:
        for fn in getattr(self, "reward_fns", {}).values():
            if hasattr(fn, "to"):
                fn.to(self.device)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.move_rewards()

    def on_test_start(self) -> None:
        self.move_rewards()

    def optimizer_step(self, loss: torch.Tensor, optimizer: Any, scheduler: Any) -> None:
        """One manual optimizer step on ``loss``: backward, GPTTask's clipping (its norm is the one
        NonFiniteGuard reuses), the step, and the scheduler (stepped per optimizer step: the unit
        :meth:`schedule_steps` sizes it in)."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.configure_gradient_clipping(optimizer, self.hparams.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    def crop_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the last ``context_length − max_new_tokens`` prompt positions, so prompt + completion fit."""
        keep = self.model.config.context_length - self.hparams.max_new_tokens
        if prompt_ids.size(1) <= keep:
            return prompt_ids, prompt_mask
        if not self._warned_crop:
            rank_zero_warn(f"prompts of {prompt_ids.size(1)} tokens + max_new_tokens={self.hparams.max_new_tokens} "
                           f"exceed context_length={self.model.config.context_length}: prompts keep their last "
                           f"{keep} tokens (set data.max_prompt_length to choose)")
            self._warned_crop = True
        return prompt_ids[:, -keep:], prompt_mask[:, -keep:]

    def sample(self, batch: Mapping[str, Any], temperature: float, num_generations: int = 1,
               generator: torch.Generator | None = None) -> Completions:
        """``num_generations`` sampled completions (temperature 0 = greedy) of every prompt of ``batch``,
        G rows per prompt, drawn from ``generator`` (an iteration's
        :func:`~gptlab.alignment.rollout.rollout_generator`: its own seed per rank; None: the global RNG)."""
        hp = self.hparams
        prompt_ids, prompt_mask = self.crop_prompts(batch["prompt_ids"], batch["prompt_attention_mask"])
        return sample_completions(self.model, prompt_ids, prompt_mask, hp.max_new_tokens, temperature, hp.top_k,
                                  hp.top_p, hp.stop_token_id, hp.generation_cache, num_generations,
                                  generator=generator)

    def decoded(self, batch: Mapping[str, Any], sampled: Completions, num_generations: int = 1) -> dict[str, list[Any]]:
        """The reward functions' keyword arguments, one row per completion: ``prompts`` (the batch's
        texts, repeated per completion), ``completions`` (decoded with the task's tokenizer, without
        the stop token), ``prompt_ids``, ``completion_ids`` (unpadded) and ``entries`` (the data
        entries, repeated)."""
        tok = getattr(self, "tokenizer", None) or get_tokenizer()
        completion_ids = sampled.completion_ids()
        prompt_lists = sampled.prompt_id_lists()
        repeat = lambda rows: [r for r in rows for _ in range(num_generations)]  # noqa: E731
        prompts = repeat(batch["prompts"]) if batch.get("prompts") else [tok.decode(p) for p in prompt_lists]
        entries = repeat(batch["entries"]) if batch.get("entries") else [{} for _ in completion_ids]
        return {"prompts": prompts, "completions": [tok.decode(ids) for ids in completion_ids],
                "prompt_ids": prompt_lists, "completion_ids": completion_ids, "entries": entries}

    def call_rewards(self, texts: Mapping[str, list[Any]]) -> dict[str, torch.Tensor]:
        """Every reward function's scores (N,) float32 on the task's device, by name
        (:func:`gptlab.rewards.call_reward`: a failing function is named, with the sample)."""
        return {name: call_reward(fn, name=name, **texts).to(self.device) for name, fn in self.reward_fns.items()}

    def log_text_table(self, tag: str, header: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A markdown table (``header``, ``rows`` of cells; text cells cut and escaped) to every logger
        that takes text (TensorBoard: the TEXT tab), written by rank zero with every rank's rows (rank
        0's first) and a ``rank`` column. Every rank calls it (the rows are gathered)."""
        rows = self.gather_rows([(*row, self.global_rank) for row in rows])
        header = (*header, "rank")
        writers = [lg.experiment for lg in self.loggers if hasattr(getattr(lg, "experiment", None), "add_text")]
        if not rows or not writers or not self.trainer.is_global_zero:
            return
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header)))
                 + "|"]
        for row in rows:
            lines.append("| " + " | ".join(table_cell(c) if isinstance(c, str) else str(c) if isinstance(c, int)
                                           else f"{c:.3f}" for c in row) + " |")
        for writer in writers:
            writer.add_text(tag, "\n".join(lines), global_step=step)


def table_cell(text: str, limit: int = 300) -> str:
    """``text`` as one markdown table cell: pipes escaped, newlines shown as ↵, cut at ``limit``."""
    text = text if len(text) <= limit else text[:limit] + " …"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", " ↵ ")


__all__ = ["ResponseGenerationMixin", "ReferenceMixin", "OnlineRLMixin", "table_cell"]
