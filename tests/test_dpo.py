"""DPO: the loss against hand computations, log-probs, one forward pass, the three reference modes
(same loss; ln 2 at step 0), LoRA training only the adapter, precomputed log-probs cached and
reused on resume, and a short run that learns the preferred pattern."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint

from gptlab.data.preference import PreferenceDataModule
from gptlab.model.config import GPTConfig
from gptlab.model.generation import generate
from gptlab.model.lora import disable_lora, lora_layers, read_adapter
from gptlab.alignment.logprobs import pair_logps, sequence_logps
from gptlab.alignment.losses import dpo_loss
from gptlab.alignment.reference import CHECKPOINT_KEY
from gptlab.tasks.dpo import DPOTask
from gptlab.tokenizer import EOT_ID, get_tokenizer

TINY = GPTConfig.from_name("gpt2-tiny").to_dict()
LORA = dict(name="lora", rank=4, alpha=8, targets=["q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"])
LN2 = math.log(2)


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                        "default_root_dir": str(tmp_path), **kw})


def datamodule(path, **kw) -> PreferenceDataModule:
    """84 train / 24 val / 12 test synthetic pairs (conftest.synthetic_pairs)."""
    return PreferenceDataModule(**{"path": str(path), "prompt_style": "raw", "train_ratio": 0.7, "test_ratio": 0.1,
                                   "shuffle_before_split": True, "batch_size": 8, **kw})


def task(seed: int = 0, **kw) -> DPOTask:
    torch.manual_seed(seed)
    return DPOTask(**{"model": TINY, "lr": 3e-3, "weight_decay": 0.0, "lr_schedule": "constant",
                      "max_new_tokens": 6, **kw})


# ----------------------------------------------------------------------------- the loss
P_C, P_R = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
R_C, R_R = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
DELTA = [(-1.0 + 1.5) - (-3.0 + 2.5), (-2.0 + 2.0) - (-1.0 + 1.5)]  # [1.0, -0.5]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type,smoothing,expected", [
    ("sigmoid", 0.0, [-log_sigmoid(0.1 * d) for d in DELTA]),
    ("sigmoid", 0.2, [-0.8 * log_sigmoid(0.1 * d) - 0.2 * log_sigmoid(-0.1 * d) for d in DELTA]),
    ("ipo", 0.0, [(d - 1 / (2 * 0.1)) ** 2 for d in DELTA]),
    ("hinge", 0.0, [max(0.0, 1 - 0.1 * d) for d in DELTA]),
])
def test_dpo_loss_matches_a_hand_computation(loss_type, smoothing, expected):
    losses, chosen, rejected = dpo_loss(P_C, P_R, R_C, R_R, beta=0.1, loss_type=loss_type, label_smoothing=smoothing)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.05, 0.0]) and rejected.tolist() == pytest.approx([-0.05, 0.05])


def test_equal_policy_and_reference_give_ln2_and_zero_rewards():
    losses, chosen, rejected = dpo_loss(P_C, P_R, P_C, P_R)
    assert losses.tolist() == pytest.approx([LN2, LN2], abs=1e-7)
    assert chosen.tolist() == rejected.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), r"beta=0.0 must be > 0"),
    (dict(loss_type="kto"), r"unknown DPO loss_type 'kto'; valid choices: \['sigmoid', 'ipo', 'hinge'\]"),
    (dict(loss_type="ipo", label_smoothing=0.1), r"label_smoothing applies to loss_type=sigmoid only"),
    (dict(label_smoothing=0.5), r"label_smoothing=0.5 must be in \[0, 0.5\)"),
    (dict(logp_reduction="max"), r"unknown logp_reduction 'max'; valid choices: \['sum', 'mean'\]"),
    (dict(reference="frozen"), r"unknown reference 'frozen'; valid choices"),
    (dict(reference="adapters_off"), r"reference=adapters_off needs an adapter \(adapter=lora\)"),
])
def test_bad_settings_are_refused_before_the_model_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPOTask(model=TINY, **kwargs)


def test_ipo_over_summed_log_probs_warns_and_over_means_does_not(recwarn):
    """IPO's target margin 1/(2 beta) is set for per-token mean log-probs (TRL averages them for ipo)."""
    with pytest.warns(UserWarning, match="loss_type=ipo with task.logp_reduction=sum.*logp_reduction=mean"):
        DPOTask(model=TINY, loss_type="ipo")
    recwarn.clear()
    DPOTask(model=TINY, loss_type="ipo", logp_reduction="mean")
    DPOTask(model=TINY, loss_type="sigmoid")
    assert not [w for w in recwarn if "ipo" in str(w.message)]


# ----------------------------------------------------------------------------- log-probs
def test_sequence_logps_sum_and_mean_over_the_scored_tokens():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 10]])
    picked = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    assert torch.allclose(sequence_logps(logits, labels, "sum"), picked.sum(-1), atol=1e-6)
    assert torch.allclose(sequence_logps(logits, labels, "mean"), picked.sum(-1) / torch.tensor([2, 3]), atol=1e-6)


def test_chosen_and_rejected_go_through_the_model_in_one_forward_pass(preference_file):
    dm = datamodule(preference_file)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    t = task()
    calls = []
    t.model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    chosen, rejected = pair_logps(t.model, batch)
    B, T = batch["chosen_input_ids"].shape
    assert calls == [(2 * B, T)]
    with torch.no_grad():  # the same numbers as two separate passes
        alone = sequence_logps(t.model(batch["chosen_input_ids"]), batch["chosen_labels"])
    assert torch.allclose(chosen, alone, atol=1e-4)


# ----------------------------------------------------------------------------- reference modes
def randomize_lora(model: torch.nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for _, B in layer._pairs():
                B.copy_(torch.randn(B.shape, generator=gen) * 0.2)


def test_three_reference_modes_give_ln2_at_step_0_and_the_same_loss_after(preference_file, tmp_path):
    dm = datamodule(preference_file)
    before, after = {}, {}
    for mode in ("copy", "adapters_off", "precomputed"):
        t = task(adapter=LORA, reference=mode)  # same seed: the same base weights and LoRA A
        tr = trainer(tmp_path / mode)
        before[mode] = tr.validate(t, datamodule=dm, verbose=False)[0]
        randomize_lora(t.model)  # the policy moves, the reference must not
        after[mode] = tr.validate(t, datamodule=dm, verbose=False)[0]
        assert (t.reference_model is not None) == (mode == "copy")
    for mode, m in before.items():
        assert m["val/loss"] == pytest.approx(LN2, abs=1e-6), mode
        assert m["val/rewards/margins"] == m["val/rewards/chosen"] == m["val/rewards/accuracies"] == 0.0, mode
    assert abs(after["copy"]["val/loss"] - LN2) > 1e-3
    for mode in ("adapters_off", "precomputed"):
        for name, value in after["copy"].items():
            assert after[mode][name] == pytest.approx(value, abs=1e-5), (mode, name)


def test_lora_dpo_trains_only_the_adapter_and_leaves_the_reference_unchanged(preference_file, tmp_path):
    dm = datamodule(preference_file)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    t = task(adapter=LORA)
    assert t.reference_mode == "adapters_off"
    base = {k: v.clone() for k, v in t.model.state_dict().items() if ".lora_" not in k}
    lora = {k: v.clone() for k, v in t.model.state_dict().items() if ".lora_B" in k}
    with torch.no_grad():
        ref_before = t.model(batch["chosen_input_ids"])
    trainer(tmp_path, max_steps=4).fit(t, datamodule=dm)
    state = t.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert all(not torch.equal(state[k], v) for k, v in lora.items())
    with torch.no_grad(), disable_lora(t.model):
        assert torch.equal(t.model(batch["chosen_input_ids"]), ref_before)
    tensors, config = read_adapter(tmp_path / "checkpoints" / "adapter.safetensors")
    assert tensors and all(".lora_" in k for k in tensors) and config["init_from"] is None


def test_precomputed_ref_logps_are_cached_beside_the_run_and_reused_on_resume(preference_file, tmp_path,
                                                                              monkeypatch):
    dm = datamodule(preference_file)
    first = task(reference="precomputed")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run1" / "ckpt", save_last=True)
    trainer(tmp_path / "run1", max_epochs=1, limit_train_batches=3, callbacks=[ckpt], enable_checkpointing=True).fit(
        first, datamodule=dm)
    cache = tmp_path / "run1" / "ref_logps.safetensors"
    assert cache.is_file() and set(first.ref_logps) == {"train", "val", "test"}
    assert first.reference_model is None and len(first.ref_logps["train"]["chosen"]) == 84
    stored = torch.load(ckpt.last_model_path, weights_only=True)[CHECKPOINT_KEY]["logps"]
    assert torch.equal(stored["splits"]["val"]["rejected"], first.ref_logps["val"]["rejected"])

    def no_second_pass(*args, **kwargs):
        raise AssertionError("reference log-probs were computed again")

    # resume in another folder (no cache file there): the checkpoint's copy is used
    monkeypatch.setattr(DPOTask, "_compute_ref_logps", no_second_pass)
    resumed = task(seed=1, reference="precomputed")
    trainer(tmp_path / "run2", max_epochs=2, limit_train_batches=3).fit(resumed, datamodule=dm,
                                                                        ckpt_path=ckpt.last_model_path)
    assert torch.equal(resumed.ref_logps["train"]["chosen"], first.ref_logps["train"]["chosen"])
    # a fresh run from the same starting weights reuses the cache file
    fresh = task(reference="precomputed", ref_logps_path=str(cache))
    trainer(tmp_path / "run3", max_steps=1).fit(fresh, datamodule=dm)
    assert torch.equal(fresh.ref_logps["val"]["chosen"], first.ref_logps["val"]["chosen"])
    # other starting weights: the file does not fit, and this time a pass is needed
    with pytest.raises(AssertionError, match="computed again"):
        trainer(tmp_path / "run4", max_steps=1).fit(task(seed=5, reference="precomputed", ref_logps_path=str(cache)),
                                                   datamodule=dm)


# ----------------------------------------------------------------------------- learning
def greedy_starts(model: torch.nn.Module, prompts: list[str], word: str) -> int:
    tok = get_tokenizer()
    hits = 0
    for prompt in prompts:
        ids = torch.tensor(tok.encode(prompt))
        hits += tok.decode(generate(model, ids, 3, eos_id=EOT_ID)[len(ids):].tolist()).strip().startswith(word)
    return hits


def test_short_dpo_run_prefers_the_chosen_pattern_on_held_out_pairs(preference_file, tmp_path):
    dm = datamodule(preference_file)
    dm.setup()
    prompts = [e["prompt"] for e in dm.val_set.entries]
    t = task()
    before = greedy_starts(t.model, prompts, "Thanks")
    tr = trainer(tmp_path, max_epochs=1)
    tr.fit(t, datamodule=dm)
    m = tr.callback_metrics
    assert {f"train/{k}" for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                   "rewards/margins", "logps/chosen", "logps/rejected")} <= set(m)
    assert float(m["val/rewards/accuracies"]) >= 0.9 and float(m["val/rewards/margins"]) > 0.5
    assert float(m["val/loss"]) < 0.3
    after = greedy_starts(t.model, prompts, "Thanks")
    assert before == 0 and after >= 0.9 * len(prompts), (before, after)
    test = tr.test(t, datamodule=dm, verbose=False)[0]
    assert test["test/rewards/accuracies"] >= 0.9
    answers = (tmp_path / "responses.json").read_text()
    assert answers.count('"model_response": "Thanks') >= 10  # 12 test prompts
