"""ClassificationTask: the head swap, pooling at the last real token, the freezing policies, the
book's LoRA parameter count, a short fit that learns, checkpoints and adapters that reload,
``gptlab-classify`` and the chapter-6 / appendix-E presets."""

from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF_DIR, run_cli
from gptlab.cli import pop_text_argument
from gptlab.cli.classify import run as classify_run
from gptlab.data.spam import TextClassificationDataModule
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import LoRALinear
from gptlab.tasks.registry import load_task
from gptlab.model.heads import pool_hidden
from gptlab.tasks.classify import ClassificationTask
from gptlab.tokenizer import EOT_ID, get_tokenizer

TINY = GPTConfig.from_name("gpt2-tiny").to_dict()
LABELS = ["ham", "spam"]


def trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False,
                        "default_root_dir": str(tmp_path), **kw})


def trainable_names(task: ClassificationTask) -> set[str]:
    return {n for n, p in task.model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- head + pooling
def test_the_lm_head_becomes_a_class_head():
    task = ClassificationTask(model=TINY, labels=["a", "b", "c"])
    assert isinstance(task.model.out_head, nn.Linear)
    assert (task.model.out_head.in_features, task.model.out_head.out_features) == (32, 3)
    assert task.model.out_head.bias is not None  # the book's nn.Linear(768, 2) has a bias
    assert task(torch.randint(0, 50257, (2, 7))).shape == (2, 3)


def test_pooling_reads_the_last_real_token_of_a_right_padded_batch():
    task = ClassificationTask(model=TINY, labels=LABELS).eval()
    tok = get_tokenizer()
    seqs = [tok.encode_ordinary(t) for t in ("Free entry in a weekly competition to win cup final tickets", "ok")]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [EOT_ID] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    with torch.no_grad():
        batched = task(ids, mask)
        for row, s in zip(batched, seqs):  # the same as the text alone, unpadded
            assert torch.allclose(row, task(torch.tensor([s]))[0], atol=1e-5)
        task.hparams.pooling = "last_position"  # the book's [:, -1]: the short text is read at a pad
        assert not torch.allclose(task(ids, mask)[1], batched[1], atol=1e-3)


def test_mean_pooling_averages_only_real_tokens():
    hidden = torch.arange(12.0).view(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(pool_hidden(hidden, mask, "mean"), torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)]))
    assert torch.equal(pool_hidden(hidden, mask, "last_token"), torch.stack([hidden[0, 3], hidden[1, 1]]))
    assert torch.equal(pool_hidden(hidden, mask, "last_position"), hidden[:, 3])


# ----------------------------------------------------------------------------- what trains
THREE_LAYERS = {**TINY, "n_layers": 3}


@pytest.mark.parametrize("trainable,extra,expected", [
    ("head", {}, {"out_head"}),
    ("last_block", {}, {"out_head", "final_norm", "blocks.2"}),
    ("last_n_blocks", {"trainable_blocks": 2}, {"out_head", "final_norm", "blocks.2", "blocks.1"}),
    ("all", {}, {"out_head", "final_norm", "blocks.2", "blocks.1", "blocks.0", "tok_emb", "pos_emb"}),
])
def test_the_trainable_policy_sets_requires_grad(trainable, extra, expected):
    task = ClassificationTask(model=THREE_LAYERS, labels=LABELS, trainable=trainable, **extra)
    names = trainable_names(task)
    prefixes = {n.split(".")[0] if not n.startswith("blocks.") else ".".join(n.split(".")[:2]) for n in names}
    assert prefixes == expected
    for name, p in task.model.named_parameters():  # each chosen module trains whole
        assert p.requires_grad == any(name == e or name.startswith(e + ".") for e in expected), name


def test_bad_policies_are_clear_errors():
    with pytest.raises(ValueError, match="unknown trainable 'last'"):
        ClassificationTask(model=TINY, labels=LABELS, trainable="last")
    with pytest.raises(ValueError, match="trainable_blocks=5 must be between 1 and n_layers=2"):
        ClassificationTask(model=TINY, labels=LABELS, trainable="last_n_blocks", trainable_blocks=5)
    with pytest.raises(ValueError, match="unknown pooling"):
        ClassificationTask(model=TINY, labels=LABELS, pooling="first")


def test_lora_on_gpt2_small_trains_the_books_2666528_parameters():
    # the shape init_from=gpt2-small gives (qkv bias); built on the meta device: no memory, no init time
    small = {**GPTConfig.from_name("gpt2-small").to_dict(), "qkv_bias": True, "drop_rate": 0.0}
    with torch.device("meta"):
        plain = ClassificationTask(model=small, labels=LABELS)
        lora = ClassificationTask(model=small, labels=LABELS, adapter={"name": "lora", "rank": 16, "alpha": 16})
    assert plain.model.num_params() == 124_441_346  # the book's classifier, before LoRA
    assert lora.trainable_parameter_count() == 2_666_528  # appendix E, after replace_linear_with_lora
    assert isinstance(lora.model.out_head, LoRALinear) and lora.model.out_head.out_features == 2


# ----------------------------------------------------------------------------- learning
def write_topic_data(path: Path, n: int = 300, seed: int = 0) -> Path:
    """Two easy classes told apart by their words."""
    rng = random.Random(seed)
    words = {"sport": "goal match team score win league player coach referee stadium".split(),
             "food": "pasta bread cheese soup salad sauce rice butter garlic onion".split()}
    lines = []
    for i in range(n):
        label = "sport" if i % 2 else "food"
        lines.append(f"{label}\t{' '.join(rng.choices(words[label], k=rng.randint(3, 9)))}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny classifier fitted for a few seconds on the two-topic data, and its data module."""
    tmp = tmp_path_factory.mktemp("fit")
    L.seed_everything(123)
    dm = TextClassificationDataModule(path=str(write_topic_data(tmp / "topics.tsv")), labels=None,
                                      batch_size=16, pad_to_max_length=False)
    task = ClassificationTask(model=TINY, num_classes=2, trainable="all", optimizer={"lr": 3e-3},
                              lr_schedule={"name": "constant"})
    tr = trainer(tmp, max_epochs=4, num_sanity_val_steps=0)
    tr.fit(task, datamodule=dm)
    metrics = tr.test(task, datamodule=dm, verbose=False)[0]
    ckpt = tmp / "task.ckpt"
    tr.save_checkpoint(ckpt)
    return task, dm, metrics, tmp, ckpt


def test_a_short_fit_beats_chance_on_the_held_out_split(fitted):
    task, dm, metrics, tmp, _ = fitted
    assert len(dm.test_set) == 60
    assert metrics["test/acc"] >= 0.9 and metrics["test/f1"] >= 0.9, metrics
    assert metrics["test/loss"] < 0.5


def test_labels_and_max_length_come_from_the_data(fitted):
    task, dm, *_ = fitted
    assert task.hparams.labels == ["food", "sport"] and task.hparams.max_length == dm.max_length


def test_the_test_stage_writes_the_confusion_matrix(fitted):
    task, dm, metrics, tmp, _ = fitted
    cm = json.loads((tmp / "confusion_matrix.json").read_text())
    assert cm["labels"] == ["food", "sport"] and cm["n"] == 60
    assert sum(map(sum, cm["matrix"])) == 60 and cm["matrix"] == task.confusion_matrix
    assert abs(cm["accuracy"] - metrics["test/acc"]) < 1e-6
    assert "rows: true label" in (tmp / "confusion_matrix.txt").read_text()


def test_a_checkpoint_reloads_with_load_task(fitted):
    task, dm, _, _, ckpt = fitted
    again = load_task(str(ckpt)).eval()
    assert type(again) is ClassificationTask and again.hparams.labels == ["food", "sport"]
    batch = next(iter(dm.test_dataloader()))
    task.eval()
    with torch.no_grad():
        assert torch.equal(again(batch["input_ids"], batch["attention_mask"]),
                           task(batch["input_ids"], batch["attention_mask"]))
    probs = again.predict_proba(["goal match win", "pasta with garlic sauce"])
    assert probs.argmax(-1).tolist() == [1, 0] and torch.allclose(probs.sum(-1), torch.ones(2))


def test_an_adapter_on_the_base_weights_classifies_like_the_run(tmp_path):
    base = tmp_path / "base.pt"
    torch.save(GPT(GPTConfig(**TINY)).state_dict(), base)
    task = ClassificationTask(model=TINY, init_from=str(base), labels=LABELS, max_length=16,
                              adapter={"name": "lora", "rank": 2, "alpha": 4}).eval()
    with torch.no_grad():
        for _, p in task.model.named_parameters():
            if "lora_" in _ or _.startswith("out_head"):
                p.normal_(0, 0.5)  # stands in for training
    path = task.save_adapter(tmp_path / "adapter.safetensors")
    cfg = OmegaConf.load(Path(CONF_DIR) / "classify.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    texts = ["You won a free ticket! Call now", "see you at lunch"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    cfg.merge_with({"init_from": str(base), "adapter_path": str(path), "input": str(tmp_path / "in.txt"),
                    "device": "cpu", "progress": False})
    out = io.StringIO()
    results = classify_run(cfg, out=out)
    expected = task.predict_proba(texts)
    assert [r[0] for r in results] == [LABELS[i] for i in expected.argmax(-1).tolist()]
    assert torch.allclose(torch.tensor([r[1] for r in results]), expected.max(-1).values, atol=1e-5)
    assert out.getvalue().splitlines()[1].endswith("\tsee you at lunch")


# ----------------------------------------------------------------------------- end to end (CLI)
@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory) -> Path:
    """``gptlab-train experiment=ch06_spam_scratch`` shrunk to seconds, with the test stage."""
    tmp = tmp_path_factory.mktemp("ch06")
    run = tmp / "run"
    res = run_cli(["gptlab.cli.train", "experiment=ch06_spam_scratch", "model=gpt2-tiny", "data.max_examples=200",
                   "data.max_length=48", "trainer.max_steps=8", "trainer.val_check_interval=4",
                   "trainer.enable_progress_bar=false",
                   f"hydra.run.dir={run}"], cwd=tmp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return run


@pytest.mark.slow
def test_train_cli_logs_accuracy_f1_and_the_confusion_matrix(scratch_run):
    cm = json.loads((scratch_run / "confusion_matrix.json").read_text())
    assert cm["labels"] == LABELS and cm["n"] == 40  # 20% of 200 messages
    acc = EventAccumulator(str(scratch_run / "tensorboard")).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss_epoch", "val/acc", "val/loss", "test/acc", "test/f1", "test/loss"} <= scalars
    pytest.importorskip("matplotlib")
    assert "test/confusion_matrix" in acc.Tags()["images"]


@pytest.mark.slow
def test_classify_cli_prints_label_and_probability_for_a_text(scratch_run):
    ckpt = scratch_run / "checkpoints" / "last.ckpt"
    text = "You won a free ticket! Call 0800, now ${x}"  # as the shell passes text="...": no Hydra quoting
    res = run_cli(["gptlab.cli.classify", f"ckpt_path={ckpt}", f"text={text}", "device=cpu"], cwd=scratch_run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert re.fullmatch(r"(ham|spam)\t[01]\.\d{4}\n", res.stdout), res.stdout


@pytest.mark.slow
def test_classify_cli_writes_a_csv_for_a_file_of_lines(scratch_run, tmp_path):
    ckpt = scratch_run / "checkpoints" / "last.ckpt"
    texts = ['WIN a "free" prize, txt CLAIM to 80086', "ok, see you at 5", "sorry, call later"]
    (tmp_path / "msgs.txt").write_text(f"{texts[0]}\n\n{texts[1]}\n{texts[2]}\n")
    res = run_cli(["gptlab.cli.classify", f"ckpt_path={ckpt}", "input=msgs.txt", "output=preds.csv", "device=cpu",
                   "batch_size=2"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "preds.csv").open(newline="")))
    assert [r["text"] for r in rows] == texts
    for r in rows:
        assert r["label"] in LABELS
        assert abs(float(r["p_ham"]) + float(r["p_spam"]) - 1) < 1e-4
        assert float(r["probability"]) == max(float(r["p_ham"]), float(r["p_spam"]))
    assert "3 predictions written" in res.stderr


def test_the_text_argument_bypasses_hydra_parsing():
    argv = ["gptlab-classify", "ckpt_path=x.ckpt", "text=Win! a (free) prize, ${now}", "device=cpu"]
    assert pop_text_argument(argv) == "Win! a (free) prize, ${now}"
    assert argv == ["gptlab-classify", "ckpt_path=x.ckpt", "device=cpu"]
    assert pop_text_argument(["p", 'text="already, quoted"']) == "already, quoted"
    assert pop_text_argument(["p", "input=f.txt"]) is None


def test_classify_refuses_a_language_model(tmp_path):
    base = tmp_path / "lm.pt"
    torch.save(GPT(GPTConfig(**TINY)).state_dict(), base)
    cfg = OmegaConf.load(Path(CONF_DIR) / "classify.yaml")
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.merge_with({"init_from": str(base), "text": "hi", "device": "cpu"})
    with pytest.raises(ValueError, match="holds a language model, not a classifier"):
        classify_run(cfg, out=io.StringIO())


# ----------------------------------------------------------------------------- presets
@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_ch06_preset_is_the_books_run(hydra_conf):
    cfg = compose("train", overrides=["experiment=ch06_spam"])
    m, d, t = cfg.model, cfg.data, cfg.task
    assert (cfg.init_from, cfg.test, cfg.task_name, cfg.optimized_metric) == \
        ("gpt2-small", True, "ch06_spam", "val/acc")
    assert (m.name, m.qkv_bias, m.context_length, m.drop_rate) == ("gpt2-small", True, 1024, 0.0)
    assert (d._target_, list(d.labels), d.balance, d.train_ratio, d.val_ratio, d.split_seed, d.batch_size) == \
        ("gptlab.data.spam.SpamDataModule", LABELS, True, 0.7, 0.1, 123, 8)
    assert d.max_length is None and d.drop_last and d.shuffle_before_split
    o = t.optimizer  # the book: AdamW(model.parameters(), lr=5e-5, weight_decay=0.1), read at position -1
    assert (t._target_, t.trainable, t.pooling, t.grad_clip, t.weight_decay_on) == \
        ("gptlab.tasks.classify.ClassificationTask", "last_block", "last_position", None, "all")
    assert (o._target_, o.lr, o.weight_decay, list(o.betas), t.lr_schedule.name, t.lr_schedule.warmup_steps) == \
        ("torch.optim.AdamW", 5e-5, 0.1, [0.9, 0.999], "constant", 0)
    assert d.pad_to_max_length and cfg.validate_before_fit and cfg.trainer.val_check_interval == 50
    assert list(OmegaConf.to_container(t, resolve=True)["labels"]) == LABELS
    assert cfg.trainer.max_epochs == 5 and cfg.get("adapter") is None


def test_appE_preset_is_lora_rank_16_on_every_linear_layer(hydra_conf):
    cfg = compose("train", overrides=["experiment=appE_spam_lora"])
    a = cfg.adapter
    assert (cfg.init_from, a.rank, a.alpha, a.scaling, list(a.train_extra)) == ("gpt2-small", 16, 16, "plain", [])
    assert set(a.targets) == {"q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj", "head"}
    o = cfg.task.optimizer  # the printed book: x @ A @ B * alpha, lr 5e-5 (its current code: alpha / rank, 8e-4)
    assert (o.lr, o.weight_decay, cfg.task.weight_decay_on, cfg.task.pooling) == (5e-5, 0.1, "all", "last_position")
    assert (cfg.data.batch_size, cfg.data.pad_to_max_length, cfg.trainer.max_epochs) == (8, True, 5)


@pytest.mark.parametrize("name", ["ch06_spam_scratch", "appE_spam_lora_cpu"])
def test_cpu_presets_build_their_task_and_data(hydra_conf, name):
    from gptlab.cli.train import build_task

    cfg = compose("train", overrides=[f"experiment={name}", "model=gpt2-tiny"])
    assert cfg.init_from is None and cfg.trainer.accelerator == "cpu" and cfg.test
    assert cfg.data.max_length <= 128 and cfg.task_name == name
    task = build_task(cfg)
    assert task.model.out_head.out_features == 2
    if name == "appE_spam_lora_cpu":
        assert isinstance(task.model.out_head, LoRALinear)
        assert trainable_names(task) == {n for n, _ in task.model.named_parameters() if ".lora_" in n}
    else:
        assert all(p.requires_grad for p in task.parameters())
