"""Preference tuning from the outside: the presets, DPO and reward-model checkpoints through the one
inference loader (registered tasks, recorded kinds), gptlab-reward (a file, a baseline side by
side, one verbatim prompt/response) and gptlab-respond (the test stage's answers, again)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError

from conftest import CONF_DIR, run_cli
from gptlab.cli.respond import run as respond_run
from gptlab.cli.reward import run as reward_run
from gptlab.data.preference import PreferenceDataModule
from gptlab.inference import WrongModelKind, load_model
from gptlab.model.config import GPTConfig
from gptlab.tasks.dpo import DPOTask
from gptlab.tasks.registry import TASKS
from gptlab.inference import score_responses
from gptlab.tasks.reward import RewardModelTask

TINY = GPTConfig.from_name("gpt2-tiny").to_dict()
DATA = {"prompt_style": "raw", "train_ratio": 0.7, "test_ratio": 0.1, "shuffle_before_split": True, "batch_size": 8}


def fit(task: L.LightningModule, root, dm, epochs: int, **kw) -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)
    tr = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, max_epochs=epochs, callbacks=[ckpt], default_root_dir=str(root), **kw)
    tr.fit(task, datamodule=dm)
    return tr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, preference_file):
    """A few DPO steps (with the test-stage responses.json) and a trained reward model, on the synthetic pairs."""
    root = tmp_path_factory.mktemp("runs")
    dm = PreferenceDataModule(path=str(preference_file), **DATA)
    torch.manual_seed(0)
    dpo = DPOTask(model=TINY, lr=3e-3, lr_schedule="constant", prompt_style="raw", max_new_tokens=6)
    fit(dpo, root / "dpo", dm, 1, limit_train_batches=2, limit_val_batches=1).test(dpo, datamodule=dm, verbose=False)
    torch.manual_seed(0)
    rm = RewardModelTask(model=TINY, lr=3e-3, lr_schedule="constant", prompt_style="raw")
    fit(rm, root / "rm", dm, 2)
    return {"root": root, "dm": dm, "dpo": dpo, "rm": rm, "dpo_ckpt": root / "dpo" / "checkpoints" / "last.ckpt",
            "rm_ckpt": root / "rm" / "checkpoints" / "last.ckpt", "responses": root / "dpo" / "responses.json"}


@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


# ----------------------------------------------------------------------------- presets
def test_tasks_are_registered_by_name():
    assert TASKS["dpo"] is DPOTask and TASKS["reward_model"] is RewardModelTask
    assert (DPOTask.kind, RewardModelTask.kind) == ("lm", "reward")


def test_ch07_dpo_preset_is_the_books_run(hydra_conf):
    cfg = compose("train", overrides=["experiment=ch07_dpo"])
    d, t = cfg.data, cfg.task
    assert OmegaConf.is_missing(cfg, "sft_checkpoint") and cfg.test and cfg.model.name == "gpt2-medium"
    with pytest.raises(InterpolationToMissingValueError, match="sft_checkpoint"):  # no DPO from random weights by mistake
        cfg.get("init_from")
    assert compose("train", overrides=["experiment=ch07_dpo", "init_from=sft.ckpt"]).init_from == "sft.ckpt"
    assert (d._target_, d.path, d.prompt_style, d.mask_prompt, d.score_response_header, d.score_eos,
            d.allowed_max_length, d.batch_size) == \
        ("gptlab.data.preference.PreferenceDataModule", None, "alpaca", True, True, False, 1024, 8)
    assert (t._target_, t.beta, t.loss_type, t.logp_reduction, t.reference, t.beta_scaled_rewards) == \
        ("gptlab.tasks.dpo.DPOTask", 0.1, "sigmoid", "mean", "copy", False)
    o = t.optimizer
    assert (o._target_, o.lr, o.weight_decay, list(o.betas), t.weight_decay_on, t.lr_schedule.name, t.grad_clip) == \
        ("torch.optim.AdamW", 5e-6, 0.01, [0.9, 0.999], "all", "constant", None)  # the book's AdamW over all parameters
    assert (cfg.trainer.max_epochs, cfg.trainer.val_check_interval, cfg.model.drop_rate) == (1, 5, 0.0)


@pytest.mark.parametrize("name,task_cls", [("ch07_dpo_scratch", DPOTask), ("ch08_reward_model_scratch", RewardModelTask),
                                           ("ch08_reward_model", RewardModelTask)])
def test_preference_presets_build_their_task_and_data(hydra_conf, name, task_cls):
    from gptlab.cli.train import build_task

    cfg = compose("train", overrides=[f"experiment={name}", "model=gpt2-tiny", "init_from=null"])
    assert cfg.task_name == name and cfg.test
    task = build_task(cfg)
    dm = instantiate(OmegaConf.to_container(cfg.data, resolve=True), _convert_="all")
    assert isinstance(task, task_cls) and isinstance(dm, PreferenceDataModule)
    if task_cls is DPOTask:
        assert (task.reference_mode, task.hparams.logp_reduction, dm.score_response_header) == ("copy", "mean", True)
    else:
        assert task.model.out_head.out_features == 1 and all(p.requires_grad for p in task.parameters())


# ----------------------------------------------------------------------------- the inference loader
def test_dpo_and_reward_checkpoints_load_through_the_one_loader(runs):
    lm = load_model(ckpt_path=runs["dpo_ckpt"])
    assert (lm.kind, lm.task, lm.prompt_style) == ("lm", "dpo", "raw")
    assert torch.equal(lm.model.out_head.weight, runs["dpo"].model.out_head.weight)
    rm = load_model(ckpt_path=runs["rm_ckpt"], expect="reward")
    assert (rm.kind, rm.task, rm.prompt_style, rm.model.out_head.out_features) == ("reward", "reward_model", "raw", 1)
    with pytest.raises(WrongModelKind, match=r"holds a reward model \(task 'reward_model'\), not a language model"):
        load_model(ckpt_path=runs["rm_ckpt"])
    with pytest.raises(WrongModelKind, match=r"not a reward model; gptlab-reward needs a reward model: train one"):
        load_model(ckpt_path=runs["dpo_ckpt"], expect="reward")


# ----------------------------------------------------------------------------- gptlab-reward
def responses_files(runs, tmp_path):
    """The test pairs answered with the chosen (candidate) and the rejected (baseline) response."""
    entries = runs["dm"].test_set.entries
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps([{**e, "model_response": e["chosen"]} for e in entries]))
    bad.write_text(json.dumps([{**e, "model_response": e["rejected"]} for e in reversed(entries)]))
    return entries, good, bad


def test_reward_cli_scores_a_file_and_a_baseline_side_by_side(runs, tmp_path, hydra_conf):
    entries, good, bad = responses_files(runs, tmp_path)
    cfg = compose("reward", overrides=[f"ckpt_path={runs['rm_ckpt']}", f"responses={good}", "device=cpu"])
    single = reward_run(cfg, out=open(tmp_path / "out.txt", "w"))
    expected = score_responses(runs["rm"].model, entries, "raw", response_key="chosen")
    assert [r["reward"] for r in single["scores"]] == pytest.approx(expected, abs=1e-5)
    assert single["summary"]["n"] == 12 and json.loads((tmp_path / "rewards.json").read_text())["summary"] == \
        single["summary"]
    cfg = compose("reward", overrides=[f"ckpt_path={runs['rm_ckpt']}", f"responses={good}", f"baseline={bad}",
                                       "device=cpu", f"output={tmp_path / 'side.json'}"])
    both = reward_run(cfg, out=open(tmp_path / "out.txt", "w"))
    cmp = both["comparison"]
    assert cmp["n"] == 12 and cmp["candidate_higher"] >= 11 and cmp["mean_difference"] > 0
    assert both["summary"]["mean"] > both["baseline_summary"]["mean"]
    row = both["scores"][0]  # matched by instruction although the baseline file is in reverse order
    assert row["response"] == entries[0]["chosen"] and row["baseline_response"] == entries[0]["rejected"]


def test_reward_cli_takes_one_prompt_and_response_verbatim(runs, tmp_path):
    res = run_cli(["gptlab.cli.reward", f"ckpt_path={runs['rm_ckpt']}", "device=cpu",
                   "prompt=Describe the red car:", "response= Thanks for asking! The red car is lovely, (really)!"],
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = score_responses(runs["rm"].model, [{"instruction": "Describe the red car:", "input": "",
                                                   "r": " Thanks for asking! The red car is lovely, (really)!"}],
                               "raw", response_key="r")[0]
    assert float(res.stdout.strip()) == pytest.approx(expected, abs=1e-3)


def test_reward_cli_refuses_a_language_model(runs, tmp_path, hydra_conf):
    cfg = compose("reward", overrides=[f"ckpt_path={runs['dpo_ckpt']}", "device=cpu", "responses=x.json"])
    with pytest.raises(WrongModelKind, match="not a reward model; gptlab-reward needs a reward model"):
        reward_run(cfg)


# ----------------------------------------------------------------------------- gptlab-respond
def test_respond_cli_gives_the_answers_of_the_training_test_stage(runs, tmp_path, preference_file, hydra_conf):
    cfg = compose("respond", overrides=[f"ckpt_path={runs['dpo_ckpt']}", "data=preference",
                                        f"data.path={preference_file}", *[f"data.{k}={v}" for k, v in DATA.items()],
                                        "max_new_tokens=6", f"output={tmp_path / 'again.json'}", "device=cpu",
                                        "progress=false"])
    path = respond_run(cfg)
    assert json.loads(path.read_text()) == json.loads(runs["responses"].read_text())


@pytest.mark.parametrize("preset", ["ch07_dpo_scratch", "ch08_reward_model_scratch"])
def test_scratch_presets_run_end_to_end_with_the_default_callbacks(preset, tmp_path, preference_file, hydra_conf):
    from gptlab.cli.train import train

    cfg = compose("train", overrides=[f"experiment={preset}", "model=gpt2-tiny", "init_from=null",
                                      f"data.path={preference_file}", "data.prompt_style=raw", "data.max_entries=60",
                                      "trainer.max_steps=4", "trainer.val_check_interval=2",
                                      "trainer.log_every_n_steps=1", "+callbacks.throughput.skip_steps=0",
                                      "task.max_new_tokens=4" if preset.startswith("ch07") else "seed=1",
                                      f"paths.output_dir={tmp_path}"])
    metrics = train(cfg)
    key = "test/rewards/accuracies" if preset.startswith("ch07") else "test/accuracy"
    assert key in metrics and "throughput/tokens_per_sec" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "responses.json").is_file() == preset.startswith("ch07")
