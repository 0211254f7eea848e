"""task=grpo on tiny models: a rule-based reward rises, a huge beta pins the policy to its reference,
TRL's metric names, failing rewards stop the step before the update, settings refused up front,
LoRA, num_iterations and truncated completions; and the config path end to end. Every run is a tiny
64-token-vocabulary GPT on one thread."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.loggers import TensorBoardLogger

from gptlab.cli.train import train
from gptlab.errors import ConfigError
from gptlab.rewards import AnswerReward, FormatReward, RewardError, TokenCountReward
from gptlab.tasks.grpo import GRPOTask
from gptlab.tasks.registry import load_task

from conftest import CONF_DIR
from online_rl import History, fit_iterations, one_thread, prompt_loader  # noqa: F401 - one_thread: autouse

V = 64
TOKEN = 7
TINY = dict(vocab_size=V, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
LORA = dict(name="lora", rank=4, alpha=8, targets=["q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"])
FAST = dict(num_generations=4, max_new_tokens=8, temperature=1.0, stop_token_id=None, lr=2e-3,
            lr_schedule="constant", weight_decay=0.0, log_samples_every_n=0)
"""8 new tokens, no stop token (every completion is 8 long), 8 prompts x 4 completions per step."""


def fit(task: GRPOTask, steps: int, tmp_path, seed: int = 0, **trainer_kw) -> History:
    """``steps`` GRPO steps (batches of 8 prompts) on CPU, seeded."""
    return fit_iterations(task, steps, tmp_path, prompt_loader(32, 8, vocab=V), seed, **trainer_kw)


def policy(seed: int = 0, rewards=None, **kw) -> GRPOTask:
    torch.manual_seed(seed)
    return GRPOTask(**{"model": TINY, "rewards": rewards or {"count": TokenCountReward(TOKEN)}, **FAST, **kw})


@torch.no_grad()
def exact_kl(task: GRPOTask, batch: dict) -> float:
    """Mean per-token KL(π ‖ π_ref) over whole distributions on fresh completions."""
    sampled = task.sample(batch, 1.0, 4)
    logps = []
    for model in (task.model, task.reference_model):
        hidden = model.hidden_states(sampled.sequences)
        at = hidden.gather(1, sampled.positions[..., None].expand(-1, -1, hidden.size(-1)))
        logps.append(torch.log_softmax(model.logits(at).float(), dim=-1))
    return float(((logps[0].exp() * (logps[0] - logps[1])).sum(-1)).mean())


# ----------------------------------------------------------------------------- learning
def test_grpo_raises_a_token_count_reward(tmp_path):
    history = fit(policy(), 25, tmp_path)
    before, after = history.mean("reward", slice(0, 3)), history.mean("reward", slice(-5, None))
    assert after >= 2 * before and after >= before + 0.3, (before, after)
    last = history.rows[-1]
    for key in ("reward", "reward_std", "rewards/count/mean", "rewards/count/std", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "loss", "time/generation_s", "time/scoring_s",
                "time/update_s"):
        assert math.isfinite(last[key]), key
    assert last["completions/mean_length"] == 8.0 and last["completions/clipped_ratio"] == 1.0
    assert "kl" not in last  # beta = 0: no reference, no KL
    assert last["clip_ratio/region_mean"] == 0.0  # one iteration: the ratio is exactly 1


def test_a_huge_beta_keeps_the_policy_at_the_reference(tmp_path):
    free, pinned = policy(beta=0.0), policy(beta=100.0)
    free_history, pinned_history = fit(free, 15, tmp_path), fit(pinned, 15, tmp_path)
    assert free.reference_model is None and pinned.reference_model is not None  # a reference only when beta > 0
    batch = next(iter(prompt_loader(32, 8, seed=1, vocab=V)))
    free.init_reference("copy")
    free.reference.model = pinned.reference_model  # same seed: the same starting weights
    pinned_kl, free_kl = exact_kl(pinned, batch), exact_kl(free, batch)
    assert pinned_kl < 0.02 and 10 * pinned_kl < free_kl, (pinned_kl, free_kl)
    assert pinned_history.rows[0]["kl"] == 0.0 and all(math.isfinite(r["kl"]) for r in pinned_history.rows)
    # the free policy learned the reward, the pinned one stayed near where it started (0.36 vs 0.19 seen)
    assert free_history.mean("reward", slice(-5, None)) > pinned_history.mean("reward", slice(-5, None)) + 0.1


# ----------------------------------------------------------------------------- bad input
def nan_on_third(*, completions, **kwargs):
    return [float("nan") if i == 2 else 1.0 for i in range(len(completions))]


@pytest.mark.parametrize("fn, message", [
    (nan_on_third, r"reward function 'bad' \(test_grpo.nan_on_third\) returned nan for completion 2 \(prompt"),
    (lambda **kw: [1.0], r"reward function 'bad' .* returned 1 scores for 32 completions"),
])
def test_a_reward_that_fails_is_named_with_the_sample_and_nothing_is_updated(tmp_path, fn, message):
    task = policy(rewards={"count": TokenCountReward(TOKEN), "bad": fn})
    before = {k: v.clone() for k, v in task.state_dict().items()}
    with pytest.raises(RewardError, match=message):
        fit(task, 1, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in task.state_dict().items())


def test_a_reward_that_raises_is_named_with_the_first_sample_it_fails_on(tmp_path):
    def picky(*, completion_ids, **kwargs):
        if any(7 in ids for ids in completion_ids):
            raise KeyError("token 7")
        return [0.0] * len(completion_ids)

    task = policy(rewards={"picky": picky})
    with pytest.raises(RewardError, match=r"reward function 'picky' .*picky\) raised KeyError: 'token 7' on "
                                          r"completion \d+ \(prompt"):
        fit(task, 1, tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_generations=1), "num_generations=1 must be >= 2: GRPO compares completions of the same prompt"),
    (dict(loss_type="drgrpo"), "unknown GRPO loss_type 'drgrpo'"),
    (dict(reward_weights={"cnt": 2.0}), r"unknown reward_weights field\(s\) \['cnt'\] \(did you mean count\?\)"),
    (dict(epsilon=0.2, epsilon_high=0.1), "epsilon_high=0.1 must be >= epsilon=0.2"),
    (dict(temperature=0.0), "greedy decoding gives G identical ones"),
    (dict(reference="adapters_off", beta=0.1), "adapters_off needs an adapter"),
    (dict(rewards={"x": {"_target_": "gptlab.rewards.FormatReward"}}), "task.rewards.x must be a callable"),
])
def test_invalid_settings_are_refused_before_the_model_is_built(kwargs, message):
    with pytest.raises((ConfigError, ValueError, TypeError), match=message):
        policy(**kwargs)


def test_training_without_rewards_says_how_to_give_one(tmp_path):
    task = GRPOTask(model=TINY, **FAST)
    with pytest.raises(ValueError, match="task=grpo needs at least one reward function"):
        fit(task, 1, tmp_path)


# ----------------------------------------------------------------------------- options
def test_reward_weights_weigh_each_function_in_the_sum(tmp_path):
    task = policy(rewards={"count": TokenCountReward(TOKEN), "const": lambda completions, **kw: [1.0] * len(completions)},
                  reward_weights={"const": 0.5})
    history = fit(task, 1, tmp_path)
    row = history.rows[0]
    assert row["reward"] == pytest.approx(row["rewards/count/mean"] + 0.5 * row["rewards/const/mean"])
    assert row["rewards/const/mean"] == 1.0


def test_num_iterations_takes_several_steps_on_the_same_completions(tmp_path):
    task = policy(num_iterations=3, epsilon=0.01, lr=2e-2)
    history = fit(task, 2, tmp_path)
    assert task.global_step == 6
    assert history.rows[-1]["clip_ratio/region_mean"] > 0  # later iterations move pi away from pi_old


def test_masked_truncated_completions_leave_the_loss(tmp_path):
    task = policy(mask_truncated_completions=True)  # no stop token: every completion is truncated
    before = {k: v.clone() for k, v in task.state_dict().items()}
    history = fit(task, 1, tmp_path)
    assert history.rows[0]["loss"] == 0.0
    assert all(torch.equal(v, before[k]) for k, v in task.state_dict().items())


def test_lora_grpo_trains_only_adapters_and_its_reference_is_the_policy_with_adapters_off(tmp_path):
    task = policy(adapter=LORA, beta=0.1)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    history = fit(task, 2, tmp_path)
    assert task.reference_mode == "adapters_off" and task.reference_model is None
    assert history.rows[0]["kl"] == 0.0
    changed = {k for k, v in task.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)


def test_qlora_grpo_needs_no_task_specific_code(tmp_path):
    pytest.importorskip("torchao")
    qlora = {**LORA, "name": "qlora", "compute_dtype": "float32"}
    task = policy(adapter=qlora, model={**TINY, "emb_dim": 128}, beta=0.1)
    history = fit(task, 2, tmp_path)
    assert type(task.model.blocks[0].attn.qkv).__name__ == "QLoRALinear"
    assert history.rows[0]["kl"] == 0.0 and math.isfinite(history.rows[-1]["loss"])


def test_answer_and_format_rewards_read_the_final_answer():
    entries = [{"answer": "46"}, {"answer": "46"}, {"answer": "12"}]
    texts = ["4 6 + 0 = 4 6\nAnswer: 4 6", "Answer: 47", "no answer"]
    assert AnswerReward()(completions=texts, entries=entries) == [1.0, 0.0, 0.0]
    assert FormatReward()(completions=texts) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="entry of completion 0 has no 'answer'"):
        AnswerReward()(completions=texts, entries=[{}, {}, {}])


def test_samples_table_and_checkpoint_without_rewards(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb", version="")
    task = policy(log_samples_every_n=2, log_samples=3)
    fit(task, 3, tmp_path, logger=logger)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0}).Reload()
    tables = events.Tensors("samples/text_summary")
    assert [t.step for t in tables] == [0, 2]
    text = tables[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | completion | reward | advantage |") and text.count("\n") == 4
    assert {"reward", "frac_reward_zero_std", "completions/clipped_ratio"} <= set(events.Tags()["scalars"])
    task.trainer.save_checkpoint(tmp_path / "grpo.ckpt")
    ckpt = torch.load(tmp_path / "grpo.ckpt", weights_only=True)
    assert ckpt["gptlab_task"] == "grpo" and "rewards" not in ckpt["hyper_parameters"]
    restored = load_task(tmp_path / "grpo.ckpt")
    assert restored.reward_fns == {} and all(torch.equal(restored.state_dict()[k], v)
                                             for k, v in task.state_dict().items())


# ----------------------------------------------------------------------------- the config path
def test_the_grpo_config_trains_on_problems_and_writes_graded_test_answers(tmp_path):
    """``gptlab-train task=grpo data=problems ...`` composed and run in-process: the rewards dict is
    built by Hydra, the validation stage (data.num_val problems) logs greedy accuracy during training,
    the test stage logs held-out accuracy and writes answers with their rewards."""
    overrides = ["task=grpo", "data=problems", "model=gpt2-tiny", "data.num_train=16", "data.num_test=4",
                 "data.num_val=3",
                 "data.prompt_style=raw", "data.batch_size=2", "data.val_batch_size=4", "task.num_generations=2",
                 "task.max_new_tokens=4", "task.log_samples_every_n=1", "task.beta=0.1", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=2", "test=true", "logger=tensorboard", "callbacks=none",
                 "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = train(cfg)
    assert math.isfinite(metrics["reward"]) and math.isfinite(metrics["kl"])
    assert 0.0 <= metrics["test/rewards/answer/mean"] <= 1.0 and "test/rewards/format/mean" in metrics
    assert 0.0 <= metrics["val/rewards/answer/mean"] <= 1.0 and metrics["val/completion_length"] > 0
    answers = json.loads((tmp_path / "responses.json").read_text())
    assert len(answers) == 4 and all(set(a["rewards"]) == {"answer", "format"} and "answer" in a for a in answers)


def test_the_pre_flight_names_a_bad_grpo_config(tmp_path):
    from gptlab.cli.validation import validate_train_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["task=grpo", "data=problems", "task.num_generations=1",
                                          "+task.reward_weights.anwser=2", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        validate_train_config(cfg)
    assert "task.num_generations=1: expected an integer >= 2" in str(e.value)
    assert "task.reward_weights.anwser: unknown key" in str(e.value) and "did you mean answer?" in str(e.value)


def test_ppo_rule_configs_plug_into_the_rewards_of_grpo(tmp_path):
    """``+task/reward@task.rewards.<name>=regex``: the rule configs of task/reward/ become named GRPO rewards."""
    from gptlab.cli.train import build_task
    from gptlab.cli.validation import validate_train_config
    from gptlab.rewards import RegexCountReward

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["task=grpo", "data=prompts", "model=gpt2-tiny", "~task.rewards.answer",
                                          "~task.rewards.format", "~task.reward_weights",
                                          "+task/reward@task.rewards.please=regex", "task.rewards.please.pattern=please",
                                          f"paths.output_dir={tmp_path}"])
    validate_train_config(cfg)
    task = build_task(cfg)
    assert list(task.reward_fns) == ["please"] and isinstance(task.reward_fns["please"], RegexCountReward)


@pytest.mark.parametrize("limit", ["max_steps", "max_epochs"])
def test_the_lr_schedule_spans_the_runs_optimizer_steps_and_is_stepped_at_each(limit, tmp_path):
    """2 batches x num_iterations=2 optimizer steps, linear decay 1e-2 -> 0 over the 4 steps: the LR
    after the first batch is 5e-3 and 0 after the last (it was once stepped per batch over a length
    counted in optimizer steps, ending halfway)."""
    task = policy(num_iterations=2, lr=1e-2, lr_schedule={"name": "linear", "warmup_steps": 0, "min_lr": 0.0})
    lrs = []

    class LearningRates(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[LearningRates()], default_root_dir=str(tmp_path),
                        **{"max_steps": dict(max_epochs=-1, max_steps=4), "max_epochs": dict(max_epochs=1)}[limit])
    trainer.fit(task, train_dataloaders=prompt_loader(16, 8, vocab=V))  # 16 prompts, batches of 8: 2 batches
    assert task.schedule_steps() == 4 and lrs == pytest.approx([5e-3, 0.0], abs=1e-9)
