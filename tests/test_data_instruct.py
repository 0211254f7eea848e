"""Instruction data: prompt styles, the book's masking collate (vectorised), splits, errors."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab.data.instruct import (PROMPT_STYLES, InstructionDataError, InstructionDataModule, InstructionDataset,
                                  extract_response, format_input, format_prompt, instruction_collate, left_pad,
                                  load_instruction_data)
from gptlab.data.records import split_entries
from gptlab.tokenizer import get_tokenizer

ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n")
WITH_INPUT = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
              "output": "The car is as fast as lightning."}
NO_INPUT = {"instruction": "Name a primary color.", "input": "", "output": "Red."}


# ----------------------------------------------------------------------------- prompt styles
def test_alpaca_prompt_with_input_is_the_books():
    assert format_input(WITH_INPUT, "alpaca") == (
        ALPACA_HEAD + "Rewrite the sentence using a simile.\n\n### Input:\nThe car is very fast.")
    assert PROMPT_STYLES["alpaca"].full_text(WITH_INPUT) == (
        ALPACA_HEAD + "Rewrite the sentence using a simile.\n\n### Input:\nThe car is very fast."
        "\n\n### Response:\nThe car is as fast as lightning.")


def test_alpaca_prompt_without_input_has_no_input_section():
    assert format_prompt(NO_INPUT, "alpaca") == ALPACA_HEAD + "Name a primary color.\n\n### Response:\n"


def test_phi3_prompt():
    assert PROMPT_STYLES["phi3"].full_text(WITH_INPUT) == (
        "<|user|>\nRewrite the sentence using a simile.\nThe car is very fast.\n<|assistant|>\n"
        "The car is as fast as lightning.")
    assert format_prompt(NO_INPUT, "phi3") == "<|user|>\nName a primary color.\n<|assistant|>\n"


def test_raw_prompt_is_the_instruction_verbatim():
    hh = {"instruction": "\n\nHuman: Hi there.\n\nAssistant:", "input": "", "output": " Hello."}
    assert PROMPT_STYLES["raw"].full_text(hh) == "\n\nHuman: Hi there.\n\nAssistant: Hello."
    assert extract_response(" Hello.<|endoftext|>junk", "raw") == "Hello."


def test_unknown_prompt_style_lists_the_choices():
    with pytest.raises(ValueError, match=r"'chatml'.*\['alpaca', 'phi3', 'raw'\]"):
        format_input(NO_INPUT, "chatml")


@pytest.mark.parametrize("style,text,expected", [
    ("alpaca", format_prompt(NO_INPUT) + "Red.\n\n### Instruction:\nMore", "Red."),
    ("alpaca", "  Red is one.<|endoftext|>garbage", "Red is one."),
    ("alpaca", "### Response:\nBlue.", "Blue."),
    ("alpaca", "Green.\n\n###", "Green."),
    ("phi3", format_prompt(NO_INPUT, "phi3") + "Yellow.\n<|user|>\nnext", "Yellow."),
    ("phi3", "Cyan.<|assistant|>", "Cyan."),
])
def test_extract_response_strips_prompt_markers_and_what_follows(style, text, expected):
    assert extract_response(text, style) == expected


# ----------------------------------------------------------------------------- tokenization
def test_dataset_tokenizes_once_and_stores_the_prompt_length():
    tok = get_tokenizer()
    ds = InstructionDataset([WITH_INPUT, NO_INPUT], tok, "alpaca")
    for i, e in enumerate([WITH_INPUT, NO_INPUT]):
        item = ds[i]
        assert item["input_ids"] == tok.encode(PROMPT_STYLES["alpaca"].full_text(e))  # no <|endoftext|> appended
        assert item["prompt_length"] == len(tok.encode(format_prompt(e)))
        assert item["index"] == i


def test_literal_endoftext_in_the_data_is_text_not_the_special_token():
    ds = InstructionDataset([{**NO_INPUT, "output": "a <|endoftext|> b"}])
    assert 50256 not in ds[0]["input_ids"]


# ----------------------------------------------------------------------------- collate
def items(*seqs, prompt_lengths=None):
    return [{"input_ids": list(s), "prompt_length": p}
            for s, p in zip(seqs, prompt_lengths or [0] * len(seqs))]


def test_collate_pads_to_longest_plus_one_and_shifts():
    b = instruction_collate(items([1, 2, 3, 4, 5], [6, 7], [8, 9, 10]), pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [8, 9, 10, 0, 0]]
    # the first pad of each row stays as the end-of-text target; later pads are ignored
    assert b["labels"].tolist() == [[2, 3, 4, 5, 0], [7, 0, -100, -100, -100], [9, 10, 0, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert all(v.dtype == torch.long for v in b.values())


def test_collate_matches_the_books_default_pad_and_plain_lists():
    # the book's example: inputs_1 = [0, 1, 2, 3, 4], inputs_2 = [5, 6], inputs_3 = [7, 8, 9]
    b = instruction_collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert b["input_ids"].tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert b["labels"].tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]


def test_collate_truncates_inputs_and_targets():
    b = instruction_collate(items([1, 2, 3, 4, 5], [6, 7]), pad_id=0, allowed_max_length=3)
    assert b["input_ids"].tolist() == [[1, 2, 3], [6, 7, 0]]
    assert b["labels"].tolist() == [[2, 3, 4], [7, 0, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_masks_the_prompt_targets():
    # prompts of 3 and 2 tokens: only positions predicting response tokens (and the end) are learned
    b = instruction_collate(items([1, 2, 3, 4, 5], [6, 7, 8], prompt_lengths=[3, 2]), pad_id=0, mask_prompt=True)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 4, 5, 0], [-100, 8, 0, -100, -100]]


def test_collate_custom_ignore_index_and_prompt_mask_needs_lengths():
    b = instruction_collate([[1, 2], [3]], pad_id=0, ignore_index=-1)
    assert b["labels"].tolist() == [[2, 0], [0, -1]]
    with pytest.raises(ValueError, match="prompt_length"):
        instruction_collate([[1, 2]], mask_prompt=True)


def test_left_pad_for_batched_generation():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0, max_length=2)
    assert ids.tolist() == [[2, 3], [0, 4]]


# ----------------------------------------------------------------------------- files and splits
def test_shipped_data_splits_like_the_book():
    data = load_instruction_data()
    assert len(data) == 1100
    train, val, test = split_entries(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train[0] == data[0] and test[0] == data[935] and val[0] == data[1045]


def test_datamodule_batches_and_test_batches_carry_prompts():
    dm = InstructionDataModule(batch_size=4, mask_prompt=True)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (935, 55, 110)
    assert dm.test_entries[0] == load_instruction_data()[935]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "attention_mask"} and batch["input_ids"].shape[0] == 4
    test = next(iter(dm.test_dataloader()))
    assert test["index"].tolist() == [0, 1, 2, 3] and test["entries"] == dm.test_entries[:4]
    tok = get_tokenizer()
    row = test["prompt_ids"][1][test["prompt_attention_mask"][1].bool()].tolist()
    assert tok.decode(row) == format_prompt(dm.test_entries[1])
    assert (test["prompt_attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the right


def test_seeded_shuffle_changes_the_split_reproducibly():
    a = InstructionDataModule(shuffle_before_split=True, split_seed=1)
    b = InstructionDataModule(shuffle_before_split=True, split_seed=1)
    c = InstructionDataModule()
    for dm in (a, b, c):
        dm.setup()
    assert a.test_entries == b.test_entries != c.test_entries and len(a.test_entries) == 110


def write(tmp_path, text):
    p = tmp_path / "data.json"
    p.write_text(text)
    return p


def test_invalid_json_names_file_line_and_column(tmp_path):
    p = write(tmp_path, '[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": }\n]')
    with pytest.raises(InstructionDataError, match=rf"{p}: invalid JSON at line 3, column 19"):
        load_instruction_data(p)


@pytest.mark.parametrize("entry,match", [
    ({"instruction": "a", "input": ""}, r"entry 1 has no 'output' key"),
    ({"instruction": "a", "input": 3, "output": "b"}, r"entry 1: 'input' must be a string, got int"),
    (["a", "b", "c"], r"entry 1 must be an object"),
])
def test_malformed_entry_names_file_and_index(tmp_path, entry, match):
    p = write(tmp_path, json.dumps([NO_INPUT, entry]))
    with pytest.raises(InstructionDataError, match=rf"{p}: {match}"):
        load_instruction_data(p)


def test_not_a_list_or_empty_file_is_rejected(tmp_path):
    with pytest.raises(InstructionDataError, match="expected a JSON list"):
        load_instruction_data(write(tmp_path, '{"instruction": "a"}'))
    with pytest.raises(InstructionDataError, match="no entries"):
        load_instruction_data(write(tmp_path, "[]"))


def test_any_file_by_path(tmp_path):
    p = write(tmp_path, json.dumps([NO_INPUT] * 20))
    dm = InstructionDataModule(path=str(p), batch_size=2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (17, 1, 2)


def test_non_utf8_file_names_the_file_and_byte(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes(json.dumps([{**NO_INPUT, "output": "caf\u00e9"}], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(InstructionDataError, match=rf"{p}: not UTF-8 text \(byte \d+"):
        load_instruction_data(p)


def test_jsonl_file_one_entry_per_line_and_errors_name_the_line(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text(json.dumps(NO_INPUT) + "\n\n" + json.dumps(WITH_INPUT) + "\n")
    assert load_instruction_data(p) == [NO_INPUT, WITH_INPUT]
    p.write_text(json.dumps(NO_INPUT) + "\n\n" + json.dumps({"instruction": "a", "input": ""}) + "\n")
    with pytest.raises(InstructionDataError, match=rf"{p}: entry 1 \(line 3\) has no 'output' key"):
        load_instruction_data(p)
    p.write_text(json.dumps(NO_INPUT) + "\n{oops\n")
    with pytest.raises(InstructionDataError, match=rf"{p}: invalid JSON at line 2, column 2"):
        load_instruction_data(p)


# ----------------------------------------------------------------------------- data that cannot train
def test_entries_whose_prompt_fills_the_context_are_refused_when_all_and_counted_when_some(tmp_path):
    long = {"instruction": "word " * 60, "input": "", "output": "ok"}  # a prompt of about 90 tokens
    short = {"instruction": "Say ok.", "input": "", "output": "ok"}  # about 30 tokens
    p = tmp_path / "long.json"
    p.write_text(json.dumps([long] * 20))
    with pytest.raises(InstructionDataError, match=(
            rf"^{p}: none of the 17 training entries can be learned from \(17 of 17 train, 1 of 1 val, 2 of 2 test\): "
            r"their prompts \(up to \d+ tokens\) are longer than data.allowed_max_length=64 tokens .*"
            r"every label is masked and the loss is 0/0 = NaN; raise data.allowed_max_length")):
        InstructionDataModule(path=str(p), allowed_max_length=64).setup()
    # the very batch such entries would make: every label masked, and the mean over no labels is NaN
    ds = InstructionDataset([long], prompt_style="alpaca")
    batch = instruction_collate([ds[0]], allowed_max_length=64, mask_prompt=True)
    assert (batch["labels"] == -100).all()

    q = tmp_path / "some.json"
    q.write_text(json.dumps([long, short] * 10))
    with pytest.warns(UserWarning, match=rf"{q}: 10 entries teach nothing \(9 of 17 train, 0 of 1 val, 1 of 2 test\)"):
        InstructionDataModule(path=str(q), allowed_max_length=64).setup()
    InstructionDataModule(path=str(p), allowed_max_length=64, mask_prompt=False).setup()  # prompts are targets too
    InstructionDataModule(path=str(p), allowed_max_length=None).setup()  # nothing is truncated


def test_an_entry_larger_than_max_record_bytes_is_refused_naming_file_and_line(tmp_path):
    big = {"instruction": "word " * 300_000, "input": "", "output": "y"}  # 1.5 MB of JSON
    lines = tmp_path / "big.jsonl"
    lines.write_text("".join(json.dumps(e) + "\n" for e in [NO_INPUT, big, NO_INPUT]))
    size = len(json.dumps(big))
    with pytest.raises(InstructionDataError, match=rf"^{lines}: line 2 is {size:,} bytes long, more than "
                                                   r"data.max_record_bytes=1,000,000 \(a context of 1,024 tokens"):
        load_instruction_data(lines)
    listed = tmp_path / "big.json"
    listed.write_text(json.dumps([NO_INPUT, big]))
    with pytest.raises(InstructionDataError, match=rf"^{listed}: entry 1 is {size:,} bytes of JSON, more than "
                                                   r"data.max_record_bytes=1,000,000"):
        load_instruction_data(listed)
    assert load_instruction_data(lines, max_record_bytes=None)[1] == big  # no limit: read as before
    assert load_instruction_data(lines, max_record_bytes=size) == [NO_INPUT, big, NO_INPUT]  # the bound is inclusive
