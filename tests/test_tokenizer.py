import hashlib
import os
import subprocess
import sys

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gptlab import get_tokenizer
from gptlab.tokenizer import ASSETS, EOT_ID, GPT2_RANKS_SHA256, load_bpe_ranks


def test_ids_match_the_gpt2_encoding():
    assert get_tokenizer().encode("Hello, world. Is this-- a test?") == \
        [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]


def test_vocabulary_size_and_endoftext():
    tok = get_tokenizer()
    assert isinstance(tok, tiktoken.Encoding)
    assert tok.n_vocab == 50257 and tok.eot_token == EOT_ID == 50256


def test_special_token_allowed_explicitly():
    text = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
    assert get_tokenizer().encode(text, allowed_special={"<|endoftext|>"}) == [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286, 617,
        34680, 27271, 13]


def test_bundled_story_has_5145_tokens_and_round_trips():
    text = (ASSETS / "the-verdict.txt").read_text(encoding="utf-8")
    ids = get_tokenizer().encode(text)
    assert len(ids) == 5145
    assert get_tokenizer().decode(ids) == text


def test_same_ranks_as_the_data_gym_files():
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(ASSETS / "vocab.bpe"),
                                            encoder_json_file=str(ASSETS / "encoder.json"))
    assert ranks == get_tokenizer()._mergeable_ranks



def swapped_ranks() -> bytes:
    """The bundled ranks with two neighbouring entries' ranks exchanged."""
    lines = (ASSETS / "gpt2.tiktoken").read_bytes().splitlines()
    (a, ra), (b, rb) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = a + b" " + rb, b + b" " + ra
    return b"\n".join(lines) + b"\n"


def test_the_bundled_ranks_are_checked_against_tiktokens_known_sha256():
    assert GPT2_RANKS_SHA256 == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    assert load_bpe_ranks(ASSETS / "gpt2.tiktoken") == \
        load_tiktoken_bpe(str(ASSETS / "gpt2.tiktoken"), expected_hash=GPT2_RANKS_SHA256)


def test_ranks_with_two_entries_swapped_are_refused_naming_the_file(tmp_path):
    swapped = tmp_path / "gpt2.tiktoken"
    swapped.write_bytes(swapped_ranks())
    with pytest.raises(ValueError, match=f"{swapped}: SHA-256 .* is not the expected"):
        load_bpe_ranks(swapped)


def test_a_poisoned_tiktoken_cache_does_not_change_the_ids(tmp_path):
    # where tiktoken keeps its copy of a file it loaded: $TMPDIR/data-gym-cache/<sha1 of the path>
    cache = tmp_path / "data-gym-cache"
    cache.mkdir()
    (cache / hashlib.sha1(str(ASSETS / "gpt2.tiktoken").encode()).hexdigest()).write_bytes(swapped_ranks())
    text = "st l st l"  # tokens "st" and " l": the two whose ranks are swapped
    code = f"from gptlab.tokenizer import get_tokenizer; print(get_tokenizer().encode({text!r}))"
    env = {**os.environ, "TMPDIR": str(tmp_path), "TIKTOKEN_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(get_tokenizer().encode(text))
