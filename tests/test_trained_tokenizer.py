"""Your own tokenizer: a byte-level BPE trained with Hugging Face ``tokenizers`` and used through
tiktoken. Round trips on every kind of text, deterministic training, graceful degradation on a small
corpus, hash-checked files, checkpoint records, the Hugging Face export, and the refused inputs."""

from __future__ import annotations

import hashlib
import json
import pickle
import random

import pytest
import tiktoken

from gptlab.tokenizer import (ASSETS, EOT_TOKEN, GPT2_SHA256, MANIFEST_FILE, RANKS_FILE, TokenizerError,
                              TokenizerMismatch, check_same_tokenizer, check_special_tokens, get_tokenizer,
                              hf_vocab_and_merges, tokenizer_from_record, tokenizer_info, tokenizer_record)

tokenizers = pytest.importorskip("tokenizers")

from gptlab.tokenizer_training import train_bpe  # noqa: E402 - after the optional dependency's check

VERDICT = ASSETS / "the-verdict.txt"
SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


@pytest.fixture(scope="module")
def verdict_bpe(tmp_path_factory):
    """The bundled story with GPT-2's 50,257 as the budget: the merges run out long before."""
    return train_bpe([VERDICT], 50257, tmp_path_factory.mktemp("tok") / "verdict", progress=False)


@pytest.fixture(params=["gpt2", "trained"])
def any_tokenizer(request, verdict_bpe) -> tiktoken.Encoding:
    return get_tokenizer() if request.param == "gpt2" else verdict_bpe.tokenizer


# ----------------------------------------------------------------------------- correctness
ROUND_TRIP = {
    "ascii": "Every effort moves you, said Gisburn. 1234567890 !@#$%^&*()_+-=[]{};':\",./<>?\\|`~",
    "whitespace": "a  b\tc\n\nd\r\n   e    \n",
    "accents": "Crème brûlée, naïve façade, São Paulo, Ångström, Dvořák, Łódź",
    "cjk": "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji": "🙂 👍🏽 👩‍👩‍👧‍👦 🇫🇷 🏳️‍🌈",
    "combining marks": "e\u0301 a\u0308 n\u0303 Z\u0351\u0337\u0316\u0330 \u0915\u094d\u0937",
    "nul and controls": "a\x00b\x01c\x7f\x1b[0m",
    "rtl and symbols": "שלום مرحبا ∑∫√∞ ≠ ≤ ™ © ½",
    "endoftext in text": "one<|endoftext|>two",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_encode_then_decode_is_the_identity(any_tokenizer, name):
    text = ROUND_TRIP[name]
    ids = any_tokenizer.encode(text, allowed_special="all")
    assert any_tokenizer.decode(ids) == text
    assert any_tokenizer.decode(any_tokenizer.encode_ordinary(text)) == text


def test_the_special_token_is_one_id_after_the_merges(verdict_bpe):
    tok = verdict_bpe.tokenizer
    assert tok.encode(EOT_TOKEN, allowed_special="all") == [tok.eot_token] == [tok.n_vocab - 1]
    assert len(tok.encode_ordinary(EOT_TOKEN)) > 1  # as plain text it is ordinary bytes


def test_lone_surrogates_are_replaced_exactly_as_tiktoken_does(any_tokenizer):
    # tiktoken re-encodes a str with lone surrogates through UTF-16 with errors="replace": U+FFFD each
    ids = any_tokenizer.encode("a\ud800b\udfffc")
    assert any_tokenizer.decode(ids) == "a\ufffdb\ufffdc"
    assert ids == any_tokenizer.encode("a\ufffdb\ufffdc")


def test_a_megabyte_of_random_bytes_decodes_with_replacement(any_tokenizer):
    raw = random.Random(0).randbytes(1 << 20)
    ids = [any_tokenizer.encode_single_token(bytes([b])) for b in raw]
    assert any_tokenizer.decode_bytes(ids) == raw
    assert any_tokenizer.decode(ids, errors="replace") == raw.decode("utf-8", errors="replace")
    random_ids = random.Random(1).choices(range(any_tokenizer.n_vocab), k=100_000)  # any id sequence decodes
    assert any_tokenizer.decode(random_ids, errors="replace") == \
        any_tokenizer.decode_bytes(random_ids).decode("utf-8", errors="replace")


def test_training_the_same_corpus_twice_gives_the_same_ranks_file(tmp_path):
    a = train_bpe([VERDICT], 1000, tmp_path / "a", progress=False)
    b = train_bpe([VERDICT], 1000, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / RANKS_FILE).read_bytes() == (tmp_path / "b" / RANKS_FILE).read_bytes()
    assert tokenizer_info(a.tokenizer).sha256 == tokenizer_info(b.tokenizer).sha256
    assert a.vocab_size == 1000 and a.merges == 1000 - 257


def test_a_budget_beyond_the_corpus_gives_a_smaller_vocabulary_and_says_so(verdict_bpe):
    assert verdict_bpe.asked == 50257 and 500 < verdict_bpe.vocab_size < 50257
    assert verdict_bpe.tokenizer.n_vocab == verdict_bpe.vocab_size == 256 + verdict_bpe.merges + 1
    summary = "\n".join(verdict_bpe.summary())
    assert "vocab_size=50,257 was asked" in summary and f"has {verdict_bpe.vocab_size:,} tokens" in summary


def test_tiktoken_encodes_the_corpus_exactly_like_tokenizers(verdict_bpe):
    assert verdict_bpe.checked_pieces > 1000 and verdict_bpe.differing_pieces == 0
    tok = verdict_bpe.tokenizer
    assert len(tok.encode(VERDICT.read_text())) < 0.6 * len(VERDICT.read_bytes())  # it learned merges


def test_the_manifest_describes_pattern_specials_hash_and_corpus(verdict_bpe):
    manifest = json.loads((verdict_bpe.folder / MANIFEST_FILE).read_text())
    ranks = (verdict_bpe.folder / RANKS_FILE).read_bytes()
    assert manifest["ranks_sha256"] == hashlib.sha256(ranks).hexdigest()
    assert manifest["special_tokens"] == {EOT_TOKEN: verdict_bpe.vocab_size - 1}
    assert manifest["vocab_size"] == verdict_bpe.vocab_size and manifest["requested_vocab_size"] == 50257
    assert manifest["pattern"] == get_tokenizer()._pat_str
    [f] = manifest["corpus"]["files"]
    assert f == {"path": str(VERDICT), "bytes": 20479,
                 "sha256": "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"}
    assert len(ranks.splitlines()) == verdict_bpe.vocab_size - 1


# ----------------------------------------------------------------------------- identity and records
def test_changed_ranks_are_refused_naming_both_hashes(tmp_path):
    train_bpe([VERDICT], 400, tmp_path / "tok", progress=False)
    ranks = tmp_path / "tok" / RANKS_FILE
    recorded = json.loads((tmp_path / "tok" / MANIFEST_FILE).read_text())["ranks_sha256"]
    lines = ranks.read_bytes().splitlines()
    (a, ra), (b, rb) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = a + b" " + rb, b + b" " + ra
    ranks.write_bytes(b"\n".join(lines) + b"\n")
    actual = hashlib.sha256(ranks.read_bytes()).hexdigest()
    with pytest.raises(TokenizerError, match=f"SHA-256 {actual} is not the {recorded}"):
        get_tokenizer(tmp_path / "tok")


def test_a_folder_without_a_manifest_is_refused_naming_it(tmp_path):
    with pytest.raises(TokenizerError, match="has no manifest.json"):
        get_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="expected gpt2 or a folder"):
        get_tokenizer(tmp_path / "nope")
    (tmp_path / MANIFEST_FILE).write_text('{"format": "gptlab-bpe",\n "version": 1,,}')
    with pytest.raises(TokenizerError, match=r"manifest.json:2: not JSON"):
        get_tokenizer(tmp_path)


def test_a_checkpoint_record_rebuilds_the_tokenizer_without_its_folder(verdict_bpe):
    record = tokenizer_record(verdict_bpe.tokenizer)
    assert set(record) == {"name", "sha256", "manifest", "ranks"} and len(record["ranks"]) < 30_000
    rebuilt = tokenizer_from_record(json.loads(json.dumps(record)))  # plain strings and dicts only
    assert tokenizer_info(rebuilt).sha256 == record["sha256"]
    text = VERDICT.read_text()
    assert rebuilt.encode(text) == verdict_bpe.tokenizer.encode(text)
    assert tokenizer_record(get_tokenizer()) == {"name": "gpt2", "sha256": GPT2_SHA256}
    assert tokenizer_from_record(None) is get_tokenizer()  # checkpoints older than the record: GPT-2


def test_a_damaged_record_is_refused(verdict_bpe):
    record = tokenizer_record(verdict_bpe.tokenizer)
    record["sha256"] = "0" * 64
    record["ranks"] = record["ranks"].replace("\n", "\n\n", 1)  # same ranks, other bytes
    with pytest.raises(TokenizerError, match="SHA-256 .* is not the"):
        tokenizer_from_record(record, "x.ckpt")
    with pytest.raises(TokenizerError, match="x.ckpt: records tokenizer .* without its ranks"):
        tokenizer_from_record({"name": "mine", "sha256": "1" * 64}, "x.ckpt")


def test_a_mismatch_names_both_tokenizers_and_hashes(verdict_bpe):
    ours, gpt2 = tokenizer_info(verdict_bpe.tokenizer), tokenizer_info(get_tokenizer())
    with pytest.raises(TokenizerMismatch) as e:
        check_same_tokenizer(verdict_bpe.tokenizer, get_tokenizer(), "ckpt.ckpt", "tokenizer=gpt2")
    assert ours.sha256[:16] in str(e.value) and gpt2.sha256[:16] in str(e.value) and "ckpt.ckpt" in str(e.value)
    check_same_tokenizer(verdict_bpe.tokenizer, get_tokenizer(verdict_bpe.folder), "a", "b")  # same: no error


def test_a_pickled_copy_has_the_same_identity(verdict_bpe):
    copy = pickle.loads(pickle.dumps(verdict_bpe.tokenizer))
    assert copy is not verdict_bpe.tokenizer
    assert tokenizer_info(copy).sha256 == tokenizer_info(verdict_bpe.tokenizer).sha256
    assert tokenizer_record(copy) == tokenizer_record(verdict_bpe.tokenizer)


def test_text_with_an_unknown_special_token_is_refused(verdict_bpe):
    check_special_tokens("fine <|endoftext|> text", verdict_bpe.tokenizer)
    with pytest.raises(TokenizerError, match=r"'<\|im_start\|>' \(character 2\), which is not a special token"):
        check_special_tokens("a <|im_start|> b", verdict_bpe.tokenizer)


# ----------------------------------------------------------------------------- Hugging Face files
def test_gpt2s_ranks_give_back_its_merges_file():
    _, merges = hf_vocab_and_merges(get_tokenizer())
    shipped = (ASSETS / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    assert [f"{a} {b}" for a, b in merges] == [line for line in shipped if line]


def test_hf_files_of_a_trained_tokenizer_encode_like_tiktoken(verdict_bpe):
    vocab, merges = hf_vocab_and_merges(verdict_bpe.tokenizer)
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    held_out = SHAKESPEARE + "".join(ROUND_TRIP.values()).replace(EOT_TOKEN, "")
    assert hf.encode(held_out).ids == verdict_bpe.tokenizer.encode_ordinary(held_out)


# ----------------------------------------------------------------------------- refused training input
@pytest.mark.parametrize("content,message", [
    (b"", "the corpus is empty"),
    (b"  \n\n \t\n", "the corpus is empty"),
    (b"text\x00\x01\x02binary", "a NUL byte at offset 4"),
    (bytes(range(128, 256)), "not UTF-8 text"),
])
def test_an_empty_or_binary_corpus_is_refused_and_nothing_is_written(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(TokenizerError, match=message):
        train_bpe([corpus], 300, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(vocab_size=256), r"vocab_size=256: expected an integer in \[257, 65536\]"),
    (dict(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"]), None),
    (dict(vocab_size=257, special_tokens=["<|endoftext|>", "<|pad|>"]), r"in \[258, 65536\]"),
    (dict(vocab_size=70000), r"in \[257, 65536\]"),
    (dict(vocab_size=300, special_tokens=["<|pad|>"]), "expected <|endoftext|> among them"),
    (dict(vocab_size=300, min_frequency=0), "min_frequency=0"),
])
def test_settings_no_byte_level_bpe_can_have_are_refused(tmp_path, kwargs, message):
    if message is None:  # a second special token takes the id after <|endoftext|>
        result = train_bpe([VERDICT], out=tmp_path / "ok", progress=False, **kwargs)
        assert result.tokenizer.encode("<|pad|>", allowed_special="all") == [299]
        return
    with pytest.raises(TokenizerError, match=message):
        train_bpe([VERDICT], out=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_files_is_not_overwritten_unless_asked(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(TokenizerError, match="already holds files"):
        train_bpe([VERDICT], 300, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
    train_bpe([VERDICT], 300, tmp_path / "out", progress=False, overwrite=True)
    assert get_tokenizer(tmp_path / "out").n_vocab == 300


def test_streamed_decoding_gives_the_text_of_the_whole_sequence(any_tokenizer):
    from gptlab.streaming import StreamDecoder

    # random ids of a byte-level vocabulary: characters split over tokens, and bytes that never form one
    ids = random.Random(2).choices(range(any_tokenizer.n_vocab - 1), k=5000) + [any_tokenizer.encode_single_token(b"\xe4")]
    dec = StreamDecoder(any_tokenizer)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == any_tokenizer.decode(ids)


# ----------------------------------------------------------------------------- used everywhere
def test_the_config_follows_the_tokenizer(verdict_bpe):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        ours = compose("train", overrides=[f"tokenizer={verdict_bpe.folder}", "task=ppo", "data=prompts"])
        gpt2 = compose("train", overrides=["task=ppo", "data=prompts"])
    GlobalHydra.instance().clear()
    assert ours.model.vocab_size == verdict_bpe.vocab_size and gpt2.model.vocab_size == 50257
    assert ours.task.stop_token_id == verdict_bpe.tokenizer.eot_token and gpt2.task.stop_token_id == 50256


def test_data_modules_use_the_tokenizers_endoftext_and_cache_per_tokenizer(verdict_bpe, tmp_path):
    from gptlab.data.instruct import InstructionDataModule
    from gptlab.data.pretrain import PretrainDataModule, token_file_path

    tok = verdict_bpe.tokenizer
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("It had always been " * 40)
    dm = PretrainDataModule(path=str(tmp_path), max_length=16, batch_size=2, memmap=True, tokenizer=tok)
    dm.prepare_data()
    dm.setup("fit")
    ids = dm.train_set.tokens.array.tolist() + dm.val_set.tokens.array.tolist()
    assert ids.count(tok.eot_token) == 1 and tok.decode(ids) == "It had always been " * 40 + EOT_TOKEN + \
        "It had always been " * 40
    files = sorted(tmp_path.glob("*.txt"))
    ours, gpt2 = token_file_path(files, tokenizer=tok), token_file_path(files)
    assert ours != gpt2 and ours.exists() and not gpt2.exists() and gpt2.name == ".gptlab.gpt2.bin"
    instruct = InstructionDataModule(tokenizer=tok, max_entries=20, batch_size=4)
    assert instruct.collate_kwargs["pad_id"] == tok.eot_token


def test_the_trainer_sees_the_pieces_of_the_whole_text_when_it_is_cut_into_chunks():
    import regex

    from gptlab.tokenizer import GPT2_PAT_STR
    from gptlab.tokenizer_training import text_chunks

    text = VERDICT.read_text() + "  \n  x\n\n y \n" * 50 + SHAKESPEARE
    parts = list(text_chunks(text, 300))
    pattern = regex.compile(GPT2_PAT_STR)
    assert len(parts) > 5 and "".join(parts) == text
    assert [p for part in parts for p in pattern.findall(part)] == pattern.findall(text)
