"""A tokenizer trained on the bundled story, a short pretraining run with it (``experiment=own_tokenizer``),
and the checkpoint moved to another folder with the tokenizer's folder deleted: ``gptlab-generate``
still decodes with the trained vocabulary, because the checkpoint embeds it; a different tokenizer
is refused naming both hashes, by the inference tools and by a run that would start from the checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF_DIR, run_cli
from gptlab.cli.generate import main as generate_main
from gptlab.cli.validation import validate_train_config
from gptlab.errors import ConfigError
from gptlab.inference import load_model, tokenizer_for_checkpoint
from gptlab.model.generation import generate
from gptlab.tokenizer import ASSETS, get_tokenizer, tokenizer_info
from gptlab.weights import safe_torch_load

pytest.importorskip("tokenizers")
from gptlab.tokenizer_training import train_bpe  # noqa: E402 - after the optional dependency's check

PROMPT = "I had always thought"


@pytest.fixture(scope="module")
def moved_checkpoint(tmp_path_factory):
    """(checkpoint in a folder of its own, a copy of the tokenizer kept elsewhere) after training a
    320-id tokenizer, pretraining 3 steps with it, and deleting the tokenizer's folder."""
    root = tmp_path_factory.mktemp("own")
    tok_dir = root / "tok"
    train_bpe([ASSETS / "the-verdict.txt"], 320, tok_dir, progress=False)
    kept = shutil.copytree(tok_dir, tmp_path_factory.mktemp("kept") / "tok")
    res = run_cli(["gptlab.cli.train", "experiment=own_tokenizer", f"tokenizer={tok_dir}",
                   f"data.path={ASSETS / 'the-verdict.txt'}", "model=gpt2-tiny", "model.pad_vocab_multiple=64",
                   "trainer.max_steps=3", "logger=none", "data.batch_size=4", "trainer.enable_progress_bar=false",
                   f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    ckpt = shutil.move(str(root / "run" / "checkpoints" / "last.ckpt"), elsewhere / "moved.ckpt")
    shutil.rmtree(tok_dir)
    return elsewhere / "moved.ckpt", get_tokenizer(kept)


@pytest.mark.slow
def test_solve_pads_stops_and_decodes_with_the_checkpoints_tokenizer(moved_checkpoint, tmp_path):
    """gptlab-solve on the moved checkpoint: prompts left-padded with the trained tokenizer's
    <|endoftext|> (GPT-2's id 50256 is past its 320 rows), answers decoded with it: each greedy answer
    of a batch of two is what generate() gives for the prompt alone, decoded by the trained tokenizer."""
    ckpt, trained = moved_checkpoint
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in (
        {"prompt": "I had always thought", "answer": "1"}, {"prompt": "He was", "answer": "2"},
        {"prompt": "It was a dark", "answer": "3"}, {"prompt": "The picture", "answer": "4"})))
    res = run_cli(["gptlab.cli.solve", f"ckpt_path={ckpt}", f"data.path={problems}", "data.train_ratio=0.5",
                   "data.test_ratio=0.5", "prompt_style=raw", "max_new_tokens=6", "batch_size=2",
                   "output=g.jsonl", "progress=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    model = load_model(ckpt_path=ckpt).model.eval()
    assert len(rows) == 2
    for row in rows:
        prompt = trained.encode(row["prompt"])
        new = generate(model, torch.tensor(prompt), 6, eos_id=trained.eot_token).tolist()[len(prompt):]
        new = new[:new.index(trained.eot_token)] if trained.eot_token in new else new
        assert row["completions"] == [trained.decode(new).strip()]


@pytest.mark.slow
def test_generate_decodes_a_moved_checkpoint_with_its_own_tokenizer(moved_checkpoint):
    ckpt, trained = moved_checkpoint
    res = run_cli(["gptlab.cli.generate", f"ckpt_path={ckpt.name}", f"prompt={PROMPT}", "max_new_tokens=16",
                   "stop_at_eos=false", "stream=false"], cwd=ckpt.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    # the same greedy continuation, decoded with the copy of the trained tokenizer kept aside
    lm = load_model(ckpt_path=ckpt)
    assert lm.model.config.vocab_size == trained.n_vocab == 320 and lm.model.config.padded_vocab_size == 320
    prompt = trained.encode(PROMPT)
    ids = generate(lm.model, torch.tensor(prompt), 16).tolist()
    assert ids[:len(prompt)] == prompt and max(ids) < trained.n_vocab
    expected = trained.decode(ids)
    assert res.stdout.rstrip("\n") == expected
    assert get_tokenizer().decode(ids) != expected  # GPT-2 would have decoded other text


@pytest.mark.slow
def test_the_checkpoint_embeds_the_tokenizer(moved_checkpoint):
    ckpt, trained = moved_checkpoint
    record = safe_torch_load(ckpt)["gptlab_tokenizer"]
    assert record["sha256"] == tokenizer_info(trained).sha256
    assert record["ranks"].encode() == tokenizer_info(trained).ranks_bytes
    assert tokenizer_info(tokenizer_for_checkpoint(ckpt)).sha256 == record["sha256"]


@pytest.mark.slow
def test_another_tokenizer_for_the_checkpoint_is_refused_naming_both_hashes(moved_checkpoint, run_entry):
    ckpt, trained = moved_checkpoint
    code, _, err = run_entry(generate_main, "gptlab-generate", f"ckpt_path={ckpt}", "tokenizer=gpt2")
    ours, gpt2 = tokenizer_info(trained).sha256[:16], tokenizer_info(get_tokenizer()).sha256[:16]
    assert code == 2 and "tokenizer mismatch" in err and ours in err and gpt2 in err
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for key in ("init_from", "ckpt_path"):
            cfg = compose("train", overrides=["model=gpt2-tiny", f"{key}={ckpt}"])
            with pytest.raises(ConfigError, match=f"tokenizer mismatch: {key}=.* uses tok .sha256 {ours}.*, "
                                                  f"tokenizer=gpt2 is gpt2 .sha256 {gpt2}"):
                validate_train_config(cfg)
    GlobalHydra.instance().clear()
