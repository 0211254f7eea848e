"""The optimizer node and LR schedule: parameter groups by weight-decay policy, building any
torch.optim optimizer (and nothing else) from a plain dict, the warmup/decay multipliers, and the
node kept as a plain dict in checkpoints that load with ``weights_only=True`` and resume."""

from __future__ import annotations

import math
import re

import lightning as L
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from gptlab.data.pretrain import SlidingWindowDataset
from gptlab.tasks.base import GPTTask
from gptlab.optim import (DEFAULT_OPTIMIZER, build_lr_scheduler, build_optimizer, lr_lambda, optimizer_class,
                          parameter_groups)
from gptlab.tasks.pretrain import PretrainTask

TINY = {"name": "gpt2-tiny", "context_length": 16}


def names(module: nn.Module, params: list[torch.Tensor]) -> set[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return {by_id[id(p)] for p in params}


# ----------------------------------------------------------------------------- parameter groups
def test_matrices_policy_decays_linear_weights_only():
    task = GPTTask(model=TINY)
    decay, no_decay = parameter_groups(task, 0.1, "matrices")
    assert (decay["name"], decay["weight_decay"], no_decay["name"], no_decay["weight_decay"]) == \
        ("decay", 0.1, "no_decay", 0.0)
    assert "model.blocks.0.attn.qkv.weight" in names(task, decay["params"])
    assert all(n.endswith(".weight") and "norm" not in n and "emb" not in n for n in names(task, decay["params"]))
    undecayed = names(task, no_decay["params"])
    assert {"model.tok_emb.weight", "model.final_norm.weight"} <= undecayed
    assert all(p.dim() == 1 or "emb" in n for n, p in task.named_parameters() if n in undecayed)


def test_all_policy_decays_every_trainable_parameter_once_as_the_book():
    task = GPTTask(model={**TINY, "tie_weights": True})
    task.model.final_norm.requires_grad_(False)
    (group,) = parameter_groups(task, 0.1, "all")
    trainable = {id(p) for p in task.parameters() if p.requires_grad}
    assert (group["name"], group["weight_decay"]) == ("decay", 0.1)
    assert len(group["params"]) == len(trainable) and {id(p) for p in group["params"]} == trainable


def test_an_unknown_decay_policy_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task.weight_decay_on 'some'; valid choices: \['matrices', 'all'\]"):
        GPTTask(model=TINY, weight_decay_on="some")


# ----------------------------------------------------------------------------- building the optimizer
def test_the_node_builds_adamw_with_its_settings_and_named_groups():
    model = nn.Linear(4, 3)
    node = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "betas": [0.8, 0.9], "eps": 1e-6,
            "weight_decay": 0.05, "fused": None}
    opt = build_optimizer(node, parameter_groups(model, 0.05))
    assert type(opt) is torch.optim.AdamW
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["eps"]) == (1e-3, (0.8, 0.9), 1e-6)
    assert [(g["name"], g["weight_decay"]) for g in opt.param_groups] == [("decay", 0.05), ("no_decay", 0.0)]
    assert opt.defaults["fused"] is True  # null = the fused kernel wherever torch has one: the CPU too


def test_fused_null_gives_way_to_an_explicit_choice():
    model = nn.Linear(4, 3)
    assert not build_optimizer({**DEFAULT_OPTIMIZER, "fused": False}, parameter_groups(model, 0.1)).defaults["fused"]
    foreach = build_optimizer({**DEFAULT_OPTIMIZER, "foreach": True}, parameter_groups(model, 0.1))
    assert not foreach.defaults["fused"] and foreach.defaults["foreach"] is True
    sgd = build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.1, "fused": None}, parameter_groups(model, 0.0))
    assert sgd.defaults["fused"] is True
    rmsprop = build_optimizer({"_target_": "torch.optim.RMSprop", "lr": 0.1, "fused": None}, parameter_groups(model, 0.0))
    assert "fused" not in rmsprop.defaults or not rmsprop.defaults["fused"]  # no fused kernel: not asked for


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_null_means_fused_on_cuda():
    model = nn.Linear(4, 3).cuda()
    assert build_optimizer(DEFAULT_OPTIMIZER, parameter_groups(model, 0.1)).defaults["fused"] is True


def test_any_torch_optim_class_can_be_the_target():
    node = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
    opt = build_optimizer(node, [{"params": [nn.Parameter(torch.ones(2))]}])
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "torch.optim.Optimizer",
                                    "torch.optim.lr_scheduler.LambdaLR"])
def test_a_target_outside_torch_optim_is_refused_with_the_choices(target):
    with pytest.raises(ValueError, match=rf"task.optimizer._target_='{re.escape(target)}' is not an optimizer of "
                                         r"torch.optim; valid choices: \[.*'torch.optim.AdamW'"):
        optimizer_class(target)
    with pytest.raises(ValueError, match="not an optimizer of torch.optim"):
        GPTTask(model=TINY, optimizer={"_target_": target, "lr": 1e-3})


def test_a_node_without_target_updates_the_default_adamw():
    task = GPTTask(model=TINY, optimizer={"lr": 3e-3})
    assert task.hparams.optimizer == {**DEFAULT_OPTIMIZER, "lr": 3e-3}


def test_partial_false_is_refused():
    with pytest.raises(ValueError, match="_partial_ must be true"):
        GPTTask(model=TINY, optimizer={**DEFAULT_OPTIMIZER, "_partial_": False})


def test_flat_keys_of_older_checkpoints_fold_into_the_nodes():
    task = GPTTask(model=TINY, lr=2e-3, betas=[0.9, 0.99], weight_decay=0.0, lr_schedule="linear", warmup_steps=5,
                   min_lr=1e-4, fused_adamw=None)
    assert task.hparams.optimizer == {**DEFAULT_OPTIMIZER, "lr": 2e-3, "betas": [0.9, 0.99], "weight_decay": 0.0}
    assert task.hparams.lr_schedule == {"name": "linear", "warmup_steps": 5, "min_lr": 1e-4}


# ----------------------------------------------------------------------------- the LR schedule
def test_warmup_then_cosine_to_min_lr():
    total, warmup, ratio = 110, 10, 0.1
    assert [lr_lambda(s, total, warmup, "cosine", ratio) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_lambda(10, total, warmup, "cosine", ratio) == pytest.approx(1.0)
    assert lr_lambda(60, total, warmup, "cosine", ratio) == pytest.approx(ratio + (1 - ratio) * 0.5)
    assert lr_lambda(110, total, warmup, "cosine", ratio) == pytest.approx(ratio)
    assert lr_lambda(60, total, warmup, "linear", ratio) == pytest.approx(ratio + (1 - ratio) * 0.5)
    assert lr_lambda(500, total, warmup, "constant", ratio) == 1.0


def test_the_scheduler_reads_warmup_fractions_and_absolute_min_lr():
    opt = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1e-3)
    sched = build_lr_scheduler(opt, {"name": "cosine", "warmup_steps": 0.1, "min_lr": 1e-4}, 1e-3, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10 warmup steps
    assert lrs[55] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] > 1e-4 and opt.param_groups[0]["lr"] == pytest.approx(1e-4)


def test_an_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task.lr_schedule.name 'step'; "
                                         r"valid choices: \['constant', 'cosine', 'linear'\]"):
        GPTTask(model=TINY, lr_schedule={"name": "step"})


# ----------------------------------------------------------------------------- checkpoints
def fit(task: L.LightningModule, root, steps: int, ckpt_path=None) -> L.Trainer:
    tokens = torch.randint(0, 50257, (400,)).tolist()
    loader = DataLoader(SlidingWindowDataset(tokens, 16), batch_size=4)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, loader, ckpt_path=ckpt_path)
    return trainer


def test_checkpoints_keep_the_node_as_a_plain_dict_and_resume_tokens_seen(tmp_path):
    # a constant schedule: resuming with more steps is allowed (a decaying one would be refused)
    task = PretrainTask(model=TINY, optimizer={"lr": 1e-3}, lr_schedule={"name": "constant"}, sample_prompt=None)
    trainer = fit(task, tmp_path, 3)
    assert task.tokens_seen == 3 * 4 * 16 and task.examples_seen == 12
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # nothing but plain containers and tensors
    assert ckpt["hyper_parameters"]["optimizer"] == {**DEFAULT_OPTIMIZER, "lr": 1e-3}
    assert ckpt["gptlab_progress"] == {"tokens_seen": 192, "examples_seen": 12}
    resumed = PretrainTask(model=TINY, optimizer={"lr": 1e-3}, lr_schedule={"name": "constant"}, sample_prompt=None)
    fit(resumed, tmp_path, 5, ckpt_path=path)
    assert resumed.tokens_seen == 5 * 4 * 16
    assert resumed.trainer.optimizers[0].param_groups[0]["name"] == "decay"


class StepLosses(L.Callback):
    """The training loss of every optimizer step, by step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit_same_batch(task: L.LightningModule, root, steps: int, ckpt_path=None) -> StepLosses:
    """Train on one batch repeated (every window the same): the losses depend only on the weights
    and the optimizer state, not on where a resumed loader starts."""
    pattern = torch.randint(0, 50257, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    loader = DataLoader(SlidingWindowDataset(pattern * 20 + pattern[:1], 16), batch_size=4)
    losses = StepLosses()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, limit_val_batches=0, accelerator="cpu", callbacks=[losses],
                        enable_checkpointing=False)
    trainer.fit(task, loader, ckpt_path=ckpt_path)
    return losses


@pytest.mark.parametrize("first,then", [(True, False), (False, True)])
def test_a_checkpoint_resumes_with_the_other_kernel_and_the_same_losses(tmp_path, first, then):
    def task(fused: bool) -> PretrainTask:
        torch.manual_seed(0)
        return PretrainTask(model=TINY, optimizer={"lr": 3e-3, "fused": fused}, lr_schedule={"name": "constant"},
                            sample_prompt=None)

    straight = fit_same_batch(task(first), tmp_path / "a", 6).losses
    before = task(first)
    fit_same_batch(before, tmp_path / "b", 3)
    assert before.trainer.optimizers[0].param_groups[0]["fused"] is first
    before.trainer.save_checkpoint(tmp_path / "b.ckpt")
    resumed = task(then)
    after = fit_same_batch(resumed, tmp_path / "c", 6, ckpt_path=tmp_path / "b.ckpt").losses
    # the run's own kernel, not the checkpoint's, and the step counters where that kernel keeps them
    opt = resumed.trainer.optimizers[0]
    assert all(g["fused"] is then for g in opt.param_groups)
    assert all(s["step"].item() == 6 for s in opt.state.values())
    assert sorted(after) == [4, 5, 6] and straight[6] < straight[1]  # it trained
    for step in (4, 5, 6):  # the two kernels round differently: equal to float32 noise, not bitwise
        assert after[step] == pytest.approx(straight[step], rel=1e-4), (step, after, straight)
