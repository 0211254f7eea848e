"""Sliding-window pretraining data: windows, targets, splits, memory-mapped token files, errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from gptlab.data.pretrain import (DEFAULT_TEXT, PretrainDataModule, SlidingWindowDataset, TokenArray,
                                  build_token_file, read_text, resolve_sources, split_for_bpe,
                                  strip_gutenberg_boilerplate)
from gptlab.tokenizer import EOT_ID, get_tokenizer


def book_windows(ids, max_length, stride):
    """The book's GPTDatasetV1 loop, verbatim semantics."""
    xs, ys = [], []
    for i in range(0, len(ids) - max_length, stride):
        xs.append(ids[i:i + max_length])
        ys.append(ids[i + 1:i + max_length + 1])
    return xs, ys


@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 4), (8, 3), (16, 16), (5, 7)])
def test_sliding_windows_match_the_book(max_length, stride):
    ids = list(range(100, 153))  # 53 tokens
    ds = SlidingWindowDataset(ids, max_length, stride)
    xs, ys = book_windows(ids, max_length, stride)
    assert len(ds) == len(xs)
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64
        assert item["input_ids"].tolist() == xs[i]
        assert item["labels"].tolist() == ys[i]
        # targets are the inputs shifted by one
        assert item["labels"][:-1].tolist() == item["input_ids"][1:].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_too_short_sequence_gives_no_windows():
    assert len(SlidingWindowDataset(list(range(4)), 4, 1)) == 0
    assert len(SlidingWindowDataset(list(range(5)), 4, 1)) == 1


def test_bundled_text_tokens_and_book_split():
    text = read_text(DEFAULT_TEXT)
    assert len(text) == 20479
    assert len(get_tokenizer().encode(text)) == 5145
    dm = PretrainDataModule(max_length=256, stride=256, batch_size=2)
    dm.setup("fit")
    k = int(0.9 * len(text))
    enc = get_tokenizer().encode_ordinary
    assert len(dm.train_set) == len(book_windows(enc(text[:k]), 256, 256)[0])
    assert len(dm.val_set) == len(book_windows(enc(text[k:]), 256, 256)[0])
    assert dm.train_set[0]["input_ids"].tolist() == enc(text)[:256]
    x = next(iter(dm.train_dataloader()))
    assert x["input_ids"].shape == x["labels"].shape == (2, 256)
    val_batches = list(dm.val_dataloader())
    assert sum(len(b["input_ids"]) for b in val_batches) == len(dm.val_set)  # no drop_last for validation


def test_split_for_bpe_gives_identical_ids():
    enc = get_tokenizer()
    text = read_text(DEFAULT_TEXT) * 3 + "\n\n  trailing   spaces\n \nx\ny"
    chunks = split_for_bpe(text, chunk_chars=500)
    assert len(chunks) > 50 and "".join(chunks) == text
    ids = [i for c in chunks for i in enc.encode_ordinary(c)]
    assert ids == enc.encode_ordinary(text)


def test_gutenberg_boilerplate_is_stripped():
    text = ("The Project Gutenberg eBook of X\nlicence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n"
            "Chapter 1\nIt was a dark night.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert strip_gutenberg_boilerplate(text) == "Chapter 1\nIt was a dark night.\n"
    assert strip_gutenberg_boilerplate("no markers here") == "no markers here\n"


def test_bom_and_crlf_are_normalised(tmp_path):
    f = tmp_path / "win.txt"
    f.write_bytes("\ufeffHello\r\nworld\r\n".encode("utf-8"))
    assert read_text(f) == "Hello\nworld\n"


def test_memmap_token_file_equals_in_memory_and_is_reused(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(read_text(DEFAULT_TEXT)[:6000])
    b.write_text("A second document.\nWith two lines.\n" * 50)
    path = build_token_file([a, b], progress=False)
    assert path.parent == tmp_path and path.exists() and path.with_suffix(".bin.json").exists()
    enc = get_tokenizer().encode_ordinary
    expected = enc(a.read_text()) + [EOT_ID] + enc(b.read_text())
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    assert mm.tolist() == expected
    mtime = path.stat().st_mtime_ns
    assert build_token_file([a, b], progress=False) == path and path.stat().st_mtime_ns == mtime  # cached
    # a changed source invalidates the cache
    b.write_text("changed\n")
    os.utime(b, ns=(1, 1))
    build_token_file([a, b], progress=False)
    assert np.memmap(path, dtype=np.uint16, mode="r").tolist() == enc(a.read_text()) + [EOT_ID] + enc("changed\n")


def test_memmap_datamodule_matches_in_memory_windows(tmp_path):
    (tmp_path / "corpus").mkdir()
    f = tmp_path / "corpus" / "story.txt"
    f.write_text(read_text(DEFAULT_TEXT))
    kw = dict(path=str(f), max_length=32, stride=16, batch_size=4, train_ratio=1.0)
    mem, mm = PretrainDataModule(memmap=False, **kw), PretrainDataModule(memmap=True, **kw)
    mem.setup(), mm.setup()
    assert mm.train_set.tokens.path is not None and mem.train_set.tokens.path is None
    assert len(mem.train_set) == len(mm.train_set) > 100
    for i in (0, 7, len(mm.train_set) - 1):
        assert torch.equal(mem.train_set[i]["input_ids"], mm.train_set[i]["input_ids"])
        assert torch.equal(mem.train_set[i]["labels"], mm.train_set[i]["labels"])
    # workers receive the path, not the tokens
    blob = pickle.dumps(mm.train_set)
    assert len(blob) < 2000
    assert torch.equal(pickle.loads(blob)[3]["input_ids"], mm.train_set[3]["input_ids"])


def test_memmap_split_by_tokens_and_read_only_source_uses_cache_dir(tmp_path, monkeypatch):
    f = tmp_path / "ro" / "t.txt"
    f.parent.mkdir()
    f.write_text(read_text(DEFAULT_TEXT))
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda p, mode: False)  # as if the source folder were read-only
    dm = PretrainDataModule(path=str(f), memmap=True, max_length=64, batch_size=2)
    dm.prepare_data()
    dm.setup()
    files = list((tmp_path / "cache" / "tokens").glob("*.gpt2.bin"))
    assert len(files) == 1
    n = 5145
    assert len(dm.train_set.tokens) == int(0.9 * n) and len(dm.val_set.tokens) == n - int(0.9 * n)


def test_folder_and_glob_sources(tmp_path):
    for name in ("b.txt", "a.txt", "skip.md"):
        (tmp_path / name).write_text(name)
    assert [p.name for p in resolve_sources(tmp_path)] == ["a.txt", "b.txt"]
    assert [p.name for p in resolve_sources(str(tmp_path / "*.md"))] == ["skip.md"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        PretrainDataModule(path=str(tmp_path / "nope.txt")).setup()
    with pytest.raises(ValueError, match="train_ratio"):
        PretrainDataModule(train_ratio=1.5)
    with pytest.raises(ValueError, match="validation split has .* fewer than max_length"):
        PretrainDataModule(max_length=1024, train_ratio=0.9).setup()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2: not UTF-8"):
        read_text(bad)


def test_token_array_slices():
    t = TokenArray(np.arange(10, dtype=np.uint16), start=2, stop=7)
    assert len(t) == 5 and t.array.tolist() == [2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- <|endoftext|> in the text
EOT_CORPUS = "First story ends here.<|endoftext|>A second story begins. " * 3


@pytest.mark.parametrize("memmap", [False, True])
def test_a_literal_endoftext_is_the_end_of_text_token_as_in_the_book(tmp_path, memmap):
    f = tmp_path / "stories.txt"
    f.write_text(EOT_CORPUS)
    dm = PretrainDataModule(path=str(f), memmap=memmap, max_length=8, batch_size=1, train_ratio=1.0)
    dm.setup()
    tokens = dm.train_set.tokens.array.tolist()
    book = get_tokenizer().encode(EOT_CORPUS, allowed_special={"<|endoftext|>"})  # GPTDatasetV1's encoding
    assert tokens == book and tokens.count(EOT_ID) == 3


@pytest.mark.parametrize("memmap", [False, True])
def test_endoftext_token_false_reads_it_as_plain_text(tmp_path, memmap):
    f = tmp_path / "stories.txt"
    f.write_text(EOT_CORPUS)
    dm = PretrainDataModule(path=str(f), memmap=memmap, max_length=8, batch_size=1, train_ratio=1.0,
                            endoftext_token=False)
    dm.setup()
    tokens = dm.train_set.tokens.array.tolist()
    assert tokens == get_tokenizer().encode_ordinary(EOT_CORPUS) and EOT_ID not in tokens
    assert len(get_tokenizer().encode_ordinary("<|endoftext|>")) == 7


def test_each_endoftext_reading_has_its_own_token_file(tmp_path):
    f = tmp_path / "stories.txt"
    f.write_text(EOT_CORPUS)
    special = build_token_file([f], progress=False)
    plain = build_token_file([f], progress=False, endoftext_token=False)
    assert special != plain and special.is_file() and plain.is_file()
    assert EOT_ID in np.fromfile(special, dtype=np.uint16) and EOT_ID not in np.fromfile(plain, dtype=np.uint16)
    assert build_token_file([f], progress=False) == special  # both stay cached


@pytest.mark.parametrize("memmap", [False, True])
def test_a_folder_of_books_is_joined_with_the_end_of_text_token(tmp_path, memmap):
    # data=gutenberg: a folder of books, one <|endoftext|> between consecutive books (the book's
    # ch05/03_bonus_pretraining_on_gutenberg joins its files with it)
    books = tmp_path / "books"
    books.mkdir()
    texts = {"a.txt": "Call me Ishmael.\n", "b.txt": "It was the best of times.\n", "c.txt": "Happy families.\n"}
    for name, text in texts.items():
        (books / name).write_text(text)
    dm = PretrainDataModule(path=str(books), memmap=memmap, max_length=4, batch_size=1, train_ratio=1.0)
    dm.setup()
    enc = get_tokenizer().encode_ordinary
    expected = enc(texts["a.txt"]) + [EOT_ID] + enc(texts["b.txt"]) + [EOT_ID] + enc(texts["c.txt"])
    assert dm.train_set.tokens.array.tolist() == expected
