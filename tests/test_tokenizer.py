import tiktoken

from gptlab import get_tokenizer
from gptlab.tokenizer import ASSETS, EOT_ID


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
