"""RLHF with PPO: the arithmetic against hand computations (GAE, clipped losses, KL, rewards), the
rollout layout, and learning on tiny models: a rule-based reward rises, a very large beta pins the
policy to its reference, runs are deterministic, LoRA trains only adapters and the value head, and
the reward-model path works end to end. Every run is a tiny 64-token-vocabulary GPT on one thread."""

from __future__ import annotations

import json
import math
import warnings

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from gptlab.cli.train import ignore_known_warnings, train
from gptlab.data.instruct import left_pad
from gptlab.data.prompts import PromptDataError, PromptDataModule, load_prompts
from gptlab.inference import WrongModelKind, load_model
from gptlab.rewards import RegexCountReward, RewardModel, TokenCountReward
from gptlab.tasks.ppo import PPOTask
from gptlab.tasks.registry import load_task
from gptlab.tasks.reward import RewardModelTask
from gptlab.alignment.advantages import gae, token_rewards
from gptlab.alignment.kl import KLController, kl_estimate
from gptlab.alignment.losses import clipped_policy_loss, clipped_value_loss
from gptlab.alignment.masked import masked_mean, masked_whiten
from gptlab.alignment.reference import CHECKPOINT_KEY
from gptlab.alignment.rollout import Completions, pack_sequences, response_forward, response_mask, stopped_rows

from conftest import CONF_DIR
from online_rl import History, fit_iterations, one_thread  # noqa: F401 - one_thread: an autouse fixture
from online_rl import prompt_loader as shared_prompt_loader

V = 64
"""Vocabulary of the tiny test models: a random policy then emits any one token with p ≈ 1/64."""
TOKEN = 7
"""The token the rule-based reward counts."""
TINY = dict(vocab_size=V, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
LORA = dict(name="lora", rank=4, alpha=8, targets=["q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"])
FAST = dict(max_new_tokens=8, temperature=1.0, stop_token_id=None, ppo_epochs=2, num_mini_batches=1,
            lr=2e-3, lr_schedule="constant", weight_decay=0.0, log_samples_every_n=0)
"""PPO settings of the learning tests: 8 new tokens, no stop token (every response is 8 long)."""


def prompt_loader(n: int = 64, batch_size: int = 32, seed: int = 0) -> DataLoader:
    """``n`` random prompts of 2-5 tokens, left-padded batches as data=prompts makes them."""
    return shared_prompt_loader(n, batch_size, seed, V)


def fit(task: PPOTask, iterations: int, tmp_path, seed: int = 0, **trainer_kw) -> History:
    """``iterations`` PPO iterations (batches of 32 prompts) on CPU, seeded."""
    return fit_iterations(task, iterations, tmp_path, prompt_loader(), seed, **trainer_kw)


def policy(seed: int = 0, **kw) -> PPOTask:
    torch.manual_seed(seed)
    return PPOTask(**{"model": TINY, "reward": TokenCountReward(TOKEN), **FAST, **kw})


@torch.no_grad()
def exact_kl(task: PPOTask, batch: dict) -> float:
    """Mean per-token KL(π ‖ π_ref) over whole distributions (not a sampled estimate), on fresh rollouts."""
    rollout, _ = task.make_rollout(batch)
    logits = []
    for model in (task.model, task.reference_model):
        hidden = model.hidden_states(rollout.sequences)
        at = hidden.gather(1, rollout.positions[..., None].expand(-1, -1, hidden.size(-1)))
        logits.append(torch.log_softmax(model.logits(at).float() / task.hparams.temperature, dim=-1))
    kl = (logits[0].exp() * (logits[0] - logits[1])).sum(-1)
    return float(masked_mean(kl, rollout.mask))


# ----------------------------------------------------------------------------- arithmetic
def test_response_mask_ends_at_and_keeps_the_first_stop_token():
    tokens = torch.tensor([[5, 9, 3, 9, 9], [1, 2, 3, 4, 5], [9, 9, 9, 9, 9]])
    assert response_mask(tokens, 9).long().tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert bool(response_mask(tokens, None).all())


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 0.0, 7.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # row 2 ends after 2 tokens
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: δ2 = 1 − .3 = .7; δ1 = .9·.3 − .2 = .07; δ0 = .9·.2 − .1 = .08; A = δ + .72·A_next
    # row 2: δ1 = 0 + 0 − .5 = −.5 (no value past the end); δ0 = .5 + .9·.5 − .4 = .55
    expected = torch.tensor([[0.08 + 0.72 * (0.07 + 0.72 * 0.7), 0.07 + 0.72 * 0.7, 0.7],
                             [0.55 + 0.72 * -0.5, -0.5, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)


def test_gae_equals_the_backward_recursion_on_random_tensors():
    torch.manual_seed(0)
    B, R, gamma, lam = 4, 9, 0.97, 0.9
    rewards, values = torch.randn(B, R, dtype=torch.float64), torch.randn(B, R, dtype=torch.float64)
    mask = torch.arange(R)[None, :] < torch.tensor([9, 5, 1, 7])[:, None]
    advantages, _ = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n, last = int(mask[b].sum()), 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            last = float(rewards[b, t]) + gamma * next_value - float(values[b, t]) + gamma * lam * last
            assert float(advantages[b, t]) == pytest.approx(last, abs=1e-9)
        assert bool((advantages[b, n:] == 0).all())


def test_token_rewards_penalise_kl_on_every_token_and_add_the_score_on_the_last():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rewards, non_score = token_rewards(kl, torch.tensor([1.0, 2.0]), mask, beta=0.5)
    assert torch.allclose(non_score, torch.tensor([[-0.05, -0.1, -0.15], [-0.2, 0.1, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 2.1, 0.0]]))


def test_clipped_policy_loss_matches_a_hand_computation():
    old = torch.log(torch.tensor([[0.25, 0.5, 0.1, 0.3]]))
    new = torch.log(torch.tensor([[0.5, 0.3, 0.11, 0.9]]))  # ratios 2.0, 0.6, 1.1, (padding)
    advantages = torch.tensor([[1.0, -1.0, 1.0, 5.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = clipped_policy_loss(new, old, advantages, mask, clip_range=0.2)
    # max(−A·ρ, −A·clip(ρ)): (−2, −1.2) → −1.2, clipped; (.6, .8) → .8, clipped; (−1.1, −1.1) → −1.1
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 1.1) / 3, abs=1e-6)
    assert float(stats.clipfrac) == pytest.approx(2 / 3)
    squares = math.log(2) ** 2 + math.log(0.6) ** 2 + math.log(1.1) ** 2
    assert float(stats.approxkl) == pytest.approx(0.5 * squares / 3, abs=1e-6)
    assert float(stats.ratio) == pytest.approx((2.0 + 0.6 + 1.1) / 3, abs=1e-6)


def test_clipped_value_loss_matches_a_hand_computation():
    values, old = torch.tensor([[1.0, 0.0, 0.6]]), torch.tensor([[0.5, 0.5, 0.5]])
    returns, mask = torch.tensor([[2.0, 0.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool)
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    # (V − R)² vs (clip(V, V_old ± .2) − R)²: (1, 1.69) → 1.69; (0, .09) → .09; (.16, .16) → .16
    assert float(loss) == pytest.approx(0.5 * (1.69 + 0.09 + 0.16) / 3, abs=1e-6)
    assert float(clipfrac) == pytest.approx(2 / 3)
    unclipped, _ = clipped_value_loss(values, old, returns, mask, clip_range=None)
    assert float(unclipped) == pytest.approx(0.5 * (1.0 + 0.0 + 0.16) / 3, abs=1e-6)


def test_masked_whiten_centres_and_scales_the_real_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = masked_whiten(x, mask)
    real = out[mask]
    assert float(real.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(real.var(unbiased=True)) == pytest.approx(1.0, abs=1e-4)
    assert out[~mask].tolist() == [0.0, 0.0]


def test_kl_estimates_are_zero_when_policy_equals_reference_and_follow_their_formulas():
    logp, ref = torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.4]))
    for estimator in ("k1", "k2", "k3"):
        assert kl_estimate(logp, logp, estimator).abs().max() == 0
    r = logp - ref
    assert torch.allclose(kl_estimate(logp, ref, "k1"), r)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * r ** 2)
    rho = ref.exp() / logp.exp()
    assert torch.allclose(kl_estimate(logp, ref, "k3"), rho - 1 - rho.log())
    with pytest.raises(ValueError, match="kl_estimator 'k4'.*k1"):
        kl_estimate(logp, ref, "k4")


def test_adaptive_kl_controller_follows_ziegler_et_al_and_a_fixed_one_stays():
    ctl = KLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(kl=9.0, n=100) == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))  # error clipped at +0.2
    beta = ctl.value
    assert ctl.update(kl=5.4, n=100) == pytest.approx(beta * (1 - 0.1 * 100 / 10000))  # error −0.1
    fixed = KLController(0.05)
    assert fixed.update(kl=100.0, n=1000) == 0.05 and not fixed.adaptive
    with pytest.raises(ValueError, match="kl_target=0"):
        KLController(0.1, target=0)


# ----------------------------------------------------------------------------- rollout layout
def test_packed_rows_give_the_log_probs_of_each_row_run_alone():
    torch.manual_seed(0)
    task = policy()
    prompts = [[3, 4, 5, 6], [7], [8, 9]]
    prompt_ids, prompt_mask = left_pad(prompts, 0)
    responses = torch.randint(0, V, (3, 5))
    sequences, positions = pack_sequences(prompt_ids, prompt_mask, responses)
    assert sequences[1, :6].tolist() == [7, *responses[1].tolist()]
    assert positions[1].tolist() == [0, 1, 2, 3, 4]
    model = task.model.eval()
    with torch.no_grad():
        out = response_forward(model, sequences, positions, responses, temperature=0.7, value_head=task.value_head)
        for b, prompt in enumerate(prompts):
            row = torch.tensor([prompt + responses[b].tolist()])
            logits = model(row)[0, len(prompt) - 1:-1].float() / 0.7
            alone = torch.log_softmax(logits, -1).gather(1, responses[b][:, None]).squeeze(1)
            assert torch.allclose(out.logprobs[b], alone, atol=1e-5)
    assert out.values.shape == (3, 5) and bool((out.values == 0).all())  # zero-initialised value head


def test_entropy_carries_gradients_only_as_a_bonus():
    batch = next(iter(prompt_loader()))
    for coef in (0.0, 0.1):
        task = policy(entropy_coef=coef)
        rollout, _ = task.make_rollout(batch)
        out = task.policy_forward(rollout.sequences, rollout.positions, rollout.responses, with_entropy=True)
        assert out.entropy.requires_grad == bool(coef) and out.logprobs.requires_grad
        assert float(masked_mean(out.entropy, rollout.mask)) == pytest.approx(math.log(V), rel=0.01)  # ~uniform


def test_the_reward_sees_unpadded_prompts_and_responses_cut_before_the_stop_token():
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        return [1.0, 1.0]

    task = policy(reward=record, stop_token_id=5, missing_eos_penalty=0.5)
    prompt_ids, prompt_mask = left_pad([[3, 4, 9], [8]], 0)
    responses = torch.tensor([[6, 7, 5, 5], [6, 6, 6, 6]])  # row 2 never stops
    sampled = Completions(prompt_ids, prompt_mask, responses, response_mask(responses, 5), stopped_rows(responses, 5),
                          *pack_sequences(prompt_ids, prompt_mask, responses))
    scores, _, completions = task.score({}, sampled)
    assert seen["prompt_ids"] == [[3, 4, 9], [8]] and seen["completion_ids"] == [[6, 7], [6, 6, 6, 6]]
    assert completions == seen["completions"] and len(seen["prompts"]) == 2
    assert scores.tolist() == [1.0, 0.5]  # the missing-stop penalty


@pytest.mark.parametrize("adapter", [None, LORA], ids=["copy", "lora-adapters-off"])
def test_kl_penalty_is_zero_while_the_policy_is_the_reference(adapter):
    task = policy(adapter=adapter)
    assert task.reference_mode == ("adapters_off" if adapter else "copy")
    batch = next(iter(prompt_loader()))
    rollout, _ = task.make_rollout(batch)
    assert rollout.kl.abs().max() == 0 and rollout.non_score_rewards.abs().max() == 0
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    if adapter:
        assert task.reference_model is None  # no second copy


# ----------------------------------------------------------------------------- temperature, stop token, padding
STOP = 5
"""The stop token of the padding tests."""


def stop_early(task: PPOTask) -> PPOTask:
    """Rollouts whose rows end at different lengths: row b's sampled tokens are cut by the stop
    token at position b mod (R + 1) (never, for b mod (R + 1) = R), so most rows carry padding."""
    sample = task.sample

    def sample_with_stops(batch, temperature, *args, **kwargs):
        c = sample(batch, temperature, *args, **kwargs)
        tokens = c.tokens.clone()
        for b in range(len(tokens)):
            k = b % (tokens.size(1) + 1)
            tokens[b, k:] = STOP
        sequences, positions = pack_sequences(c.prompt_ids, c.prompt_mask, tokens)
        return Completions(c.prompt_ids, c.prompt_mask, tokens, response_mask(tokens, STOP), stopped_rows(tokens, STOP),
                           sequences, positions)

    task.sample = sample_with_stops
    return task


def length_score(completion_ids, **kwargs):
    """A score that differs between rows of different lengths (so advantages differ too)."""
    return [float(len(ids) % 3) - 1.0 for ids in completion_ids]


def padded_policy(**kw) -> PPOTask:
    return stop_early(policy(reward=length_score, temperature=0.7, stop_token_id=STOP, **kw))


@torch.no_grad()
def logprobs_row_by_row(model, rollout, temperature: float) -> list[torch.Tensor]:
    """log softmax(logits / T) of each row's real response tokens, each row run alone and unpadded."""
    out = []
    for b in range(len(rollout)):
        p, n = int(rollout.positions[b, 0]) + 1, int(rollout.mask[b].sum())
        logits = model(rollout.sequences[b, :p + n][None])[0, p - 1:p - 1 + n].float() / temperature
        out.append(torch.log_softmax(logits, -1).gather(1, rollout.responses[b, :n, None]).squeeze(1))
    return out


def test_rollout_log_probs_are_those_of_the_sampling_temperature_on_real_tokens():
    """At temperature 0.7 with a stop token, the stored log-probs of the policy (π_old) and of the
    reference are log softmax(logits / 0.7) of each real response token (not those at T = 1)."""
    task = padded_policy()
    rollout, _ = task.make_rollout(next(iter(prompt_loader())))
    lengths = rollout.mask.sum(1)
    assert 0 < int(lengths.min()) < int(lengths.max()) == 8 and not bool(rollout.mask.all())
    for b, expected in enumerate(logprobs_row_by_row(task.model.eval(), rollout, 0.7)):
        n = len(expected)
        assert torch.allclose(rollout.logprobs[b, :n], expected, atol=1e-5)
        assert torch.allclose(rollout.ref_logprobs[b, :n], expected, atol=1e-5)
    assert not torch.allclose(logprobs_row_by_row(task.model, rollout, 1.0)[-1], logprobs_row_by_row(
        task.model, rollout, 0.7)[-1], atol=1e-3)  # the temperature makes a difference here


def test_advantages_are_whitened_over_the_real_tokens_only():
    task = padded_policy(whiten_advantages=True)
    rollout, _ = task.make_rollout(next(iter(prompt_loader())))
    adv, mask = rollout.advantages, rollout.mask
    assert float(masked_mean(adv, mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(masked_mean((adv - masked_mean(adv, mask)) ** 2, mask) * mask.sum() / (mask.sum() - 1)) == \
        pytest.approx(1.0, rel=1e-3)
    assert bool((adv[~mask] == 0).all())


def test_the_first_update_averages_its_losses_over_real_tokens_only(tmp_path):
    """One optimizer step on a rollout with padding: the policy loss (ratio 1) is the masked mean of
    -A, the value loss half the masked mean of (V - return)², the entropy the masked mean of the
    per-token entropy at the sampling temperature; a mean over padding gives other numbers."""
    task = padded_policy(whiten_advantages=False, ppo_epochs=1, num_mini_batches=1)
    seen = {}
    make_rollout = task.make_rollout

    def recording(batch):
        rollout, timings = make_rollout(batch)
        out = response_forward(task.model.eval(), rollout.sequences, rollout.positions, rollout.responses,
                               temperature=0.7, with_entropy=True)
        seen.update(rollout=rollout, entropy=out.entropy)
        return rollout, timings

    task.make_rollout = recording
    row = fit(task, 1, tmp_path).rows[0]
    r, mask = seen["rollout"], seen["rollout"].mask
    assert not bool(mask.all()) and float(masked_mean(r.advantages.abs(), mask)) > 0.01
    assert row["loss/policy"] == pytest.approx(float(masked_mean(-r.advantages, mask)), rel=1e-4, abs=1e-6)
    assert row["val/value_loss"] == pytest.approx(float(0.5 * masked_mean((r.values - r.returns) ** 2, mask)),
                                                  rel=1e-4)
    assert row["policy/entropy"] == pytest.approx(float(masked_mean(seen["entropy"], mask)), rel=1e-4)
    assert row["val/ratio"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("limit", ["max_steps", "max_epochs"])
def test_the_lr_schedule_spans_the_runs_optimizer_steps_and_is_stepped_at_each(limit, tmp_path):
    """2 iterations x 2 optimizer steps, linear decay 2e-3 -> 0: the LR after iteration 1 is 1e-3
    and 0 after the last (the schedule was once stepped per iteration over a length in steps,
    ending halfway)."""
    task = policy(lr_schedule={"name": "linear", "warmup_steps": 0, "min_lr": 0.0})
    lrs = []

    class LearningRates(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    limits = {"max_steps": dict(max_epochs=-1, max_steps=4), "max_epochs": dict(max_epochs=1)}[limit]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LearningRates()], default_root_dir=str(tmp_path),
                        **limits)
    trainer.fit(task, train_dataloaders=prompt_loader())  # 64 prompts, batches of 32: 2 iterations
    assert task.schedule_steps() == 4 and lrs == pytest.approx([1e-3, 0.0], abs=1e-9)


def test_top_k_or_top_p_rollouts_warn_that_ppo_uses_the_full_distribution():
    with pytest.warns(UserWarning, match="top_k=5.*full policy at temperature 0.7.*TRL"):
        policy(temperature=0.7, top_k=5)
    with pytest.warns(UserWarning, match="top_p=0.9"):
        policy(top_p=0.9)


# ----------------------------------------------------------------------------- learning
def test_ppo_raises_a_token_count_reward_in_30_iterations(tmp_path):
    history = fit(policy(kl_coef=0.05), 30, tmp_path)
    before, after = history.mean("objective/scores", slice(0, 3)), history.mean("objective/scores", slice(-5, None))
    assert after >= 2 * before and after >= before + 0.3, (before, after)
    kl = [r["objective/kl"] for r in history.rows]
    assert kl[0] == 0.0 and all(math.isfinite(k) for k in kl) and kl[-1] > 0.1
    for key in ("objective/rlhf_reward", "objective/non_score_reward", "objective/entropy", "policy/approxkl",
                "policy/clipfrac", "policy/entropy", "val/value_loss", "val/clipfrac", "val/ratio",
                "response/mean_length", "time/generation_s", "time/update_s"):
        assert math.isfinite(history.rows[-1][key]), key
    assert history.rows[-1]["response/mean_length"] == 8.0


def test_a_very_large_beta_keeps_the_policy_at_the_reference(tmp_path):
    free, pinned = policy(kl_coef=0.05), policy(kl_coef=100.0)
    free_history, pinned_history = fit(free, 20, tmp_path), fit(pinned, 20, tmp_path)
    batch = next(iter(prompt_loader(seed=1)))
    assert exact_kl(pinned, batch) < 0.03 < 10 * exact_kl(pinned, batch) < exact_kl(free, batch)
    before = pinned_history.mean("objective/scores", slice(0, 3))
    after = pinned_history.mean("objective/scores", slice(-5, None))
    assert abs(after - before) < 0.25, (before, after)
    assert free_history.mean("objective/scores", slice(-5, None)) > after + 0.3
    assert abs(pinned_history.mean("objective/kl", slice(-5, None))) < 0.5


def test_training_is_deterministic_on_cpu(tmp_path):
    runs = []
    for _ in range(2):
        task = policy(kl_coef=0.05)
        history = fit(task, 3, tmp_path)
        runs.append((history.without_timings(), {k: v.clone() for k, v in task.state_dict().items()}))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_the_parameter_counts_include_the_value_head():
    task = policy()
    head = sum(p.numel() for p in task.value_head.parameters())
    assert task.total_parameter_count() == task.model.num_params() + head == task.trainable_parameter_count()
    lora = policy(adapter=LORA)
    assert lora.total_parameter_count() == lora.model.num_params() + head > lora.trainable_parameter_count()


def test_lora_ppo_trains_only_the_adapters_and_the_value_head(tmp_path):
    task = policy(adapter=LORA)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    fit(task, 2, tmp_path)
    changed = {k for k, v in task.state_dict().items() if not torch.equal(v, before[k])}
    assert {k for k in changed if ".lora_B" in k} and "value_head.weight" in changed
    assert all(".lora_" in k or k.startswith("value_head.") for k in changed), sorted(changed)
    assert task.reference_model is None


def test_qlora_ppo_needs_no_task_specific_code(tmp_path):
    pytest.importorskip("torchao")
    qlora = {**LORA, "name": "qlora", "compute_dtype": "float32"}
    task = policy(adapter=qlora, model={**TINY, "emb_dim": 128})  # 128-wide layers split into NF4 blocks
    assert task.reference_mode == "adapters_off" and type(task.model.blocks[0].attn.qkv).__name__ == "QLoRALinear"
    rollout, _ = task.make_rollout(next(iter(prompt_loader())))
    assert rollout.kl.abs().max() == 0  # the policy with its adapters off is the (quantized) reference
    history = fit(task, 3, tmp_path)
    assert history.rows[-1]["objective/kl"] > 0 and math.isfinite(history.rows[-1]["val/value_loss"])


def test_the_reward_model_path_end_to_end(tmp_path):
    """A reward model trained on synthetic pairs (chosen responses hold the token, rejected ones do
    not) is loaded from its checkpoint through the inference loader; PPO raises its score."""
    g = torch.Generator().manual_seed(0)

    def pair() -> tuple[list[int], list[int]]:
        prompt = torch.randint(1, V, (3,), generator=g).tolist()
        rejected = [t if t != TOKEN else TOKEN + 1 for t in torch.randint(1, V, (8,), generator=g).tolist()]
        chosen = [TOKEN if float(torch.rand(1, generator=g)) < 0.5 else t for t in rejected]
        return prompt + chosen, prompt + rejected

    pairs = [pair() for _ in range(256)]

    def collate(items):
        c, r = torch.tensor([p[0] for p in items]), torch.tensor([p[1] for p in items])
        ones = torch.ones_like(c)
        return {"chosen_input_ids": c, "chosen_attention_mask": ones, "rejected_input_ids": r,
                "rejected_attention_mask": ones}

    torch.manual_seed(0)
    rm = RewardModelTask(model=TINY, lr=3e-3, lr_schedule="constant", weight_decay=0.0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(rm, train_dataloaders=DataLoader(pairs, batch_size=32, shuffle=True, collate_fn=collate))
    trainer.save_checkpoint(tmp_path / "rm.ckpt")

    reward = RewardModel(ckpt_path=tmp_path / "rm.ckpt")
    history = fit(policy(reward=reward, kl_coef=0.05), 30, tmp_path)
    before, after = history.mean("objective/scores", slice(0, 3)), history.mean("objective/scores", slice(-5, None))
    with torch.no_grad():
        batch = collate(pairs[:64])
        chosen = rm(batch["chosen_input_ids"]).mean()
        rejected = rm(batch["rejected_input_ids"]).mean()
    assert after - before > 0.5 * float(chosen - rejected) > 0, (before, after, float(chosen), float(rejected))


# ----------------------------------------------------------------------------- settings, checkpoints, logging
@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=0.0), "task.temperature=0.0 must be > 0"),
    (dict(reference="adapters_off"), "adapters_off needs an adapter"),
    (dict(generation_cache="paged"), "generation_cache 'paged'.*dynamic"),
    (dict(kl_estimator="k9"), "kl_estimator 'k9'"),
    (dict(reward={"_target_": "gptlab.rewards.TokenCountReward"}), "callable built from a _target_"),
])
def test_invalid_settings_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        PPOTask(model=TINY, **{**FAST, **kwargs})


def test_training_without_a_reward_says_how_to_give_one(tmp_path):
    task = PPOTask(model=TINY, **FAST)
    with pytest.raises(ValueError, match="task=ppo needs a reward.*task/reward=token_count"):
        fit(task, 1, tmp_path)


def test_checkpoint_holds_no_reward_and_loads_as_a_language_model(tmp_path):
    task = policy(kl_coef=0.1, kl_target=1.0, kl_horizon=100)
    history = fit(task, 2, tmp_path)
    beta = task.kl_coef
    assert beta != 0.1 and history.rows[-1]["objective/kl_coef"] == pytest.approx(beta, rel=0.2)
    trainer = task.trainer
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    ckpt = torch.load(tmp_path / "ppo.ckpt", weights_only=True)
    assert ckpt["gptlab_task"] == "ppo" and "reward" not in ckpt["hyper_parameters"]
    assert "model" in ckpt[CHECKPOINT_KEY]  # built from scratch: the reference is stored for a resume
    restored = load_task(tmp_path / "ppo.ckpt")
    assert restored.reward_fn is None and torch.equal(restored.value_head.weight, task.value_head.weight)
    loaded = load_model(ckpt_path=tmp_path / "ppo.ckpt")
    assert loaded.kind == "lm" and loaded.task == "ppo"
    restored.on_load_checkpoint(ckpt)
    assert restored.kl_coef == beta
    with pytest.raises(WrongModelKind, match="not a reward model"):
        RewardModel(ckpt_path=tmp_path / "ppo.ckpt")  # a policy is no reward model
    with pytest.raises(ValueError, match="reward_checkpoint="):
        RewardModel()


def test_samples_table_goes_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    fit(policy(log_samples_every_n=2, log_samples=3), 3, tmp_path, logger=logger)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    tables = events.Tensors("samples/text_summary")
    assert [t.step for t in tables] == [0, 2]
    text = tables[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | response | score | KL | rank |") and text.count("\n") == 4
    assert "objective/scores" in events.Tags()["scalars"]


def test_rule_based_rewards_count_tokens_and_pattern_matches():
    assert TokenCountReward(" the")(completion_ids=[[262, 5, 262], [1]]) == [2.0, 0.0]
    with pytest.raises(ValueError, match="exactly one token"):
        TokenCountReward(" the cat")
    rule = RegexCountReward(r"(?i)\bplease\b", weight=0.5, max_count=2)
    assert rule(completions=["Please, please, PLEASE", "no"]) == [1.0, 0.0]


# ----------------------------------------------------------------------------- prompt data
def test_prompt_files_take_instructions_prompts_and_strings(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"instruction": "Add", "input": "1 + 1"}, {"prompt": "Say hi"}, "Name a color",
             {"instruction": "x", "input": "", "chosen": "a", "rejected": "b"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    entries = load_prompts(path)
    assert [(e["instruction"], e["input"]) for e in entries] == [("Add", "1 + 1"), ("Say hi", ""),
                                                                 ("Name a color", ""), ("x", "")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"text": "no prompt"}\n')
    with pytest.raises(PromptDataError, match=r"bad.jsonl: entry 1 \(line 3\) needs a string 'prompt'"):
        load_prompts(bad)


def test_prompt_batches_are_left_padded_in_the_prompt_style(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([f"Say {'very ' * i}much" for i in range(10)]))
    dm = PromptDataModule(path=str(path), batch_size=4, train_ratio=0.8, test_ratio=0.2, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    ids, mask = batch["prompt_ids"], batch["prompt_attention_mask"]
    assert ids.shape == mask.shape and bool(mask[:, -1].all()) and not bool(mask[0, 0])
    assert batch["prompts"][0].startswith("Below is an instruction") and batch["prompts"][0].endswith("### Response:\n")
    real = ids[0][mask[0].bool()].tolist()
    assert real == dm.train_set.prompt_ids[0]


# ----------------------------------------------------------------------------- the config path
def test_the_ppo_config_trains_and_writes_scored_test_answers(tmp_path):
    """``gptlab-train task=ppo data=prompts task/reward=token_count ...`` composed and run in-process
    (the CLI's own ``train``): the nested reward group is built by Hydra, answers carry rewards."""
    overrides = ["task=ppo", "data=prompts", "model=gpt2-tiny", "task/reward=token_count", "task.reward.token=' the'",
                 "data.max_entries=40", "data.batch_size=4", "data.val_batch_size=4", "task.max_new_tokens=4",
                 "task.ppo_epochs=1", "task.log_samples_every_n=1", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "test=true", "logger=tensorboard", "callbacks=none",
                 "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ignore_known_warnings()  # what gptlab-train sets up
        metrics = train(cfg)
    assert not [w for w in seen if "validation_step" in str(w.message)]  # PPO has no validation stage: no note
    assert math.isfinite(metrics["objective/scores"]) and "test/scores" in metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    total, trainable = (events.Scalars(f"params/{k}")[0].value for k in ("total", "trainable"))
    assert trainable == total > 0  # the value head counts in both (it once made trainable > total)
    answers = json.loads((tmp_path / "responses.json").read_text())
    assert len(answers) == 4 and all("model_response" in a and isinstance(a["reward"], float) for a in answers)
