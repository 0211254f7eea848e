"""GPT-2 byte-pair encoding through ``tiktoken``, built offline from files shipped in the package.

``tiktoken.get_encoding("gpt2")`` downloads its vocabulary on first use; gptlab never does. The
ranks in ``gptlab/assets/gpt2.tiktoken`` are byte-for-byte OpenAI's r50k/gpt2 ranks (see
``gptlab/assets/NOTICE``), so the ids are identical to tiktoken's ``"gpt2"`` encoding.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

ASSETS = Path(__file__).resolve().parent / "assets"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# tiktoken's own pattern for the "gpt2" encoding (possessive quantifiers; same ids as GPT-2's regex).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


@lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """Return the GPT-2 BPE as a ``tiktoken.Encoding`` (50,257 ids, ``<|endoftext|>`` = 50256).

    Built from ``gptlab/assets/gpt2.tiktoken``; needs no network. The result is cached, so every
    call returns the same object.
    """
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; valid choices: ['gpt2']")
    ranks = load_tiktoken_bpe(str(ASSETS / "gpt2.tiktoken"))
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def encode(text: str, tokenizer: tiktoken.Encoding | None = None) -> list[int]:
    """Encode ``text`` with ``<|endoftext|>`` allowed as a special token."""
    tok = tokenizer or get_tokenizer()
    return tok.encode(text, allowed_special={EOT_TOKEN})
