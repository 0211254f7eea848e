"""Reward model: the Bradley-Terry loss (margin, centring), the scalar head at the last real token,
a short run reaching >= 0.9 held-out accuracy, LoRA training (and saving) the head, init_from an
SFT checkpoint, and scoring responses."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gptlab.alignment.losses import bradley_terry_loss as reward_loss
from gptlab.data.instruct import InstructionDataModule
from gptlab.data.preference import PreferenceDataModule
from gptlab.inference import score_responses
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.heads import add_reward_head, reward_scores
from gptlab.model.lora import load_adapter, read_adapter
from gptlab.tasks.instruct import InstructionTask
from gptlab.tasks.reward import RewardModelTask
from gptlab.weights.checkpoint import load_backbone

TINY = GPTConfig.from_name("gpt2-tiny").to_dict()
LORA = dict(name="lora", rank=4, alpha=8, targets=["q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj", "head"])


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "default_root_dir": str(tmp_path), **kw})


def datamodule(path, **kw) -> PreferenceDataModule:
    return PreferenceDataModule(**{"path": str(path), "prompt_style": "raw", "train_ratio": 0.7, "test_ratio": 0.1,
                                   "shuffle_before_split": True, "batch_size": 8, **kw})


def test_bradley_terry_loss_with_margin_and_centring_matches_a_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    bt = [-math.log(1 / (1 + math.exp(-d))) for d in (1.0, -1.0)]
    assert float(reward_loss(chosen, rejected)) == pytest.approx(sum(bt) / 2, abs=1e-6)
    with_margin = [-math.log(1 / (1 + math.exp(-d))) for d in (1.0 - 0.5, -1.0 - 2.0)]
    assert float(reward_loss(chosen, rejected, torch.tensor([0.5, 2.0]))) == pytest.approx(sum(with_margin) / 2)
    centred = float(reward_loss(chosen, rejected, center_rewards_coefficient=0.01))
    assert centred == pytest.approx(sum(bt) / 2 + 0.01 * (3.0 ** 2 + 2.0 ** 2) / 2, abs=1e-6)


def test_the_reward_is_read_at_the_last_real_token_whatever_the_padding():
    model = add_reward_head(GPT(GPTConfig.from_name("gpt2-tiny"))).eval()
    ids = torch.randint(0, 50257, (1, 7))
    padded = torch.cat([ids, torch.full((1, 5), 50256)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(reward_scores(model, ids), reward_scores(model, padded, mask), atol=1e-5)
    assert model.out_head.out_features == 1 and float(model.out_head.bias.detach()) == 0.0


def test_short_run_ranks_held_out_pairs(preference_file, tmp_path):
    dm = datamodule(preference_file)
    torch.manual_seed(0)
    task = RewardModelTask(model=TINY, lr=3e-3, lr_schedule="constant")
    tr = trainer(tmp_path, max_epochs=2)
    before = tr.validate(task, datamodule=dm, verbose=False)[0]
    tr.fit(task, datamodule=dm)
    m = {k: float(v) for k, v in tr.callback_metrics.items()}
    assert {"train/loss", "train/accuracy", "val/accuracy", "val/margin", "val/rewards/chosen",
            "val/rewards/rejected"} <= set(m)
    assert m["val/accuracy"] >= 0.9 and m["val/margin"] > 1.0 and m["val/loss"] < before["val/loss"] - 0.3
    assert tr.test(task, datamodule=dm, verbose=False)[0]["test/accuracy"] >= 0.9
    dm.setup()
    entries = dm.test_set.entries
    chosen = score_responses(task.model, entries, "raw", response_key="chosen", batch_size=5)
    rejected = score_responses(task.model, entries, "raw", response_key="rejected")
    assert sum(c > r for c, r in zip(chosen, rejected)) >= 0.9 * len(entries)


def test_lora_trains_and_saves_the_head_and_an_sft_checkpoint_can_be_the_start(preference_file, tmp_path):
    # an "SFT" checkpoint: any gptlab checkpoint with a language-model head
    sft_ckpt = tmp_path / "sft" / "last.ckpt"
    torch.manual_seed(0)
    sft = InstructionTask(model=TINY)
    tr = trainer(tmp_path / "sft", max_steps=1, enable_checkpointing=True,
                 callbacks=[ModelCheckpoint(dirpath=tmp_path / "sft", save_last=True)])
    tr.fit(sft, datamodule=InstructionDataModule(max_entries=20, batch_size=4, allowed_max_length=64))
    task = RewardModelTask(model=TINY, init_from=str(sft_ckpt), adapter=LORA, lr=3e-3)
    assert torch.equal(task.model.blocks[0].mlp.fc.weight, sft.model.blocks[0].mlp.fc.weight)
    assert "lora_A" not in dict(task.model.out_head.named_parameters())  # LoRA stays off the scalar head
    assert all(p.requires_grad for p in task.model.out_head.parameters())
    head_before = task.model.out_head.weight.clone()
    trainer(tmp_path / "rm", max_steps=3).fit(task, datamodule=datamodule(preference_file))
    assert not torch.equal(task.model.out_head.weight, head_before)
    tensors, config = read_adapter(tmp_path / "rm" / "checkpoints" / "adapter.safetensors")
    assert {"out_head.weight", "out_head.bias"} <= set(tensors) and (config["task"], config["kind"]) == ("reward_model", "reward")
    # base (the SFT model) + adapter = the trained reward model
    base = load_backbone(sft_ckpt)
    load_adapter(base, tmp_path / "rm" / "checkpoints" / "adapter.safetensors")
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert torch.allclose(reward_scores(base.eval(), ids), reward_scores(task.model.eval(), ids), atol=1e-5)
