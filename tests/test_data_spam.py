"""Text classification data: every line of the SMS Spam Collection parsed, clear errors on bad
lines, the book's balancing and 70/10/20 split, padding and attention masks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from gptlab.data.spam import (DEFAULT_SPAM_FILE, SpamDataModule, TextClassificationDataError,
                              TextClassificationDataModule, TextClassificationDataset, balance_classes,
                              classification_collate, encode_labels, read_labeled_texts, split_indices)
from gptlab.tokenizer import EOT_ID, get_tokenizer


@pytest.fixture(scope="module")
def spam_rows() -> list[tuple[str, str]]:
    return read_labeled_texts()


@pytest.fixture(scope="module")
def spam_dm() -> SpamDataModule:
    dm = SpamDataModule()
    dm.setup()
    return dm


# ----------------------------------------------------------------------------- parsing
def test_bundled_file_is_the_sms_spam_collection():
    assert DEFAULT_SPAM_FILE.is_file()
    assert DEFAULT_SPAM_FILE.stat().st_size == 477_907


def test_the_bundled_file_reads_as_the_books_pandas_rows(spam_rows):
    # pd.read_csv(sep="\t", header=None): 5,574 lines -> 5,572 rows (3 lines joined by an open quote)
    assert len(spam_rows) == 5572
    assert Counter(label for label, _ in spam_rows) == {"ham": 4825, "spam": 747}


def test_quoted_fields_lose_their_quotes_as_in_the_book(spam_rows):
    # line 4,575 of the file: spam<TAB>"URGENT! ... max£7. 50" is row 4,574 without the quotes
    label, text = spam_rows[4574]
    assert label == "spam" and text.startswith("URGENT! This is the 2nd attempt") and text.endswith("max£7. 50")


def test_quoting_none_keeps_every_line_and_its_quotes():
    rows = read_labeled_texts(quoting="none")
    assert len(rows) == 5574
    assert Counter(label for label, _ in rows) == {"ham": 4827, "spam": 747}
    text = rows[98][1]  # line 99 opens a double quote it never closes
    assert text.startswith("Hi. Wk been ok") and text.count('"') % 2 == 1 and "\n" not in text


def test_quoting_none_keeps_quotes_and_extra_tabs_in_the_text(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text('ham\tHe said "hi\nspam\tWIN "big\t"now\r\n\nham\t"quoted"\n', encoding="utf-8")
    assert read_labeled_texts(path, quoting="none") == [
        ("ham", 'He said "hi'), ("spam", 'WIN "big\t"now'), ("ham", '"quoted"')]


def test_minimal_quoting_reads_tsv_like_csv(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text('ham\t"a ""quoted"" word"\nspam\tit\'s 5" tall\r\n\nham\t"two\nlines"\n', encoding="utf-8")
    assert read_labeled_texts(path) == [("ham", 'a "quoted" word'), ("spam", 'it\'s 5" tall'), ("ham", "two\nlines")]


def test_a_tsv_row_with_a_third_field_names_the_line_and_the_quoting_option(tmp_path):
    path = tmp_path / "tabs.tsv"
    path.write_text("ham\tfine\nspam\tone\ttab too many\n", encoding="utf-8")
    with pytest.raises(TextClassificationDataError, match=rf"{path}:2: expected 'label<TAB>text' \(2 fields\), "
                                                          r"got 3 field\(s\).*data.quoting=none"):
        read_labeled_texts(path)
    assert read_labeled_texts(path, quoting="none")[1] == ("spam", "one\ttab too many")


def test_an_unknown_quoting_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown data.quoting 'csv'; valid choices: \['minimal', 'none'\]"):
        SpamDataModule(quoting="csv")


def test_a_malformed_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("ham\tfine\nspam\talso fine\nno tab on this line\n", encoding="utf-8")
    with pytest.raises(TextClassificationDataError, match=rf"{path}:3: expected 'label<TAB>text'"):
        read_labeled_texts(path)
    with pytest.raises(TextClassificationDataError, match=rf"{path}:3: expected 'label<TAB>text'"):
        read_labeled_texts(path, quoting="none")


def test_an_unknown_label_names_the_file_and_the_valid_labels(tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text("ham\thello\nspma\ttypo\n", encoding="utf-8")
    rows = read_labeled_texts(path)
    with pytest.raises(TextClassificationDataError, match=r"\['spma'\] not in data.labels=\['ham', 'spam'\]"):
        encode_labels([label for label, _ in rows], ["ham", "spam"], path)
    assert encode_labels(["b", "a", "b"]) == ([1, 0, 1], ["a", "b"])  # no labels: sorted distinct names


def test_csv_with_configured_columns_and_quoted_fields(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('id,review,sentiment\n1,"good, really",pos\n2,"bad\nvery bad",neg\n3,ok,pos\n',
                    encoding="utf-8")
    rows = read_labeled_texts(path, text_column="review", label_column="sentiment")
    assert rows == [("pos", "good, really"), ("neg", "bad\nvery bad"), ("pos", "ok")]
    with pytest.raises(TextClassificationDataError, match=r"no column 'text' \(data.text_column\)"):
        read_labeled_texts(path, label_column="sentiment")


def test_a_csv_row_with_a_missing_field_names_its_line(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("text,label\nhello,ham\njust text\n", encoding="utf-8")
    with pytest.raises(TextClassificationDataError, match=rf"{path}:3: expected 2 fields"):
        read_labeled_texts(path)


# ----------------------------------------------------------------------------- balance + split
def test_balancing_undersamples_the_majority_with_the_seed():
    y = [0] * 10 + [1] * 3 + [0] * 5
    idx = balance_classes(y, seed=123)
    assert Counter(np.asarray(y)[idx].tolist()) == {0: 3, 1: 3}
    assert idx[3:].tolist() == [10, 11, 12]  # the minority class whole, after the sampled majority
    assert balance_classes(y, seed=123).tolist() == idx.tolist()
    assert any(balance_classes(y, seed=s)[:3].tolist() != idx[:3].tolist() for s in range(5))


def test_split_sizes_are_the_books(spam_dm):
    # 747 spam + 747 ham = 1,494: int(1494 * 0.7) = 1045 train, int(1494 * 0.1) = 149 val, 300 test
    assert [len(p) for p in split_indices(1494, 0.7, 0.1)] == [1045, 149, 300]
    assert (len(spam_dm.train_set), len(spam_dm.val_set), len(spam_dm.test_set)) == (1045, 149, 300)
    labels = torch.cat([spam_dm.train_set.labels, spam_dm.val_set.labels, spam_dm.test_set.labels])
    assert labels.bincount().tolist() == [747, 747]
    assert spam_dm.label_names == ["ham", "spam"] and spam_dm.num_classes == 2


# (file row, label, text) of a few rows of each split, computed once with the book's own code
# (ch06 gpt_class_finetune.py: pd.read_csv(sep="\t", header=None), create_balanced_dataset,
# random_split(0.7, 0.1), to_csv + read_csv); the file row is the book DataFrame's index.
BOOK_ROWS = {
    "train": {0: (2087, 0, "Dude how do you like the buff wind."),
              176: (4574, 1, "URGENT! This is the 2nd attempt to contact U!U have WON £1000CALL 09071512432 b4 "
                             "300603t&csBCM4235WC1N3XX.callcost150ppmmobilesvary. max£7. 50"),
              1044: (3983, 0, "His frens go then he in lor. Not alone wif my mum n sis lor.")},
    "val": {0: (3778, 1, "Mila, age23, blonde, new in UK. I look sex with UK guys. if u like fun with me. Text "
                         "MTALK to 69866.18 . 30pp/txt 1st 5free. £1.50 increments. Help08718728876"),
            142: (5456, 1, "For the most sparkling shopping breaks from 45 per person; call 0121 2025050 or visit "
                           "www.shortbreaks.org.uk"),
            148: (4237, 1, "U can WIN £100 of Music Gift Vouchers every week starting NOW Txt the word DRAW to 87066 "
                           "TsCs www.Idew.com SkillGame, 1Winaweek, age16. 150ppermessSubscription")},
    "test": {0: (2079, 1, "85233 FREE>Ringtone!Reply REAL"),
             24: (2963, 0, "NONE!NOWHERE IKNO DOESDISCOUNT!SHITINNIT"),
             299: (4768, 1, "Your unique user ID is 1172. For removal send STOP to 87239 customer services "
                            "08708034412")},
}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_the_splits_hold_the_books_rows(spam_dm, split):
    ds = getattr(spam_dm, f"{split}_set")
    for pos, (row, label, text) in BOOK_ROWS[split].items():
        assert (int(spam_dm.split_rows[split][pos]), int(ds.labels[pos]), ds.texts[pos]) == (row, label, text)
    # the book's class counts per split: train 528/517, val 70/79, test 149/151 (ham/spam)
    expected = {"train": [528, 517], "val": [70, 79], "test": [149, 151]}[split]
    assert ds.labels.bincount().tolist() == expected


def test_the_splits_partition_a_seeded_shuffle(spam_dm):
    train, val, test = split_indices(1494, 0.7, 0.1, seed=123)
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(1494))
    assert train.tolist() == np.random.RandomState(123).permutation(1494)[:1045].tolist()
    assert 0.3 < spam_dm.train_set.labels[:100].float().mean() < 0.7  # not [all ham, then all spam]


def test_without_balancing_every_message_is_used(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("".join(f"{'spam' if i % 4 == 0 else 'ham'}\tmessage {i}\n" for i in range(40)))
    dm = TextClassificationDataModule(path=str(path), balance=False, train_ratio=0.5, val_ratio=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 10, 10)
    assert torch.cat([dm.train_set.labels, dm.val_set.labels, dm.test_set.labels]).bincount().tolist() == [30, 10]


# ----------------------------------------------------------------------------- tokens, padding, batches
def test_padding_to_the_longest_training_text(spam_dm):
    tok = get_tokenizer()
    ds = spam_dm.train_set
    assert ds.max_length == max(len(tok.encode_ordinary(t)) for t in ds.texts) == 120  # the book's 120
    assert spam_dm.val_set.input_ids.shape[1] == spam_dm.test_set.input_ids.shape[1] == 120
    i = int(ds.lengths.argmin())
    assert ds.input_ids[i, : ds.lengths[i]].tolist() == tok.encode_ordinary(ds.texts[i])
    assert (ds.input_ids[i, ds.lengths[i]:] == EOT_ID).all()


def test_batches_carry_ids_mask_and_long_labels(spam_dm):
    batch = next(iter(spam_dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "label"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 120)
    assert batch["label"].dtype == torch.long and batch["label"].shape == (8,)
    lengths = batch["attention_mask"].sum(1)
    for row, n in zip(batch["input_ids"], lengths):  # mask: 1 on the real tokens, then 0 on the pads
        assert (row[n:] == EOT_ID).all()
    assert torch.equal(batch["attention_mask"], (torch.arange(120)[None] < lengths[:, None]).long())


def test_max_length_truncates_and_batches_can_be_cut_to_their_longest_text():
    texts = ["one two three four five six seven eight", "hi", "a b"]
    ds = TextClassificationDataset(texts, [1, 0, 0], max_length=5)
    assert ds.input_ids.shape == (3, 5) and ds.lengths.tolist() == [5, 1, 2] and ds.num_truncated == 1
    batch = classification_collate([ds[1], ds[2]], pad_to_max_length=False)
    assert batch["input_ids"].shape == (2, 2)
    assert batch["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert classification_collate([ds[1], ds[2]])["input_ids"].shape == (2, 5)


def test_an_empty_text_becomes_one_end_of_text_token():
    ds = TextClassificationDataset(["", "hello"], [0, 1])
    assert ds.lengths.tolist() == [1, 1] and ds.input_ids[0, 0] == EOT_ID


def test_max_examples_keeps_a_mixed_subset():
    dm = SpamDataModule(max_examples=60)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 60
    assert 10 < int(dm.train_set.labels.sum()) < 32
