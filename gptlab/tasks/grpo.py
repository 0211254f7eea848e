"""Reinforcement learning with verifiable rewards: GRPO (Shao et al. 2024) and its DAPO, Dr. GRPO and
GSPO variants (the loss: :mod:`gptlab.alignment.grpo`), as TRL's ``GRPOTrainer`` and the book's sequel
(rasbt/reasoning-from-scratch, ch. 6–7) run it.

Each training batch of prompts is one GRPO step:

1. **generate**: ``num_generations`` (G) completions per prompt, one batched KV-cache generation over
   the B·G rows (temperature / top-k / top-p; a completion ends at ``stop_token_id`` or after
   ``max_new_tokens``: truncated);
2. **score**: every reward function of ``task.rewards`` (name -> a Hydra ``_target_``: the answer
   match, a format rule, a reward model, regex / token rules, your own) scores every completion;
   the reward is their sum weighted by ``reward_weights``. A function that raises or returns NaN /
   inf is named with the sample, and nothing is updated;
3. **advantages**: reward minus its group's mean, over the group's (or the batch's) std
   (``scale_rewards``; ``none`` = Dr. GRPO); one number per completion, broadcast over its tokens;
4. **update**: ``num_iterations`` optimizer steps on the same completions, each on the clipped
   ratio π/π_old (π_old: the log-probs of the policy that sampled, kept from before the first step),
   plus β·KL(π ‖ π_ref) per token when ``beta`` > 0. The reference model exists only then (a frozen
   copy, or the policy with its LoRA switched off). ``mask_truncated_completions`` leaves completions
   that never stopped out of the loss.

Metrics, per step, with TRL's names: ``reward``, ``reward_std`` (mean of the groups' stds),
``rewards/<name>/mean`` and ``/std``, ``frac_reward_zero_std`` (groups without a learning signal),
``completions/mean_length``, ``/min_length``, ``/max_length``, ``completions/clipped_ratio`` (share
that hit ``max_new_tokens`` without stopping), ``kl`` (when β > 0), ``entropy``, ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``loss``, and ``time/{generation,scoring,update}_s``.
Every ``log_samples_every_n`` steps a prompt / completion / reward / advantage table goes to
TensorBoard (TEXT, tag ``samples``). The test stage answers the test prompts (greedy by default),
logs ``test/reward`` and ``test/rewards/<name>/mean`` (with the answer reward: held-out accuracy)
and writes the answers with their rewards to ``responses.json``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch

from gptlab.alignment.grpo import GRPO_RULES, group_advantages, group_reward_std, grpo_loss, grpo_relations
from gptlab.alignment.masked import masked_mean
from gptlab.alignment.reference import switch_off_dropout
from gptlab.alignment.rollout import (GENERATION_CACHES, Completions, PhaseTimer, PolicyOutput, response_forward,
                                      rollout_generator)
from gptlab.checks import Predicate, Problem, boolean, choice, integer, is_number, number, unknown_keys
from gptlab.data.prompt_styles import extract_response
from gptlab.tasks.base import GPTTask
from gptlab.tasks.mixins import OnlineRLMixin, ReferenceMixin, ResponseGenerationMixin
from gptlab.tokenizer import EOT_ID

REFERENCES = ("auto", "copy", "adapters_off")


def _weights_ok(v: Any) -> bool:
    return v is None or (isinstance(v, Mapping) and all(is_number(w) for w in v.values()))


class GRPOTask(OnlineRLMixin, ResponseGenerationMixin, ReferenceMixin, GPTTask):
    """GRPO on batches of prompts (:class:`gptlab.data.problems.ProblemDataModule` or
    :class:`gptlab.data.prompts.PromptDataModule`: left-padded ``prompt_ids`` /
    ``prompt_attention_mask``, ``index``, ``entries``, ``prompts``); start it from an SFT model.

    Args:
        rewards: name -> reward function (:mod:`gptlab.rewards`), built by Hydra from ``task.rewards``;
            required to train, never stored in checkpoints.
        reward_weights: name -> weight of that reward in the sum (a name left out weighs 1).
        num_generations: completions per prompt, G ≥ 2 (TRL 8); ``data.batch_size`` counts prompts.
        max_new_tokens, temperature, top_k, top_p, stop_token_id, generation_cache: generation
            (TRL: temperature 1, top-p 1; the sequel: 0.8 / 0.9).
        beta: weight of the per-token k3 KL to the reference (0 = no reference model, TRL's default).
        epsilon, epsilon_high: clipping bounds 1 − ε and 1 + ε_high (None = ε; DAPO's clip-higher: 0.28).
        loss_type: ``grpo`` | ``bnpo`` | ``dapo`` | ``dr_grpo`` (:func:`gptlab.alignment.grpo.grpo_loss`).
        scale_rewards: ``group`` | ``batch`` | ``none`` (:func:`gptlab.alignment.grpo.group_advantages`).
        importance_sampling_level: ``token`` (GRPO) | ``sequence`` (GSPO).
        num_iterations: optimizer steps per batch of completions (TRL's μ, default 1).
        mask_truncated_completions: leave completions that never stopped out of the loss (DAPO).
        reference: ``auto`` | ``copy`` | ``adapters_off``, used only when β > 0.
        disable_dropout: switch dropout off (TRL): π and π_old agree on the first step.
        log_samples_every_n, log_samples: the sample table (0 = off).
        test_temperature: the test stage's sampling temperature (0 = greedy).
        prompt_style, generate_on_test, responses_file, log_examples: the test stage's answers.
        **kwargs: :class:`GPTTask` arguments (model, init_from, adapter, optimizer, grad_clip, ...).
    """

    task_name = "grpo"
    kind = "lm"
    RULES = {**GRPO_RULES, "max_new_tokens": integer(ge=1),
             "temperature": number(gt=0, name="task.temperature",
                                   why="GRPO compares sampled completions (greedy decoding gives G identical ones); "
                                       "use test_temperature=0 for greedy test answers"),
             "stop_token_id": integer(ge=0, optional=True),
             "generation_cache": choice(*GENERATION_CACHES, name="generation_cache"),
             "mask_truncated_completions": boolean(), "reference": choice(*REFERENCES, name="reference"),
             "disable_dropout": boolean(), "log_samples_every_n": integer(ge=0), "log_samples": integer(ge=0),
             "test_temperature": number(ge=0),
             "reward_weights": Predicate(_weights_ok, "a mapping of reward name -> number, or null")}

    @classmethod
    def check_relations(cls, node: Mapping[str, Any]) -> list[Problem]:
        found = super().check_relations(node) + grpo_relations(node)
        rewards, weights = node.get("rewards"), node.get("reward_weights")
        if isinstance(rewards, Mapping) and isinstance(weights, Mapping):
            # a weight for a reward the run does not have: named with the closest reward name
            found += [Problem(p.text.replace("{node}", "{node}reward_weights.", 1), p.sentence)
                      for p in unknown_keys(weights, rewards, "reward_weights")]
        return found

    def __init__(self, rewards: Mapping[str, Callable[..., Any]] | None = None,
                 reward_weights: Mapping[str, float] | None = None, num_generations: int = 8,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stop_token_id: int | None = EOT_ID, generation_cache: str = "dynamic",
                 beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None, loss_type: str = "dapo",
                 scale_rewards: str = "group", importance_sampling_level: str = "token", num_iterations: int = 1,
                 mask_truncated_completions: bool = False, reference: str = "auto", disable_dropout: bool = True,
                 log_samples_every_n: int = 10, log_samples: int = 4, test_temperature: float = 0.0,
                 prompt_style: str = "alpaca", generate_on_test: bool = True, responses_file: str = "responses.json",
                 log_examples: int = 3, **kwargs: Any):
        functions = dict(rewards or {})
        for name, fn in functions.items():
            if isinstance(fn, Mapping) or not callable(fn):
                raise TypeError(f"task.rewards.{name} must be a callable built from a _target_ (gptlab.rewards), got "
                                f"{type(fn).__name__}; a plain function needs _partial_: true")
        # the reward functions are code built from the run's config: kept out of the hyperparameters
        # (and of save_hyperparameters' deep copy of this frame's arguments); their names stay
        rewards = {name: None for name in functions}
        super().__init__(**kwargs)  # checks every argument (RULES, check_relations) before the backbone is built
        self.hparams.pop("rewards", None)
        self.reward_fns = functions
        if disable_dropout:
            switch_off_dropout(self.model)
        self.automatic_optimization = False
        self.init_reference(reference)
        self.reset_responses()

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per batch of prompts (``trainer.max_steps`` counts these)."""
        return self.hparams.num_iterations

    @property
    def weights(self) -> dict[str, float]:
        """Each reward function's weight in the sum (1 unless ``reward_weights`` says otherwise)."""
        given = self.hparams.reward_weights or {}
        return {name: float(given.get(name, 1.0)) for name in self.reward_fns}

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if not self.reward_fns:
            raise ValueError("task=grpo needs at least one reward function in task.rewards: the answer match "
                             "(task.rewards.answer._target_=gptlab.rewards.AnswerReward, data=problems), a format rule "
                             "(gptlab.rewards.FormatReward), a reward model (gptlab.rewards.RewardModel with ckpt_path), "
                             "a regex / token rule, or your own function's _target_")
        for name, fn in self.reward_fns.items():
            style = getattr(fn, "prompt_style", None)
            if style and style != self.hparams.prompt_style:
                raise ValueError(f"task.rewards.{name}: the reward model was trained on prompt_style={style!r} prompts "
                                 f"but task.prompt_style={self.hparams.prompt_style!r}; set data.prompt_style={style}")
        if self.hparams.beta:
            self.build_reference()

    # ----------------------------------------------------------------- one step
    def policy_forward(self, sampled: Completions, with_entropy: bool = False) -> PolicyOutput:
        """Log-probs (and entropy) of the completions under the current policy, at the sampling
        temperature; through ``torch.compile`` (dynamic shapes) when ``compile=true``."""
        forward = self.compiled(response_forward, dynamic=True)
        return forward(self.model, sampled.sequences, sampled.positions, sampled.tokens, self.hparams.temperature,
                       None, with_entropy)

    @torch.no_grad()
    def reference_logps(self, sampled: Completions) -> torch.Tensor:
        """log π_ref of the completions (no gradients, eval mode; LoRA off for ``adapters_off``)."""
        with self.reference.active(self.model) as model:
            return response_forward(model, sampled.sequences, sampled.positions, sampled.tokens,
                                    self.hparams.temperature).logprobs

    def rewards_of(self, batch: Mapping[str, Any], sampled: Completions, num_generations: int
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, list[Any]]]:
        """``(weighted reward (N,), each function's scores by name, the texts they read)``."""
        texts = self.decoded(batch, sampled, num_generations)
        scores = self.call_rewards(texts)
        weights = self.weights
        total = torch.zeros(len(sampled), device=self.device)
        for name, s in scores.items():
            total = total + weights[name] * s
        return total, scores, texts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        G = hp.num_generations
        step = self.global_step // hp.num_iterations
        timer = PhaseTimer(self.device)
        # each rank samples with its own seed (run seed, global rank, step): reproducible on resume
        sampled = self.sample(batch, hp.temperature, G, generator=rollout_generator(step, self.global_rank, self.device))
        timer.lap("generation_s")
        rewards, scores, texts = self.rewards_of(batch, sampled, G)  # raises before any update
        advantages = group_advantages(rewards, G, hp.scale_rewards)
        mask = sampled.mask & sampled.stopped[:, None] if hp.mask_truncated_completions else sampled.mask
        old_logps = None
        if hp.num_iterations > 1:  # π_old must stay the sampling policy across the μ steps
            with torch.no_grad():
                old_logps = self.policy_forward(sampled).logprobs
        ref_logps = self.reference_logps(sampled) if hp.beta else None
        timer.lap("scoring_s")
        start = time.perf_counter()
        stats = self.update(sampled, mask, advantages, old_logps, ref_logps)
        timings = {**timer.laps, "update_s": PhaseTimer.elapsed(self.device, start)}
        metrics = self.step_metrics(sampled, rewards, scores, G)
        metrics.update(stats)
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        for name, value in metrics.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=len(sampled),
                     prog_bar=name in ("reward", "kl"))
        every = hp.log_samples_every_n
        if every and step % every == 0 and hp.log_samples:
            n = min(hp.log_samples, len(sampled))
            rows = [(texts["prompts"][i], texts["completions"][i], float(rewards[i]), float(advantages[i]))
                    for i in range(n)]
            self.log_text_table("samples", ("prompt", "completion", "reward", "advantage"), rows, step)

    def update(self, sampled: Completions, mask: torch.Tensor, advantages: torch.Tensor,
               old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``num_iterations`` optimizer steps on the GRPO loss; the means of their statistics."""
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(hp.num_iterations):
            out = self.policy_forward(sampled, with_entropy=True)
            old = out.logprobs.detach() if old_logps is None else old_logps  # μ = 1: ρ = 1, gradient A·∇log π
            loss, metrics = grpo_loss(out.logprobs, old, advantages, mask, ref_logps, hp.beta, hp.epsilon,
                                      hp.epsilon_high if hp.epsilon_high is not None else hp.epsilon, hp.loss_type,
                                      hp.max_new_tokens, hp.importance_sampling_level)
            self.optimizer_step(loss, optimizer, scheduler)
            for name, value in {**metrics, "entropy": masked_mean(out.entropy, mask), "loss": loss}.items():
                stats.setdefault(name, []).append(value.detach().float())
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    @staticmethod
    def step_metrics(sampled: Completions, rewards: torch.Tensor, scores: Mapping[str, torch.Tensor],
                     num_generations: int) -> dict[str, torch.Tensor]:
        """TRL's reward and completion metrics of one batch of completions."""
        lengths = sampled.mask.sum(dim=1).float()
        std = group_reward_std(rewards, num_generations)
        metrics = {"reward": rewards.mean(), "reward_std": std.mean(), "frac_reward_zero_std": (std == 0).float().mean(),
                   "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                   "completions/max_length": lengths.max(),
                   "completions/clipped_ratio": (~sampled.stopped).float().mean()}
        for name, s in scores.items():
            metrics[f"rewards/{name}/mean"] = s.mean()
            metrics[f"rewards/{name}/std"] = s.std() if s.numel() > 1 else torch.zeros(())
        return metrics

    # ----------------------------------------------------------------- validation / test: answers + rewards
    @torch.no_grad()
    def answer_and_grade(self, batch: dict[str, Any], stage: str) -> tuple[dict[str, list[str]], list[Any]]:
        """Answers at ``test_temperature`` (greedy by default), logged as ``<stage>/completion_length``,
        ``<stage>/reward`` and ``<stage>/rewards/<name>/mean``; returns the texts and per-row rewards."""
        sampled = self.sample(batch, self.hparams.test_temperature)
        B = len(sampled)
        self.log(f"{stage}/completion_length", sampled.mask.sum(1).float().mean(), batch_size=B, sync_dist=True)
        if not self.reward_fns:
            return self.decoded(batch, sampled), [None] * B
        total, scores, texts = self.rewards_of(batch, sampled, 1)
        self.log(f"{stage}/reward", total.mean(), batch_size=B, sync_dist=True)
        for name, s in scores.items():
            self.log(f"{stage}/rewards/{name}/mean", s.mean(), batch_size=B, sync_dist=True)
        return texts, [{name: float(s[i]) for name, s in scores.items()} for i in range(B)]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out accuracy during training (``data.num_val`` generated problems, or a file's validation
        split): ``val/rewards/<name>/mean`` every ``trainer.val_check_interval`` steps."""
        self.answer_and_grade(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.reset_responses()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        texts, per_row = self.answer_and_grade(batch, "test")
        if self.hparams.generate_on_test and "entries" in batch:
            for i, entry, text, r in zip(batch["index"].tolist(), batch["entries"], texts["completions"], per_row):
                answer = extract_response(text, self.hparams.prompt_style)
                self._responses.append((i, {**entry, "model_response": answer, **({"rewards": r} if r else {})}))

    def on_test_epoch_end(self) -> None:
        if self.hparams.generate_on_test:
            self.flush_responses()


__all__ = ["GRPOTask", "REFERENCES"]
