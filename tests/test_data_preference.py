"""Preference pairs: the book's file and split, both entry formats, the one-length masking collate
(the book's DPO mask as an option), reference-cache fingerprints, and errors naming file and entry."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab.data.instruct import format_input, format_prompt
from gptlab.data.records import split_entries
from gptlab.data.preference import (PreferenceDataError, PreferenceDataModule, PreferenceDataset,
                                    load_preference_data, preference_collate)
from gptlab.tokenizer import EOT_ID, get_tokenizer

PAIR = {"instruction": "Name a primary color.", "input": "", "output": "Red.", "chosen": "Red, of course.",
        "rejected": "Figure it out yourself."}


def write(tmp_path, entries, name="pairs.json"):
    p = tmp_path / name
    if name.endswith(".jsonl"):
        p.write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        p.write_text(json.dumps(entries))
    return p


def scored(labels: torch.Tensor) -> list[int]:
    return labels[labels != -100].tolist()


# ----------------------------------------------------------------------------- the book's data
def test_shipped_pairs_split_like_the_book():
    data = load_preference_data()
    assert len(data) == 1100 and set(data[0]) == {"instruction", "input", "output", "chosen", "rejected"}
    dm = PreferenceDataModule()
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (935, 55, 110)
    train, val, test = split_entries(data)
    assert dm.test_entries == test and dm.val_set.entries[0] == data[1045]


def book_dpo_mask(tok, entry: dict, side: str) -> tuple[list[int], list[bool]]:
    """The book's PreferenceDataset + custom_collate_fn mask for one sequence (before padding):
    the whole text encoded at once, False over the prompt + 2 tokens ("\\n\\n")."""
    prompt = tok.encode(format_input(entry))
    ids = tok.encode(f"{format_input(entry)}\n\n### Response:\n{entry[side]}")
    return ids, [j >= len(prompt) + 2 for j in range(len(ids))]


def test_book_options_score_exactly_the_books_dpo_tokens():
    tok = get_tokenizer()
    entries = load_preference_data()[:16]
    ds = PreferenceDataset(entries, tok, score_response_header=True)
    batch = preference_collate([ds[i] for i in range(16)], score_eos=False)
    for i, entry in enumerate(entries):
        for side in ("chosen", "rejected"):
            ids, mask = book_dpo_mask(tok, entry, side)
            assert batch[f"{side}_input_ids"][i, : len(ids)].tolist() == ids
            # compute_logprobs scores token j (j >= 1) where mask[j]: our label j - 1
            assert scored(batch[f"{side}_labels"][i]) == [t for t, m in zip(ids[1:], mask[1:]) if m]
    assert tok.decode(scored(batch["chosen_labels"][0])).startswith("### Response:\n")


# ----------------------------------------------------------------------------- collate
def test_both_sides_share_one_length_and_only_responses_and_eos_are_scored():
    tok = get_tokenizer()
    ds = PreferenceDataset([PAIR, {**PAIR, "chosen": "Red."}], tok)
    b = preference_collate([ds[0], ds[1]])
    T = max(len(ds[i][s]["input_ids"]) for i in range(2) for s in ("chosen", "rejected"))  # + 1 pad - 1 shift
    for side in ("chosen", "rejected"):
        assert b[f"{side}_input_ids"].shape == b[f"{side}_labels"].shape == (2, T)
    assert tok.decode(b["rejected_input_ids"][0][b["rejected_attention_mask"][0].bool()].tolist()) == \
        format_prompt(PAIR) + PAIR["rejected"]
    assert scored(b["chosen_labels"][0]) == tok.encode(PAIR["chosen"]) + [EOT_ID]
    assert scored(b["chosen_labels"][1]) == tok.encode("Red.") + [EOT_ID]
    assert scored(b["rejected_labels"][1]) == tok.encode(PAIR["rejected"]) + [EOT_ID]
    assert b["index"].tolist() == [0, 1] and "margin" not in b


def test_score_eos_false_drops_only_the_end_of_text_target():
    ds = PreferenceDataset([PAIR, {**PAIR, "chosen": "Red."}], get_tokenizer())
    with_eos, without = preference_collate([ds[0], ds[1]]), preference_collate([ds[0], ds[1]], score_eos=False)
    for side in ("chosen", "rejected"):
        for i in range(2):
            assert scored(without[f"{side}_labels"][i]) == scored(with_eos[f"{side}_labels"][i])[:-1]


def test_truncation_cuts_inputs_labels_and_masks_alike():
    ds = PreferenceDataset([PAIR], get_tokenizer())
    b = preference_collate([ds[0]], allowed_max_length=20)
    assert all(v.shape == (1, 20) for k, v in b.items() if k != "index")


# ----------------------------------------------------------------------------- files
def test_prompt_pairs_in_jsonl_with_margins(tmp_path):
    pairs = [{"prompt": f"\n\nHuman: Say {i}.\n\nAssistant:", "chosen": f" {i}.", "rejected": " No.",
              "margin": i / 2} for i in range(20)]
    dm = PreferenceDataModule(path=str(write(tmp_path, pairs, "hh.jsonl")), prompt_style="raw", batch_size=2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (17, 1, 2)
    b = next(iter(dm.test_dataloader()))
    tok = get_tokenizer()
    row = b["chosen_input_ids"][0][b["chosen_attention_mask"][0].bool()].tolist()
    assert tok.decode(row) == pairs[17]["prompt"] + pairs[17]["chosen"]
    assert b["margin"].tolist() == [8.5, 9.0] and b["entries"][0]["instruction"] == pairs[17]["prompt"]
    assert tok.decode(b["prompt_ids"][1][b["prompt_attention_mask"][1].bool()].tolist()) == pairs[18]["prompt"]


@pytest.mark.parametrize("entry,match", [
    ({**PAIR, "rejected": None}, r"entry 1 needs a string 'rejected', got NoneType"),
    ({"chosen": "a", "rejected": "b"}, r"entry 1 needs a string 'prompt' \(or 'instruction'\)"),
    ({**PAIR, "chosen": "  "}, r"entry 1: 'chosen' is empty"),
    ({**PAIR, "margin": "big"}, r"entry 1: 'margin' must be a number"),
    ({**PAIR, "input": 3}, r"entry 1: 'input' must be a string, got int"),
    ("just text", r"entry 1 must be an object"),
])
def test_malformed_entry_names_file_and_index(tmp_path, entry, match):
    p = write(tmp_path, [PAIR, entry])
    with pytest.raises(PreferenceDataError, match=rf"{p}: {match}"):
        load_preference_data(p)


def test_jsonl_errors_name_the_line_and_margins_are_all_or_none(tmp_path):
    p = write(tmp_path, [PAIR, {**PAIR, "margin": 1.0}], "pairs.jsonl")
    with pytest.raises(PreferenceDataError, match=rf"{p}: entry 0 \(line 1\) has no 'margin' while entry 1 has one"):
        load_preference_data(p)
    p.write_text(json.dumps(PAIR) + "\n[1,\n")
    with pytest.raises(PreferenceDataError, match=rf"{p}: invalid JSON at line 2"):
        load_preference_data(p)


def test_non_utf8_file_names_the_file(tmp_path):
    p = tmp_path / "pairs.json"
    p.write_bytes(json.dumps([{**PAIR, "chosen": "Rouge, bien s\u00fbr."}], ensure_ascii=False).encode("cp1252"))
    with pytest.raises(PreferenceDataError, match=rf"{p}: not UTF-8 text"):
        load_preference_data(p)
    with pytest.raises(FileNotFoundError, match="preference data file not found"):
        load_preference_data(tmp_path / "missing.json")


def test_fingerprint_follows_the_tokens_and_the_collate_settings(tmp_path):
    p = write(tmp_path, [PAIR] * 20)
    a, b = PreferenceDataModule(path=str(p)), PreferenceDataModule(path=str(p))
    assert a.fingerprint("train") == b.fingerprint("train") != a.fingerprint("test")
    assert PreferenceDataModule(path=str(p), score_eos=False).fingerprint("train") != a.fingerprint("train")
    q = write(tmp_path, [{**PAIR, "chosen": "Blue."}] + [PAIR] * 19, "other.json")
    assert PreferenceDataModule(path=str(q)).fingerprint("train") != a.fingerprint("train")


def test_pairs_that_cannot_teach_a_preference_are_refused_when_all_and_counted_when_some(tmp_path):
    long = {**PAIR, "instruction": "word " * 60}  # the prompt alone is longer than 32 tokens
    same = {**PAIR, "rejected": PAIR["chosen"]}
    late = {**PAIR, "chosen": "Red " + "and more " * 40 + "A.", "rejected": "Red " + "and more " * 40 + "B."}
    p = write(tmp_path, [long] * 10, "long.json")
    with pytest.raises(PreferenceDataError, match=(
            rf"^{p}: none of the 8 training pairs can be learned from \(8 of 8 train, 1 of 1 val, 1 of 1 test\): "
            r"10 have prompts longer than data.allowed_max_length=32 tokens \(model.context_length by default\), "
            r"which cuts both responses away; raise data.allowed_max_length")):
        PreferenceDataModule(path=str(p), allowed_max_length=32).setup()
    q = write(tmp_path, [same] * 10, "same.json")
    with pytest.raises(PreferenceDataError, match="none of the 8 training pairs .* 10 have identical chosen and "
                                                  "rejected responses; give each pair two different responses"):
        PreferenceDataModule(path=str(q)).setup()
    r = write(tmp_path, [PAIR] * 7 + [long, same, late] * 1, "some.json")
    with pytest.warns(UserWarning, match=(
            rf"{r}: 3 pairs teach nothing \(1 of 8 train, 1 of 1 val, 1 of 1 test\): 1 have prompts longer .*; "
            r"1 have identical chosen and rejected responses; 1 have responses that differ only after the first "
            r"64 tokens a batch keeps")):
        PreferenceDataModule(path=str(r), allowed_max_length=64).setup()
