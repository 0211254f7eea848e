"""Every config group option composes; wrong keys and choices fail with Hydra's clear messages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR

GROUPS = ["model", "data", "task", "adapter", "trainer", "logger", "callbacks", "experiment", "debug",
          "hparams_search"]


def options(group: str) -> list[str]:
    folder = Path(CONF_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def needs_plugin(group: str, option: str) -> str | None:
    text = (Path(CONF_DIR) / group / f"{option}.yaml").read_text()
    for plugin, module in (("optuna", "hydra_plugins.hydra_optuna_sweeper"),
                           ("joblib", "hydra_plugins.hydra_joblib_launcher"),
                           ("submitit", "hydra_plugins.hydra_submitit_launcher")):
        if f": {plugin}" in text and importlib.util.find_spec(module.split(".")[0]) is not None:
            try:
                importlib.import_module(module)
            except ImportError:
                return plugin
        elif f": {plugin}" in text:
            return plugin
    return None


@pytest.fixture(autouse=True)
def _hydra():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_default_config_composes_with_every_group():
    cfg = compose("train", return_hydra_config=True)
    for key in ("model", "data", "task", "trainer", "logger", "callbacks", "paths", "seed"):
        assert key in cfg
    assert cfg.model.name == "gpt2-mini"
    assert cfg.data.max_length == cfg.model.context_length


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    plugin = needs_plugin(group, option)
    if plugin:
        pytest.skip(f"{group}={option} needs the optional hydra {plugin} plugin (pip install gptlab[...])")
    cfg = compose("train", overrides=[f"{group}={option}", "paths.output_dir=/tmp/x"])
    assert cfg.task._target_ and cfg.model.emb_dim % cfg.model.n_heads == 0
    OmegaConf.to_container(cfg.trainer, resolve=True)
    OmegaConf.to_container(cfg.task, resolve=True)


def test_trainer_callbacks_and_logger_instantiate(tmp_path):
    cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}"])
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)


def test_command_line_override_reaches_the_config():
    cfg = compose("train", overrides=["task.optimizer.lr=1e-3", "model.n_layers=2", "data.batch_size=3"])
    assert (cfg.task.optimizer.lr, cfg.model.n_layers, cfg.data.batch_size) == (1e-3, 2, 3)


def test_ch05_preset_is_the_books_run():
    cfg = compose("train", overrides=["experiment=ch05_verdict"])
    m, d, t = cfg.model, cfg.data, cfg.task
    assert (m.emb_dim, m.n_layers, m.n_heads, m.context_length, m.drop_rate, m.qkv_bias) == \
        (768, 12, 12, 256, 0.1, False)
    assert (d.max_length, d.stride, d.batch_size, d.train_ratio) == (256, 256, 2, 0.9)
    o = t.optimizer  # the book: AdamW(model.parameters(), lr=4e-4, weight_decay=0.1), no schedule, no clipping
    assert (o.lr, o.weight_decay, list(o.betas), t.weight_decay_on) == (4e-4, 0.1, [0.9, 0.999], "all")
    assert (t.lr_schedule.name, t.lr_schedule.warmup_steps, t.grad_clip) == ("constant", 0, None)
    assert (cfg.validate_before_fit, cfg.trainer.val_check_interval, t.sample_stop_at_eos) == (True, 5, False)
    assert (cfg.trainer.max_epochs, cfg.seed, t.sample_prompt) == (10, 123, "Every effort moves you")


def test_gpu_trainer_defaults_to_bf16():
    cfg = compose("train", overrides=["trainer=gpu"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"


def test_the_code_defaults_of_the_optimizer_and_schedule_are_the_yaml_nodes():
    """One default per key: a task built in Python without an optimizer gets what the config gives."""
    from gptlab.optim import DEFAULT_LR_SCHEDULE, DEFAULT_OPTIMIZER

    conf = Path(CONF_DIR) / "task"
    assert OmegaConf.to_container(OmegaConf.load(conf / "optimizer" / "adamw.yaml")) == DEFAULT_OPTIMIZER
    assert OmegaConf.to_container(OmegaConf.load(conf / "lr_schedule" / "warmup_decay.yaml")) == DEFAULT_LR_SCHEDULE


@pytest.mark.parametrize("name", options("model"))
def test_a_model_yaml_states_its_preset_and_composes_to_its_fields(name):
    """conf/model/<preset>.yaml holds no field of its own: the composed node is GPTConfig.from_name's."""
    from gptlab.model.config import GPTConfig

    assert set(OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")) == {"defaults"}
    cfg = compose("train", overrides=[f"model={name}"])
    assert OmegaConf.to_container(cfg.model, resolve=True) == GPTConfig.from_name(name).to_dict()
    cfg = compose("train", overrides=[f"model={name}", "model.n_layers=1"])
    assert cfg.model.n_layers == 1


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match="task.lrr"):
        compose("train", overrides=["task.lrr=1"])


def test_unknown_group_choice_lists_the_options():
    with pytest.raises(ConfigCompositionException, match="gpt2-small"):
        compose("train", overrides=["model=gpt9"])


BOOK_PIPELINE_PRESETS = [p for p in options("experiment") if p.startswith(("ch07_", "ch08_"))]


def _free_choices(preset: str) -> list[tuple[str, str]]:
    """The group options a user may swap under a ch07/ch08 preset: every model shape, and every
    reward of a PPO preset (the preset's data and task are what it is about)."""
    text = (Path(CONF_DIR) / "experiment" / f"{preset}.yaml").read_text()
    pairs = [("model", o) for o in options("model")]
    if "override /task: ppo" in text:
        pairs += [("task/reward", o) for o in options("task/reward")]
    return pairs


def _constructor_keys(target: str) -> set[str] | None:
    """The keyword arguments the class or function ``target`` takes (None: it takes any)."""
    import inspect

    from hydra.utils import get_object

    params = inspect.signature(get_object(target)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


@pytest.mark.parametrize("preset,group,option", [(p, g, o) for p in BOOK_PIPELINE_PRESETS for g, o in _free_choices(p)])
def test_a_book_pipeline_preset_composes_with_every_option_of_the_groups_it_touches(preset, group, option, tmp_path):
    """A preset sets only keys that every option of the group takes: experiment=ch08_ppo_scratch
    task/reward=token_count once forced ``ckpt_path`` onto the token rule (an unexpected argument).
    With a reward's own values given, the pre-flight passes and the rule is built."""
    import torch

    from gptlab.cli.validation import validate_train_config

    ckpt = tmp_path / "sft.ckpt"
    torch.save({"state_dict": {}, "gptlab_task": "instruct", "hyper_parameters": {}}, ckpt)
    own_values = {"model": [f"reward_checkpoint={ckpt}"], "token_count": ["task.reward.token=' the'"],
                  "regex": ["task.reward.pattern=please"]}
    needs_sft = "sft_checkpoint:" in (Path(CONF_DIR) / "experiment" / f"{preset}.yaml").read_text()
    cfg = compose("train", overrides=[f"experiment={preset}", f"{group}={option}", "paths.output_dir=/tmp/x",
                                      *([f"sft_checkpoint={ckpt}"] if needs_sft else []),
                                      *(own_values[option] if group == "task/reward" else [])])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every value given, every interpolation resolves
    for node in [cfg.model, cfg.data] + ([cfg.task.reward] if "reward" in cfg.task else []):
        if "_target_" in node:
            takes = _constructor_keys(node._target_)
            given = {k for k in node if not str(k).startswith("_")}
            assert takes is None or given <= takes, f"{node._target_} does not take {sorted(given - takes)}"
    if group == "task/reward":
        validate_train_config(cfg)
        if option != "model":
            assert callable(instantiate(cfg.task.reward))
