"""The shared alignment arithmetic: one log-prob formula (equal to the two it replaced, values and
gradients), completions sampled G per prompt with their masks, and the reference model's checkpoint
state under one key, with checkpoints of the older layout (written by main d44eb15,
``tests/data/legacy/``) loading and resuming."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gptlab.alignment.logprobs import sequence_logps, token_logps
from gptlab.alignment.reference import CHECKPOINT_KEY, Reference
from gptlab.alignment.rollout import response_forward, sample_completions
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.tasks.dpo import DPOTask
from gptlab.tasks.ppo import PPOTask
from gptlab.tasks.registry import load_task

LEGACY = Path(__file__).parent / "data" / "legacy"
SMALL = dict(vocab_size=64, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
"""The shape of the legacy checkpoints (tests/data/legacy/make_checkpoints.py)."""
OLD_KEYS = ("dpo_ref_logps", "dpo_reference_state", "ppo_reference_state")


# ----------------------------------------------------------------------------- log-probs
def test_token_logps_equal_cross_entropy_and_log_softmax_gather_with_their_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[:, :2] = -100
    ours, _ = token_logps(logits, labels)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    ce = -F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction="none").view(3, 7)
    (g_ce,) = torch.autograd.grad(ce.sum(), logits)
    assert torch.equal(ours, ce) and torch.equal(g_ours, g_ce)
    gathered = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    at_t, entropy = token_logps(logits, labels, temperature=0.7, with_entropy=True)
    assert torch.equal(at_t, gathered.masked_fill(labels == -100, 0.0))
    p = torch.softmax(logits / 0.7, -1)
    assert torch.allclose(entropy, -(p * p.log()).sum(-1), atol=1e-5) and not entropy.requires_grad
    assert sequence_logps(logits, labels, "mean").tolist() == pytest.approx((ours.sum(-1) / 5).tolist())


# ----------------------------------------------------------------------------- completions
def test_completions_are_sampled_g_per_prompt_with_masks_for_stops_and_truncation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = sample_completions(model, prompt_ids, prompt_mask, max_new_tokens=6, temperature=0.0, stop_id=3,
                             num_generations=3)
    assert len(out) == 6 and torch.equal(out.prompt_ids[:3], prompt_ids[:1].expand(3, -1))
    assert torch.equal(out.tokens[0], out.tokens[2])  # greedy: a group's completions agree
    for row in range(6):
        tokens, mask = out.tokens[row].tolist(), out.mask[row].tolist()
        stop = tokens.index(3) if 3 in tokens else None
        assert out.stopped[row] == (stop is not None)
        assert mask == [True] * (len(tokens) if stop is None else stop + 1) + [False] * (0 if stop is None else
                                                                                          len(tokens) - stop - 1)
        assert out.completion_ids()[row] == tokens[: len(tokens) if stop is None else stop]
    assert out.prompt_id_lists()[:4] == [[5, 6]] * 3 + [[7, 8, 9]]
    with torch.no_grad():  # the packed rows give each completion's log-probs as a forward on it alone
        logps = response_forward(model, out.sequences, out.positions, out.tokens).logprobs
        alone = model(torch.tensor([[5, 6, *out.tokens[1].tolist()]]))[0, 1:-1]
        assert torch.allclose(logps[1], torch.log_softmax(alone, -1).gather(1, out.tokens[1][:, None])[:, 0],
                              atol=1e-5)


# ----------------------------------------------------------------------------- the reference's checkpoint state
def legacy(name: str) -> dict:
    return torch.load(LEGACY / f"{name}.ckpt", weights_only=True)


def test_a_reference_saves_under_one_key_and_loads_it_back():
    policy = GPT(GPTConfig(**SMALL))
    ref = Reference("copy", logps_tag="sum")
    ref.build(policy)
    ref.logps["val"] = {"chosen": torch.ones(2), "rejected": torch.zeros(2), "fingerprint": "x"}
    state = ref.state_dict(keep_model=True)
    again = Reference("copy", logps_tag="sum")
    again.load_state_dict(Reference.checkpoint_state({CHECKPOINT_KEY: state}), policy)
    assert again.policy_trained and torch.equal(again.logps["val"]["chosen"], torch.ones(2))
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), policy.state_dict().values()))
    other = Reference("copy", logps_tag="mean")  # tables of another reduction are not taken
    other.load_state_dict(state, policy)
    assert other.logps == {}


@pytest.mark.parametrize("name,task_cls,old_key", [("ppo_copy", PPOTask, "ppo_reference_state"),
                                                   ("dpo_copy", DPOTask, "dpo_reference_state")])
def test_a_copy_saved_under_the_old_keys_is_restored(name, task_cls, old_key):
    ckpt = legacy(name)
    assert old_key in ckpt and CHECKPOINT_KEY not in ckpt  # written by the old code
    task = load_task(LEGACY / f"{name}.ckpt")
    assert task.reference_mode == "copy"
    task.on_load_checkpoint(ckpt)
    restored = task.reference_model.state_dict()
    assert restored.keys() == ckpt[old_key].keys()
    assert all(torch.equal(restored[k], v) for k, v in ckpt[old_key].items())
    assert task.reference.policy_trained


def test_precomputed_log_probs_saved_under_the_old_key_are_restored():
    ckpt = legacy("dpo_precomputed")
    task = load_task(LEGACY / "dpo_precomputed.ckpt")
    task.on_load_checkpoint(ckpt)
    old = ckpt["dpo_ref_logps"]["splits"]
    assert set(task.ref_logps) == set(old) == {"train", "val", "test"}
    assert all(torch.equal(task.ref_logps[s][side], old[s][side]) for s in old for side in ("chosen", "rejected"))


def prompts() -> DataLoader:
    """The prompts the legacy PPO checkpoint was trained on (make_checkpoints.py)."""
    ids = torch.randint(1, 64, (8, 3), generator=torch.Generator().manual_seed(1))
    batch = [{"prompt_ids": row, "prompt_attention_mask": torch.ones(3, dtype=torch.long), "index": torch.tensor(i)}
             for i, row in enumerate(ids)]
    return DataLoader(batch, batch_size=8)


def test_a_ppo_run_resumes_from_an_old_checkpoint_and_saves_the_new_layout(tmp_path):
    torch.manual_seed(0)
    task = PPOTask(model=SMALL, reward=lambda completion_ids, **_: [float(len(c)) for c in completion_ids],
                   max_new_tokens=4, temperature=1.0, stop_token_id=None, ppo_epochs=1, log_samples_every_n=0,
                   lr=1e-2, lr_schedule="constant", weight_decay=0.0,
                   # the optimizer the old checkpoint was trained with (its betas were then PPO's default):
                   # a resume must not change it (gptlab.optim.refuse_resume_changes)
                   optimizer={"betas": [0.9, 0.95]})
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(task, train_dataloaders=prompts(), ckpt_path=str(LEGACY / "ppo_copy.ckpt"))
    old = legacy("ppo_copy")["ppo_reference_state"]
    assert trainer.global_step == 2 and all(torch.equal(task.reference_model.state_dict()[k], v) for k, v in old.items())
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    new = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert not set(OLD_KEYS) & set(new)
    assert new[CHECKPOINT_KEY]["mode"] == "copy"
    assert all(torch.equal(new[CHECKPOINT_KEY]["model"][k], v) for k, v in old.items())
