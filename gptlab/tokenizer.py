"""GPT-2 byte-pair encoding through ``tiktoken``, built offline from files shipped in the package.

``tiktoken.get_encoding("gpt2")`` downloads its vocabulary on first use; gptlab never does. The
ranks in ``gptlab/assets/gpt2.tiktoken`` are byte-for-byte OpenAI's r50k/gpt2 ranks (see
``gptlab/assets/NOTICE``), so the ids are identical to tiktoken's ``"gpt2"`` encoding.

The file is read directly and its SHA-256 compared with the hash tiktoken itself expects for these
ranks, on every load. (tiktoken's ``load_tiktoken_bpe(path)`` would copy even a local file into a
cache under ``$TMPDIR/data-gym-cache`` and, without an expected hash, trust that copy in every later
process: a changed rank there would change every encoding.)
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from pathlib import Path

import tiktoken

ASSETS = Path(__file__).resolve().parent / "assets"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# tiktoken's own pattern for the "gpt2" encoding (possessive quantifiers; same ids as GPT-2's regex).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# SHA-256 of OpenAI's r50k_base.tiktoken: tiktoken_ext.openai_public's ``expected_hash`` for these ranks
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def load_bpe_ranks(path: str | Path, expected_sha256: str = GPT2_RANKS_SHA256) -> dict[bytes, int]:
    """BPE merge ranks from a ``.tiktoken`` file (``<base64 token> <rank>`` per line), after checking
    the file's SHA-256; ``ValueError`` names the file when it differs."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise ValueError(f"{path}: SHA-256 {digest} is not the expected {expected_sha256}: the BPE ranks were "
                         "changed or damaged; reinstall gptlab (the file ships in gptlab/assets)")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


@lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """Return the GPT-2 BPE as a ``tiktoken.Encoding`` (50,257 ids, ``<|endoftext|>`` = 50256).

    Built from ``gptlab/assets/gpt2.tiktoken`` after checking its SHA-256; needs no network. The
    result is cached, so every call returns the same object.
    """
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; valid choices: ['gpt2']")
    ranks = load_bpe_ranks(ASSETS / "gpt2.tiktoken")
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
