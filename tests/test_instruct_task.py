"""InstructionTask: it learns (val loss falls), answers test entries by batched generation into
responses.json, the ch07 presets, and gptlab-chat on the resulting checkpoint."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF_DIR, run_cli
from gptlab.cli.chat import run as chat_run
from gptlab.streaming import StopStrings, stream_response
from gptlab.data.instruct import PROMPT_STYLES, InstructionDataModule, format_prompt, left_pad
from gptlab.model.config import GPTConfig
from gptlab.model.generation import generate
from gptlab.tasks.instruct import InstructionTask
from gptlab.tokenizer import EOT_ID, get_tokenizer

TINY = {**GPTConfig.from_name("gpt2-tiny").to_dict(), "context_length": 128}


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False,
                        "default_root_dir": str(tmp_path), **kw})


def test_short_finetune_lowers_val_loss(tmp_path):
    L.seed_everything(123)
    dm = InstructionDataModule(max_entries=60, train_ratio=0.8, test_ratio=0.1, batch_size=4, mask_prompt=True)
    task = InstructionTask(model=TINY, optimizer={"lr": 3e-3}, lr_schedule={"name": "constant"}, grad_clip=1.0,
                           max_new_tokens=4)
    dm.setup()

    def val_loss() -> float:  # token-weighted, like the task's val/loss
        with torch.no_grad():
            batches = list(dm.val_dataloader())
            total = sum(task.loss_fn(b) * (b["labels"] != -100).sum() for b in batches)
            return float(total / sum((b["labels"] != -100).sum() for b in batches))

    before = val_loss()
    tr = trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0)
    tr.fit(task, datamodule=dm)
    after = val_loss()
    assert tr.global_step == 36  # 48 training entries / 4 x 3 epochs
    assert abs(float(tr.callback_metrics["val/loss"]) - after) < 1e-4  # the logged metric is the same
    assert after < before - 2.0, (before, after)


def test_test_stage_answers_every_test_entry(tmp_path):
    dm = InstructionDataModule(max_entries=50, batch_size=4)  # 5 test entries: batches of 4 and 1
    task = InstructionTask(model=TINY, max_new_tokens=3, responses_file="answers.json")
    metrics = trainer(tmp_path).test(task, datamodule=dm, verbose=False)[0]
    responses = json.loads((tmp_path / "answers.json").read_text())
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == dm.test_entries
    assert all(isinstance(r["model_response"], str) for r in responses)
    assert metrics["test/loss"] > 0 and task.responses_path == tmp_path / "answers.json"


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    task = InstructionTask(model=TINY, max_new_tokens=6).eval()
    tok = get_tokenizer()
    entries = [{"instruction": "Name a color.", "input": "", "output": ""},
               {"instruction": "Rewrite the sentence.", "input": "The car is very fast indeed, really.",
                "output": ""}]
    prompts = [tok.encode(format_prompt(e)) for e in entries]
    ids, mask = left_pad(prompts)
    batched = task.generate_responses(ids, mask)
    for prompt, answer in zip(prompts, batched):
        single = generate(task.model, torch.tensor(prompt), 6, eos_id=EOT_ID)[len(prompt):].tolist()
        single = single[: single.index(EOT_ID)] if EOT_ID in single else single
        assert answer == tok.decode(single).split("###")[0].strip()


def test_stop_strings_hold_back_a_partial_marker():
    s = StopStrings(["###"])
    assert [s.push(p) for p in ["\n Red", " and #", "# blue #", "## more"]] == ["Red", " and ", "## blue ", ""]
    assert s.stopped and s.flush() == ""
    s = StopStrings(["<|user|>"])
    assert s.push("Hi <|us") == "Hi " and s.push("e") == "" and s.flush() == "<|use"


def test_chat_streams_until_a_stop_marker():
    task = InstructionTask(model=TINY).eval()
    style = PROMPT_STYLES["alpaca"]
    text = "".join(stream_response(task.model, style, "Name a color.", max_new_tokens=8))
    assert "###" not in text and "<|endoftext|>" not in text


# ----------------------------------------------------------------------------- end to end (CLI)
@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory) -> Path:
    """``gptlab-train experiment=ch07_instruct_scratch`` shrunk to seconds, with the test stage."""
    tmp = tmp_path_factory.mktemp("ch07")
    run = tmp / "run"
    res = run_cli(["gptlab.cli.train", "experiment=ch07_instruct_scratch", "model=gpt2-tiny",
                   "data.max_entries=40", "trainer.max_steps=4", "trainer.enable_progress_bar=false",
                   "test=true", "task.max_new_tokens=4", f"hydra.run.dir={run}"], cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return run


@pytest.mark.slow
def test_train_cli_test_stage_writes_responses_json(scratch_run):
    responses = json.loads((scratch_run / "responses.json").read_text())
    assert len(responses) == 4  # 10% of 40 entries
    assert all(set(r) == {"instruction", "input", "output", "model_response"} for r in responses)
    acc = EventAccumulator(str(scratch_run / "tensorboard")).Reload()
    assert "test/loss" in acc.Tags()["scalars"] and "val/loss" in acc.Tags()["scalars"]
    assert "test/responses/text_summary" in acc.Tags()["tensors"]


@pytest.mark.slow
def test_chat_cli_answers_piped_instructions_until_eof(scratch_run):
    ckpt = scratch_run / "checkpoints" / "last.ckpt"
    cfg = OmegaConf.create({"ckpt_path": str(ckpt), "init_from": None, "adapter_path": None, "instruction": None,
                            "input": "", "prompt_style": None, "max_new_tokens": 5, "temperature": 0.0,
                            "top_k": None, "top_p": None, "use_kv_cache": True, "seed": 123, "device": "cpu",
                            "precision": "32"})
    out = io.StringIO()
    answers = chat_run(cfg, stdin=io.StringIO("Name a color.\n\nWhat is 2 + 2?\tquickly\n"), out=out)
    assert len(answers) == 2 and out.getvalue().count("\n") >= 2
    # the console script with real piped stdin: answers both lines, exits 0 at end of input
    res = subprocess.run([sys.executable, "-m", "gptlab.cli.chat", f"ckpt_path={ckpt}", "max_new_tokens=5",
                          "device=cpu"], input="Name a color.\nName a fruit.\n", capture_output=True, text=True,
                         cwd=scratch_run, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("\n") >= 2 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_chat_with_one_instruction_prints_one_response(scratch_run):
    ckpt = scratch_run / "checkpoints" / "last.ckpt"
    cfg = OmegaConf.load(Path(CONF_DIR) / "chat.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.merge_with({"ckpt_path": str(ckpt), "instruction": "Name a color.", "max_new_tokens": 4, "device": "cpu"})
    out = io.StringIO()
    assert len(chat_run(cfg, out=out)) == 1 and out.getvalue().endswith("\n")


# ----------------------------------------------------------------------------- presets
@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_ch07_preset_is_the_books_run(hydra_conf):
    cfg = compose("train", overrides=["experiment=ch07_instruct"])
    d, t = cfg.data, cfg.task
    assert cfg.model.name == "gpt2-medium" and cfg.model.drop_rate == 0.0
    assert (d._target_, d.prompt_style, d.mask_prompt, d.batch_size, d.allowed_max_length) == \
        ("gptlab.data.instruct.InstructionDataModule", "alpaca", False, 8, 1024)
    assert (d.train_ratio, d.test_ratio, d.shuffle_before_split) == (0.85, 0.10, False)
    o = t.optimizer  # the book: AdamW(model.parameters(), lr=5e-5, weight_decay=0.1), constant LR
    assert (t._target_, o.lr, o.weight_decay, t.weight_decay_on, t.lr_schedule.name, t.lr_schedule.warmup_steps) == \
        ("gptlab.tasks.instruct.InstructionTask", 5e-5, 0.1, "all", "constant", 0)
    assert (t.max_new_tokens, t.temperature, cfg.trainer.val_check_interval) == (256, 0.0, 5)
    assert cfg.trainer.max_epochs == 2


def test_ch07_presets_set_init_from_and_test(hydra_conf):
    cfg = compose("train", overrides=["experiment=ch07_instruct"])
    assert (cfg.init_from, cfg.test, cfg.task_name) == ("gpt2-medium", True, "ch07_instruct")
    cfg = compose("train", overrides=["experiment=ch07_instruct_scratch"])
    assert (cfg.init_from, cfg.test, cfg.task_name) == (None, True, "ch07_instruct_scratch")


def test_ch07_scratch_preset_is_cpu_sized(hydra_conf):
    cfg = compose("train", overrides=["experiment=ch07_instruct_scratch"])
    m = cfg.model
    assert (m.emb_dim, m.n_layers, m.context_length, cfg.data.allowed_max_length) == (192, 4, 256, 256)
    assert cfg.trainer.accelerator == "cpu" and cfg.task.max_new_tokens <= 64
    OmegaConf.to_container(cfg.task, resolve=True)
