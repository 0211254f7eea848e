"""RLHF with PPO and a KL penalty (the book's chapter 8.5; Ziegler et al. 2019, Ouyang et al. 2022).

Each training batch of prompts is one PPO *iteration*:

1. **rollout**: the policy answers the (left-padded) prompts with batched KV-cache generation
   (temperature / top-k / top-p, stop at end-of-text, at most ``max_new_tokens``);
2. **score**: the reward function (``task.reward``: a reward model checkpoint through
   :class:`gptlab.rewards.RewardModel`, or any Python function given as a Hydra ``_target_``)
   gives each response a score;
3. **evaluate**: one forward pass each gives the per-token log-probs of the policy (π_old), of the
   reference (the starting model: the policy with its LoRA switched off, or a frozen copy), and
   the values;
4. **reward**: r_t = −β·KL_t on every response token, plus the score on the last one; β is fixed
   or follows an adaptive controller towards ``kl_target``;
5. **advantages**: GAE(γ, λ), whitened over the batch's response tokens;
6. **update**: ``ppo_epochs`` passes over ``num_mini_batches`` shuffled minibatches, each one
   optimizer step on the clipped policy loss + ``vf_coef`` × the clipped value loss −
   ``entropy_coef`` × entropy (manual optimisation).

**Value head.** A scalar head (D → 1, zero-initialised as OpenAI's) on the policy's own final
hidden states, not a separate value model: the same forward pass gives log-probs and values, so a
minibatch costs one backbone pass instead of two and memory holds one set of weights (with
``adapter=lora`` the only new trainable weights are the adapters and this head). The price is that
value gradients reach the shared backbone; ``vf_coef`` (0.1, as TRL and torchtune) keeps them small,
and a zero-initialised head sends none at all until it has learned something. TRL and torchtune
use a second model initialised from the reward model, which starts with better value estimates but
doubles the weights trained.

**Under DDP** (``trainer=ddp``) every rank runs whole iterations on its own share of the prompts
(the distributed sampler's): it samples with its own generator
(:func:`gptlab.alignment.rollout.rollout_generator`: run seed, global rank and iteration; rank 0
samples what a one-process run of the same seed would), scores its responses, and computes the
KL, the rewards and the advantages of its own rollout. Reward whitening (``whiten_rewards``) and
advantage whitening (``whiten_advantages``) use the mean and variance of the rank's own response
tokens, not of the global batch: TRL's choice (its ``masked_whiten`` reads the local rollout, no
gather), and one that needs no communication before the update; with whitening on, a 2-process
run therefore differs slightly from a 1-process run of the same global batch (each half is centred
and scaled on its own). What must be global is: the gradients (DDP averages them over the ranks
at every minibatch step, so the policy and the value head stay one model); the reference (a
frozen copy built from the same starting weights on every rank, or the policy with its adapters
off); and the adaptive β, which follows the mean KL over all ranks (TRL's older ``PPOTrainer``
updated its controller with the gathered KL too), so every rank uses the same β. Logged metrics
are means over the ranks (``sync_dist``).

Metrics, per iteration, with TRL's names: ``objective/kl`` (Σ_t KL_t per response, mean),
``objective/entropy`` (Σ_t −log π), ``objective/non_score_reward`` (−β Σ_t KL_t),
``objective/scores``, ``objective/rlhf_reward`` (score + non-score reward), ``objective/kl_coef``
(β); ``policy/approxkl``, ``policy/clipfrac``, ``policy/entropy`` (mean per-token entropy),
``loss/policy``, ``val/value_loss``, ``val/clipfrac``, ``val/ratio``, ``val/num_eos_tokens``
(TRL's ``val/`` group is the *value function*; PPO has no validation stage); and
``response/mean_length`` and ``time/{generation,scoring,update}_s``. Every
``log_samples_every_n`` iterations a prompt / response / score table goes to TensorBoard (text).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn

from gptlab.alignment.advantages import gae, token_rewards
from gptlab.alignment.kl import KL_CONTROLLER_RULES, KL_ESTIMATORS, KLController, kl_estimate
from gptlab.alignment.losses import clipped_policy_loss, clipped_value_loss
from gptlab.alignment.masked import masked_mean, masked_whiten
from gptlab.alignment.reference import eval_mode, switch_off_dropout
from gptlab.alignment.rollout import (GENERATION_CACHES, Completions, PhaseTimer, PolicyOutput, Rollout, chunked,
                                      response_forward, rollout_generator)
from gptlab.checks import boolean, choice, integer, number
from gptlab.data.prompt_styles import extract_response
from gptlab.tasks.base import GPTTask
from gptlab.tasks.mixins import OnlineRLMixin, ReferenceMixin, ResponseGenerationMixin
from gptlab.tokenizer import EOT_ID, check_same_tokenizer

REFERENCES = ("auto", "copy", "adapters_off")


class PPOTask(OnlineRLMixin, ResponseGenerationMixin, ReferenceMixin, GPTTask):
    """PPO on batches of prompts (:class:`gptlab.data.prompts.PromptDataModule`: left-padded
    ``prompt_ids`` / ``prompt_attention_mask``, ``index``, ``entries``, ``prompts``).

    Start it from the SFT model (``init_from`` a gptlab checkpoint or pretrained weights).

    Args:
        reward: the reward function (:mod:`gptlab.rewards`): built by Hydra from ``task.reward``
            (a ``_target_``); required to train, not stored in checkpoints.
        max_new_tokens, temperature, top_k, top_p: rollout sampling (temperature > 0). Leave top_k /
            top_p None (TRL's PPO fixes top_k 0 and top_p 1): they sample from a truncated
            distribution while PPO's log-probs, ratio and KL are those of the full π at
            ``temperature``; set, they are used with a warning.
        stop_token_id: a response ends at (and includes) this token; None = always ``max_new_tokens``.
        generation_cache: ``dynamic`` | ``static`` | ``compiled`` (:data:`GENERATION_CACHES`).
        kl_coef: β, the weight of the per-token KL penalty (the initial β when adaptive).
        kl_target, kl_horizon: adapt β towards this mean KL per response (None = fixed β).
        kl_estimator: ``k1`` | ``k2`` | ``k3`` (:data:`gptlab.alignment.kl.KL_ESTIMATORS`).
        missing_eos_penalty: subtracted from the score of a response that never stopped (TRL).
        whiten_rewards: whiten the per-token rewards before GAE (TRL's option, off).
        gamma, lam: GAE's discount γ and λ.
        whiten_advantages: whiten advantages over the batch's response tokens (on in TRL and torchtune).
        ppo_epochs, num_mini_batches: passes over the rollout, and optimizer steps per pass.
        clip_range, clip_range_value: PPO's ε for the ratio and for the value change (None = no value clipping).
        vf_coef, entropy_coef: weights of the value loss and of the entropy bonus.
        reference: ``auto`` (``adapters_off`` with an adapter, else ``copy``) | ``copy`` (a frozen copy
            of the starting policy) | ``adapters_off`` (the policy with LoRA switched off: no copy).
        disable_dropout: switch dropout off (TRL): the ratio is exactly 1 at the first minibatch.
        log_samples_every_n, log_samples: a TensorBoard text table of this many samples every N iterations.
        test_temperature: sampling temperature of the test-stage answers (0 = greedy).
        prompt_style, generate_on_test, responses_file, log_examples: the test stage (answers to the
            test prompts in ``responses.json``, with their scores), as
            :class:`~gptlab.tasks.instruct.InstructionTask`.
        **kwargs: :class:`GPTTask` arguments (model, init_from, adapter, optimizer, grad_clip, ...).
    """

    task_name = "ppo"
    kind = "lm"
    RULES = {"max_new_tokens": integer(ge=1),
             "temperature": number(gt=0, name="task.temperature",
                                   why="PPO learns from sampled responses (greedy decoding explores nothing); use "
                                       "test_temperature=0 for greedy test answers"),
             "stop_token_id": integer(ge=0, optional=True),
             "generation_cache": choice(*GENERATION_CACHES, name="generation_cache"),
             "kl_estimator": choice(*KL_ESTIMATORS, name="kl_estimator"), **KL_CONTROLLER_RULES,
             "missing_eos_penalty": number(optional=True), "whiten_rewards": boolean(),
             "gamma": number(ge=0, le=1), "lam": number(ge=0, le=1), "whiten_advantages": boolean(),
             "ppo_epochs": integer(ge=1), "num_mini_batches": integer(ge=1), "clip_range": number(gt=0),
             "clip_range_value": number(gt=0, optional=True), "vf_coef": number(ge=0), "entropy_coef": number(ge=0),
             "reference": choice(*REFERENCES, name="reference"), "disable_dropout": boolean(),
             "log_samples_every_n": integer(ge=0), "log_samples": integer(ge=0), "test_temperature": number(ge=0)}

    def __init__(self, reward: Callable[..., Any] | None = None, max_new_tokens: int = 64, temperature: float = 0.7,
                 top_k: int | None = None, top_p: float | None = None, stop_token_id: int | None = EOT_ID,
                 generation_cache: str = "dynamic", kl_coef: float = 0.05, kl_target: float | None = None,
                 kl_horizon: float = 10000, kl_estimator: str = "k1", missing_eos_penalty: float | None = None,
                 whiten_rewards: bool = False, gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True,
                 ppo_epochs: int = 4, num_mini_batches: int = 1, clip_range: float = 0.2,
                 clip_range_value: float | None = 0.2, vf_coef: float = 0.1, entropy_coef: float = 0.0,
                 reference: str = "auto", disable_dropout: bool = True, log_samples_every_n: int = 10,
                 log_samples: int = 4, test_temperature: float = 0.0, prompt_style: str = "alpaca",
                 generate_on_test: bool = True, responses_file: str = "responses.json", log_examples: int = 3,
                 **kwargs: Any):
        # validate before the (possibly large) backbone is built
        if reward is not None and (isinstance(reward, Mapping) or not callable(reward)):
            raise TypeError(f"task.reward must be a callable built from a _target_ (gptlab.rewards), got "
                            f"{type(reward).__name__}; a plain function needs _partial_: true")
        # the reward is code built from the run's config: never stored with the hyperparameters (nor
        # deep-copied by save_hyperparameters, which reads this frame's arguments)
        reward_fn, reward = reward, None
        super().__init__(**kwargs)  # checks every argument (RULES) before the backbone is built
        if (top_k or 0) > 0 or (top_p is not None and top_p < 1):
            rank_zero_warn(f"task.top_k={top_k}, task.top_p={top_p}: the rollouts are sampled from a truncated "
                           "distribution, but PPO's stored log-probs, probability ratio and KL penalty are those of "
                           f"the full policy at temperature {temperature}, so the update is computed for another "
                           "distribution than the one that sampled (TRL's PPO fixes top_k=0, top_p=1.0); leave "
                           "both null unless that is what you study")
        self.hparams.pop("reward", None)
        self._kl = KLController(kl_coef, kl_target, kl_horizon)
        if disable_dropout:
            switch_off_dropout(self.model)
        D = self.model.config.emb_dim
        self.value_head = nn.Linear(D, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.automatic_optimization = False
        # not a submodule: kept out of state_dict and parameters(); moved to the task's device when
        # fitting or testing starts
        self.reward_fn = reward_fn
        self.init_reference(reference)
        self.reset_responses()

    @property
    def reward_fns(self) -> dict[str, Callable[..., Any]]:
        """The one reward function, as :class:`~gptlab.tasks.mixins.OnlineRLMixin` reads them."""
        return {"reward": self.reward_fn} if self.reward_fn is not None else {}

    @property
    def kl_coef(self) -> float:
        """β now (changes after every iteration when adaptive)."""
        return self._kl.value

    @property
    def steps_per_iteration(self) -> int:
        """Optimizer steps per rollout: ``ppo_epochs`` × ``num_mini_batches``."""
        return self.hparams.ppo_epochs * self.hparams.num_mini_batches

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.reward_fn is None:
            raise ValueError("task=ppo needs a reward: a reward model (task.reward.ckpt_path=<reward model "
                             "checkpoint>, or reward_checkpoint=... with experiment=ch08_ppo*; its class: "
                             "task.reward._target_=gptlab.rewards.RewardModel), or a rule (task/reward=token_count "
                             "task.reward.token=..., task/reward=regex, or your own function's _target_)")
        style = getattr(self.reward_fn, "prompt_style", None)
        if style and style != self.hparams.prompt_style:
            raise ValueError(f"the reward model was trained on prompt_style={style!r} prompts but task.prompt_style="
                             f"{self.hparams.prompt_style!r}; set data.prompt_style={style} (the policy and the reward "
                             "model must see the same prompts)")
        reward_tokenizer = getattr(self.reward_fn, "tokenizer", None)  # it reads the policy's token ids
        if reward_tokenizer is not None:
            check_same_tokenizer(reward_tokenizer, self.tokenizer, "the reward model", "the policy's tokenizer")
        self.build_reference()

    def score(self, batch: Mapping[str, Any], sampled: Completions) -> tuple[torch.Tensor, list[str], list[str]]:
        """The reward function's scores (B,) float32 on the policy's device (less ``missing_eos_penalty``
        for completions that never stopped), the prompts and the decoded completions (without the stop token)."""
        texts = self.decoded(batch, sampled)
        scores = self.call_rewards(texts)["reward"]
        if self.hparams.missing_eos_penalty and self.hparams.stop_token_id is not None:
            scores = scores - self.hparams.missing_eos_penalty * (~sampled.stopped).float().to(scores.device)
        return scores, texts["prompts"], texts["completions"]

    def reference_forward(self, sequences: torch.Tensor, positions: torch.Tensor, responses: torch.Tensor
                          ) -> PolicyOutput:
        """Log-probs of the responses under the reference model (no gradients, eval mode)."""
        with self.reference.active(self.model) as model:
            return response_forward(model, sequences, positions, responses, self.hparams.temperature)

    @torch.no_grad()
    def make_rollout(self, batch: Mapping[str, Any]) -> tuple[Rollout, dict[str, float]]:
        """Steps 1-5 of an iteration (module docstring); returns the rollout and its timings (s)."""
        hp = self.hparams
        timer = PhaseTimer(self.device)
        # this rank's own stream for this iteration (module docstring, "Under DDP")
        generator = rollout_generator(self.global_step // self.steps_per_iteration, self.global_rank, self.device)
        sampled = self.sample(batch, hp.temperature, generator=generator)
        timer.lap("generation_s")
        sequences, positions, responses, mask = sampled.sequences, sampled.positions, sampled.tokens, sampled.mask
        scores, prompts, completions = self.score(batch, sampled)
        chunk = _minibatch_size(len(responses), hp.num_mini_batches)
        with eval_mode(self.model):
            policy = chunked(self.policy_forward, len(responses), chunk, sequences, positions, responses)
        ref = chunked(self.reference_forward, len(responses), chunk, sequences, positions, responses)
        timer.lap("scoring_s")
        kl = kl_estimate(policy.logprobs, ref.logprobs, hp.kl_estimator)
        rewards, non_score = token_rewards(kl, scores, mask, self.kl_coef)
        if hp.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, policy.values, mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        rollout = Rollout(sequences=sequences, positions=positions, responses=responses, mask=mask,
                          logprobs=policy.logprobs, ref_logprobs=ref.logprobs, values=policy.values, scores=scores,
                          kl=kl, rewards=rewards, non_score_rewards=non_score, advantages=advantages, returns=returns,
                          prompts=prompts, completions=completions)
        return rollout, timer.laps

    def policy_forward(self, sequences: torch.Tensor, positions: torch.Tensor, responses: torch.Tensor,
                       with_entropy: bool = False) -> PolicyOutput:
        """Log-probs, values (and entropy) of the responses under the current policy; through
        ``torch.compile`` (dynamic shapes: lengths change every iteration) when ``compile=true``."""
        forward = self.compiled(response_forward, dynamic=True)
        return forward(self.model, sequences, positions, responses, self.hparams.temperature, self.value_head,
                       with_entropy, entropy_grad=with_entropy and bool(self.hparams.entropy_coef))

    # ----------------------------------------------------------------- update
    def ppo_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Step 6: ``ppo_epochs`` × ``num_mini_batches`` optimizer steps; the means of their stats."""
        hp = self.hparams
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        stats: dict[str, list[torch.Tensor]] = {}
        n = len(rollout)
        for _ in range(hp.ppo_epochs):
            for idx in torch.randperm(n, device=rollout.sequences.device).tensor_split(hp.num_mini_batches):
                if idx.numel() == 0:
                    continue
                mask = rollout.mask[idx]
                out = self.policy_forward(rollout.sequences[idx], rollout.positions[idx], rollout.responses[idx],
                                          with_entropy=True)
                pg_loss, pg = clipped_policy_loss(out.logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask,
                                                  hp.clip_range)
                vf_loss, vf_clipfrac = clipped_value_loss(out.values, rollout.values[idx], rollout.returns[idx], mask,
                                                          hp.clip_range_value)
                entropy = masked_mean(out.entropy, mask)
                loss = pg_loss + hp.vf_coef * vf_loss
                if hp.entropy_coef:
                    loss = loss - hp.entropy_coef * entropy
                self.optimizer_step(loss, optimizer, scheduler)
                for name, value in (("policy/approxkl", pg.approxkl), ("policy/clipfrac", pg.clipfrac),
                                    ("policy/entropy", entropy), ("loss/policy", pg_loss), ("val/value_loss", vf_loss),
                                    ("val/clipfrac", vf_clipfrac), ("val/ratio", pg.ratio), ("loss/total", loss)):
                    stats.setdefault(name, []).append(value.detach().float())
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        iteration = self.global_step // self.steps_per_iteration
        rollout, timings = self.make_rollout(batch)
        start = time.perf_counter()
        update = self.ppo_update(rollout)
        timings["update_s"] = PhaseTimer.elapsed(self.device, start)
        metrics = self.rollout_metrics(rollout)
        # β follows the mean KL of every rank's rollouts: one β for all ranks, as on one process
        global_kl = self.trainer.strategy.reduce(metrics["objective/kl"].detach(), reduce_op="mean")
        self._kl.update(float(global_kl), len(rollout) * self.trainer.world_size)
        metrics.update(update)
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        B = len(rollout)
        for name, value in metrics.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=B, sync_dist=True,
                     prog_bar=name in ("objective/scores", "objective/kl"))
        every = self.hparams.log_samples_every_n
        if every and iteration % every == 0:
            self.log_sample_table(rollout, iteration)

    def rollout_metrics(self, rollout: Rollout) -> dict[str, torch.Tensor | float]:
        """TRL's ``objective/*`` metrics of a rollout (means over its responses), the response
        length and how many responses stopped."""
        mask = rollout.mask
        kl = torch.where(mask, rollout.kl, 0.0).sum(dim=1)
        non_score = rollout.non_score_rewards.sum(dim=1)
        stop = self.hparams.stop_token_id
        ended = (rollout.responses == stop).any(dim=1) if stop is not None else torch.zeros_like(kl, dtype=torch.bool)
        return {"objective/kl": kl.mean(), "objective/entropy": torch.where(mask, -rollout.logprobs, 0.0).sum(1).mean(),
                "objective/non_score_reward": non_score.mean(), "objective/scores": rollout.scores.mean(),
                "objective/rlhf_reward": (rollout.scores + non_score).mean(),
                "objective/kl_coef": self.kl_coef, "response/mean_length": mask.sum(1).float().mean(),
                "val/num_eos_tokens": ended.sum().float()}

    def log_sample_table(self, rollout: Rollout, iteration: int) -> None:
        """A markdown table of the first ``log_samples`` prompts, responses and scores to every
        logger that takes text (TensorBoard: the TEXT tab, tag ``samples``)."""
        n = min(self.hparams.log_samples, len(rollout))
        kl = torch.where(rollout.mask, rollout.kl, 0.0).sum(dim=1).tolist()
        rows = [(rollout.prompts[i], rollout.completions[i], float(rollout.scores[i]), kl[i]) for i in range(n)]
        self.log_text_table("samples", ("prompt", "response", "score", "KL"), rows, iteration)

    # ----------------------------------------------------------------- test: answers + scores
    def on_test_epoch_start(self) -> None:
        self.reset_responses()

    @torch.no_grad()
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        sampled = self.sample(batch, self.hparams.test_temperature)
        responses, mask = sampled.tokens, sampled.mask
        B = responses.size(0)
        self.log("test/response_length", mask.sum(1).float().mean(), batch_size=B, sync_dist=True)
        if self.reward_fn is not None:
            scores, _, completions = self.score(batch, sampled)
            self.log("test/scores", scores.mean(), batch_size=B, sync_dist=True)
            scores = scores.tolist()
        else:
            tok = self.tokenizer
            completions = [tok.decode(r[:n]) for r, n in zip(responses.tolist(), mask.sum(1).tolist())]
            scores = [None] * B
        if self.hparams.generate_on_test and "entries" in batch:
            for i, entry, text, s in zip(batch["index"].tolist(), batch["entries"], completions, scores):
                # cut like every other test stage (gptlab-reward / gptlab-judge compare them); "reward"
                # is the score of the whole completion, the one PPO optimised
                answer = extract_response(text, self.hparams.prompt_style)
                self._responses.append((i, {**entry, "model_response": answer,
                                            **({"reward": s} if s is not None else {})}))

    def on_test_epoch_end(self) -> None:
        if self.hparams.generate_on_test:
            self.flush_responses()

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ppo_kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "ppo_kl_coef" in checkpoint:
            self._kl.value = float(checkpoint["ppo_kl_coef"])


# ----------------------------------------------------------------------------- helpers
def _minibatch_size(n: int, num_mini_batches: int) -> int:
    return max(1, -(-n // num_mini_batches))


__all__ = ["PPOTask", "REFERENCES"]
