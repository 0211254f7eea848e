"""``gptlab-tokenizer train|encode|decode|stats``: what it prints, and one line + exit status 2 +
nothing written for every refused input."""

from __future__ import annotations

import json

import pytest

from gptlab.cli.tokenizer import main
from gptlab.tokenizer import ASSETS, MANIFEST_FILE, RANKS_FILE, get_tokenizer

pytest.importorskip("tokenizers")

VERDICT = str(ASSETS / "the-verdict.txt")
PROG = "gptlab-tokenizer"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 300-id tokenizer of the bundled story, written by the command itself."""
    from gptlab.tokenizer_training import train_bpe

    return train_bpe([ASSETS / "the-verdict.txt"], 300, tmp_path_factory.mktemp("cli") / "tok", progress=False).folder


def test_train_writes_the_folder_and_says_when_the_corpus_runs_out_of_merges(run_entry, tmp_path):
    code, out, err = run_entry(main, PROG, "train", f"data.path={VERDICT}", "vocab_size=50257",
                               f"out={tmp_path / 'tok'}", "progress=false")
    assert code == 0, err
    n = get_tokenizer(tmp_path / "tok").n_vocab
    assert n < 50257 and "vocab_size=50,257 was asked" in out and f"the vocabulary has {n:,} tokens" in out
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [MANIFEST_FILE, RANKS_FILE]


def test_train_reads_a_folder_of_text_files_with_gutenberg_headers_stripped(run_entry, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    body = (ASSETS / "the-verdict.txt").read_text()
    (corpus / "a.txt").write_text("*** START OF THE PROJECT GUTENBERG EBOOK X ***\n" + body[:10000]
                                  + "\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nLICENCE " * 50)
    (corpus / "b.txt").write_text(body[10000:])
    code, out, err = run_entry(main, PROG, "train", f"data.path={corpus}", "data.strip_gutenberg=true",
                               "vocab_size=400", f"out={tmp_path / 'tok'}", "progress=false")
    assert code == 0, err
    manifest = json.loads((tmp_path / "tok" / MANIFEST_FILE).read_text())
    assert [f["path"] for f in manifest["corpus"]["files"]] == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    assert "Gutenberg header and trailer removed" in manifest["corpus"]["reading"]
    assert manifest["corpus"]["characters"] < len(body) + 10  # the licence lines were not read


def test_encode_prints_ids_tokens_and_tokens_per_character(run_entry, trained):
    code, out, _ = run_entry(main, PROG, "encode", f"tokenizer={trained}", 'text=Hello, world! <|endoftext|>')
    assert code == 0
    tok = get_tokenizer(trained)
    ids = tok.encode("Hello, world! <|endoftext|>", allowed_special="all")
    lines = out.splitlines()
    assert json.loads(lines[0]) == ids and ids[-1] == tok.eot_token
    assert lines[1].endswith("'<|endoftext|>']")
    assert f"{len(ids)} tokens for 27 characters ({len(ids) / 27:.3f} tokens per character)" in lines[2]


def test_decode_prints_the_text_of_ids(run_entry, trained):
    tok = get_tokenizer(trained)
    ids = tok.encode("I had always thought")
    code, out, _ = run_entry(main, PROG, "decode", f"tokenizer={trained}", f"ids=[{','.join(map(str, ids))}]")
    assert code == 0 and out == "I had always thought\n"


def test_stats_measure_a_file(run_entry, trained, tmp_path):
    text = "Every effort moves you. " * 10
    (tmp_path / "t.txt").write_text(text)
    code, out, _ = run_entry(main, PROG, "stats", f"tokenizer={trained}", f"file={tmp_path / 't.txt'}")
    n = len(get_tokenizer(trained).encode(text))
    assert code == 0 and f"tokens                {n:,}" in out
    assert f"tokens per character  {n / len(text):.4f}" in out and "trained on            1 file(s), 20,479 bytes" in out


def test_help_lists_the_commands_and_keys(run_entry):
    code, out, _ = run_entry(main, PROG, "train", "--help")
    assert code == 0 and out.startswith(f"{PROG}: train a byte-level BPE")
    assert "train | encode | decode | stats" in out and "  vocab_size=8192" in out


@pytest.mark.parametrize("args,message", [
    ([], "no command"),
    (["trian"], "unknown command 'trian' (did you mean train?)"),
    (["train", "vocab_size=100", "out=OUT", f"data.path={VERDICT}"], "vocab_size=100: expected an integer in [257, 65536]"),
    (["train", "out=OUT", "data.path=EMPTY"], "the corpus is empty"),
    (["train", "out=OUT", "data.path=BINARY"], "not UTF-8 text"),
    (["train", "out=OUT", "data.path=NOWHERE"], "no such file or folder"),
    (["train", "data.path=EMPTY"], "train needs out="),
    (["encode", "tokenizer=TRAINED", "text=a <|im_start|> b"], "'<|im_start|>' (character 2), which is not a special token"),
    (["encode", "tokenizer=TAMPERED", "text=hello"], "is not the"),
    (["decode", "tokenizer=TRAINED", "ids=[1,300]"], "ids: 300 is not an id of"),
    (["encode", "tokenizer=NOWHERE", "text=hello"], "expected gpt2 or a folder written by gptlab-tokenizer train"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(run_entry, tmp_path, trained, args, message):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.txt").write_bytes(bytes(range(1, 256)) * 4)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / MANIFEST_FILE).write_bytes((trained / MANIFEST_FILE).read_bytes())
    (tampered / RANKS_FILE).write_bytes((trained / RANKS_FILE).read_bytes() + b"\n")  # other bytes, other hash
    names = {"OUT": tmp_path / "out", "EMPTY": tmp_path / "empty.txt", "BINARY": tmp_path / "binary.txt",
             "NOWHERE": tmp_path / "nowhere", "TRAINED": trained, "TAMPERED": tampered}
    args = [a.split("=")[0] + "=" + str(names.get(a.split("=", 1)[1], a.split("=", 1)[1])) if "=" in a else a
            for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_entry(main, PROG, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "out").exists()
