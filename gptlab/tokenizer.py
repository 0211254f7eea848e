"""Tokenizers as ``tiktoken`` encodings: GPT-2's BPE, built offline from files shipped in the package,
or a byte-level BPE trained on your own corpus (``gptlab-tokenizer train``, :mod:`gptlab.tokenizer_training`).

``tiktoken.get_encoding("gpt2")`` downloads its vocabulary on first use; gptlab never does. The
ranks in ``gptlab/assets/gpt2.tiktoken`` are byte-for-byte OpenAI's r50k/gpt2 ranks (see
``gptlab/assets/NOTICE``), so the ids are identical to tiktoken's ``"gpt2"`` encoding.

A trained tokenizer is a folder of two files: ``ranks.tiktoken`` (``<base64 token> <rank>`` per line,
tiktoken's own format, ranks in merge order) and ``manifest.json`` (the pre-tokenisation pattern, the
special tokens and their ids, the vocabulary size, the SHA-256 of the ranks file and the corpus it
was trained on). Using one needs only tiktoken.

Every ranks file is read directly and its SHA-256 compared with the expected one on every load: the
hash tiktoken itself pins for GPT-2's, the manifest's for a trained one. (tiktoken's
``load_tiktoken_bpe(path)`` would copy even a local file into a cache under ``$TMPDIR/data-gym-cache``
and, without an expected hash, trust that copy in every later process.)

A tokenizer's identity is its *tokenizer hash* (:func:`tokenizer_info`): the SHA-256 of its pattern,
special tokens and ranks hash. Checkpoints record it, with the manifest and ranks of a trained
tokenizer (:func:`tokenizer_record`), so a checkpoint decodes anywhere; a tool given another
tokenizer than the checkpoint's refuses, naming both hashes (:func:`check_same_tokenizer`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import tiktoken

from gptlab.errors import InvalidInput

ASSETS = Path(__file__).resolve().parent / "assets"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
"""GPT-2's ``<|endoftext|>`` id; a trained tokenizer's is ``tokenizer.eot_token``."""
GPT2_VOCAB_SIZE = 50257
# tiktoken's own pattern for the "gpt2" encoding (possessive quantifiers; same ids as GPT-2's regex).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# SHA-256 of OpenAI's r50k_base.tiktoken: tiktoken_ext.openai_public's ``expected_hash`` for these ranks
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

MANIFEST_FILE = "manifest.json"
RANKS_FILE = "ranks.tiktoken"
MANIFEST_FORMAT = "gptlab-bpe"
MANIFEST_VERSION = 1
MAX_VOCAB_SIZE = 2**16
"""Largest vocabulary gptlab trains: token files store ids as ``uint16``."""
_SPECIAL_LIKE = re.compile(r"<\|[^\s<>|]{1,64}\|>")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class TokenizerError(InvalidInput):
    """A tokenizer that cannot be used: an unknown name, a folder without a valid manifest, ranks
    that do not match their hash, text with a special token the tokenizer does not have."""


class TokenizerMismatch(TokenizerError):
    """Two tokenizers that must be the same are not (a checkpoint's vs the one given)."""


def tokenizer_sha256(pattern: str, special_tokens: Mapping[str, int], ranks_sha256: str) -> str:
    """The tokenizer hash: SHA-256 of the pre-tokenisation pattern, the special tokens with their ids
    and the SHA-256 of the ranks file; equal hashes encode every text to the same ids."""
    blob = json.dumps({"pattern": pattern, "ranks_sha256": ranks_sha256, "special_tokens": dict(special_tokens)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


GPT2_SHA256 = tokenizer_sha256(GPT2_PAT_STR, {EOT_TOKEN: EOT_ID}, GPT2_RANKS_SHA256)
"""The tokenizer hash of GPT-2's BPE."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What identifies a tokenizer: its name, its tokenizer hash, its ranks file hash, and for a
    trained one its manifest and ranks file bytes (what a checkpoint embeds)."""

    name: str
    sha256: str
    ranks_sha256: str
    manifest: Mapping[str, Any] | None = field(default=None, repr=False)
    ranks_bytes: bytes | None = field(default=None, repr=False)

    @property
    def is_gpt2(self) -> bool:
        return self.sha256 == GPT2_SHA256

    def describe(self) -> str:
        """``name (sha256 0123456789abcdef)``: how messages name a tokenizer."""
        return f"{self.name} (sha256 {self.sha256[:16]})"


_INFO: "weakref.WeakKeyDictionary[tiktoken.Encoding, TokenizerInfo]" = weakref.WeakKeyDictionary()
_BY_SHA: dict[str, tiktoken.Encoding] = {}


# ----------------------------------------------------------------------------- ranks files
def ranks_file_bytes(ranks: Mapping[bytes, int]) -> bytes:
    """The ``.tiktoken`` file of ``ranks`` (token bytes -> rank): ``<base64 token> <rank>`` lines in
    rank order, tiktoken's own format (for GPT-2's ranks, the shipped file byte for byte)."""
    return b"".join(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n"
                    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))


def parse_ranks(data: bytes, source: str | Path) -> dict[bytes, int]:
    """Token bytes -> rank from the bytes of a ``.tiktoken`` file; a malformed line raises
    :class:`TokenizerError` naming ``source`` and the line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64 token> <rank>'")
            tok, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{source}:{n}: not a rank line ({e})") from None
        if tok in ranks:
            raise TokenizerError(f"{source}:{n}: token {tok!r} has a second rank")
        ranks[tok] = rank
    return ranks


def load_bpe_ranks(path: str | Path, expected_sha256: str = GPT2_RANKS_SHA256) -> dict[bytes, int]:
    """BPE merge ranks from a ``.tiktoken`` file (``<base64 token> <rank>`` per line), after checking
    the file's SHA-256; ``ValueError`` names the file when it differs."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerError(f"{path}: SHA-256 {digest} is not the expected {expected_sha256}: the BPE ranks were "
                             "changed or damaged; reinstall gptlab (the file ships in gptlab/assets)")
    return parse_ranks(data, path)


# ----------------------------------------------------------------------------- loading
@lru_cache(maxsize=1)
def _gpt2() -> tiktoken.Encoding:
    ranks = load_bpe_ranks(ASSETS / "gpt2.tiktoken")
    enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=GPT2_VOCAB_SIZE)
    _INFO[enc] = TokenizerInfo("gpt2", GPT2_SHA256, GPT2_RANKS_SHA256)
    _BY_SHA[GPT2_SHA256] = enc
    return enc


def get_tokenizer(name: str | os.PathLike | None = "gpt2") -> tiktoken.Encoding:
    """A tokenizer as a ``tiktoken.Encoding``.

    ``gpt2`` (or None): GPT-2's BPE (50,257 ids, ``<|endoftext|>`` = 50256) from
    ``gptlab/assets/gpt2.tiktoken``; anything else: the folder (or its ``manifest.json``) that
    ``gptlab-tokenizer train`` wrote. The ranks file is checked against its SHA-256 first; nothing
    needs the network. The same files give the same object (cached) in one process.

    Raises :class:`TokenizerError` (one line naming the value or file) for anything else.
    """
    if name is None or str(name) == "gpt2":
        return _gpt2()
    path = Path(os.path.expanduser(str(name)))
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    if not manifest_path.is_file():
        where = f"{path} has no {MANIFEST_FILE}" if path.is_dir() else f"no such folder (cwd: {os.getcwd()})"
        raise TokenizerError(f"tokenizer={str(name)!r}: expected gpt2 or a folder written by gptlab-tokenizer train "
                             f"({MANIFEST_FILE} + {RANKS_FILE}); {where}")
    manifest_bytes = manifest_path.read_bytes()
    manifest = _read_manifest(manifest_bytes, manifest_path)
    ranks_path = manifest_path.parent / manifest["ranks_file"]
    if not ranks_path.is_file():
        raise TokenizerError(f"{manifest_path}: its ranks file {ranks_path} does not exist")
    st = ranks_path.stat()
    return _load_trained(manifest_bytes, str(manifest_path), str(ranks_path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _load_trained(manifest_bytes: bytes, manifest_path: str, ranks_path: str, size: int,
                  mtime_ns: int) -> tiktoken.Encoding:
    """One trained tokenizer, cached by its manifest's bytes and its ranks file's size and time."""
    manifest = _read_manifest(manifest_bytes, manifest_path)
    return build_tokenizer(manifest, Path(ranks_path).read_bytes(), manifest_path, ranks_source=ranks_path)


def _read_manifest(data: bytes, source: str | Path) -> dict[str, Any]:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{source}:{e.lineno}: not JSON ({e.msg})") from None
    check_manifest(manifest, source)
    return manifest


def check_manifest(manifest: Any, source: str | Path) -> None:
    """Raise :class:`TokenizerError` naming ``source`` and the field unless ``manifest`` is a
    gptlab tokenizer manifest this version reads."""
    def bad(what: str) -> TokenizerError:
        return TokenizerError(f"{source}: {what}; not a manifest gptlab-tokenizer train writes")

    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise bad(f"'format' is not {MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise bad(f"version {manifest.get('version')!r} is not {MANIFEST_VERSION} (written by another gptlab?)")
    for key in ("name", "pattern", "ranks_file"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise bad(f"'{key}' is not a non-empty string")
    if Path(manifest["ranks_file"]).name != manifest["ranks_file"] or manifest["ranks_file"] in (".", ".."):
        raise bad(f"'ranks_file' {manifest['ranks_file']!r} is not a file name in the manifest's folder")
    if not isinstance(manifest.get("ranks_sha256"), str) or not _SHA256.match(manifest["ranks_sha256"]):
        raise bad("'ranks_sha256' is not a SHA-256 (64 hex digits)")
    specials = manifest.get("special_tokens")
    if not isinstance(specials, dict) or not all(isinstance(k, str) and type(v) is int for k, v in specials.items()):
        raise bad("'special_tokens' is not a mapping of token -> id")
    if EOT_TOKEN not in specials:
        raise bad(f"'special_tokens' lacks {EOT_TOKEN}")
    if type(manifest.get("vocab_size")) is not int:
        raise bad("'vocab_size' is not an integer")


def build_tokenizer(manifest: Mapping[str, Any], ranks_bytes: bytes, source: str | Path,
                    ranks_source: str | Path | None = None) -> tiktoken.Encoding:
    """The ``tiktoken.Encoding`` of a (checked) manifest and the bytes of its ranks file, after
    checking them against ``manifest["ranks_sha256"]`` and against each other (ranks 0..n-1, the
    256 single bytes among them, special ids right after, ``vocab_size`` = all of them)."""
    ranks_source = ranks_source or source
    digest = hashlib.sha256(ranks_bytes).hexdigest()
    if digest != manifest["ranks_sha256"]:
        raise TokenizerError(f"{ranks_source}: SHA-256 {digest} is not the {manifest['ranks_sha256']} that {source} "
                             "records: the ranks were changed or damaged (retrain, or restore the files)")
    sha = tokenizer_sha256(manifest["pattern"], manifest["special_tokens"], digest)
    if sha in _BY_SHA:
        return _BY_SHA[sha]
    ranks = parse_ranks(ranks_bytes, ranks_source)
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerError(f"{ranks_source}: the ranks are not 0..{n - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{ranks_source}: {len(missing)} of the 256 single bytes have no rank (e.g. {missing[0]}): "
                             "not a byte-level BPE")
    specials = dict(manifest["special_tokens"])
    if sorted(specials.values()) != list(range(n, n + len(specials))):
        raise TokenizerError(f"{source}: special token ids {sorted(specials.values())} do not follow the {n} ranks "
                             f"({n}..{n + len(specials) - 1})")
    if manifest["vocab_size"] != n + len(specials):
        raise TokenizerError(f"{source}: vocab_size {manifest['vocab_size']} is not {n} ranks + {len(specials)} "
                             "special tokens")
    try:
        enc = tiktoken.Encoding(name=str(manifest["name"]), pat_str=manifest["pattern"], mergeable_ranks=ranks,
                                special_tokens=specials, explicit_n_vocab=n + len(specials))
    except ValueError as e:  # the pattern does not compile
        raise TokenizerError(f"{source}: 'pattern' is not a regular expression tiktoken reads ({e})") from None
    _INFO[enc] = TokenizerInfo(str(manifest["name"]), sha, digest, dict(manifest), ranks_bytes)
    _BY_SHA[sha] = enc
    return enc


def tokenizer_info(tokenizer: tiktoken.Encoding) -> TokenizerInfo:
    """Name and hashes of ``tokenizer`` (and a trained one's manifest and ranks). Encodings built
    elsewhere (``tiktoken.get_encoding(...)``, a pickled copy) are hashed from their ranks."""
    info = _INFO.get(tokenizer)
    if info is None:
        ranks_bytes = ranks_file_bytes(tokenizer._mergeable_ranks)  # what tiktoken pickles too
        digest = hashlib.sha256(ranks_bytes).hexdigest()
        specials = dict(tokenizer._special_tokens)
        sha = tokenizer_sha256(tokenizer._pat_str, specials, digest)
        known = _BY_SHA.get(sha)
        if known is not None:
            info = _INFO[known]
        else:
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": tokenizer.name,
                        "pattern": tokenizer._pat_str, "special_tokens": specials, "vocab_size": tokenizer.n_vocab,
                        "ranks_file": RANKS_FILE, "ranks_sha256": digest}
            info = TokenizerInfo(tokenizer.name, sha, digest, None if sha == GPT2_SHA256 else manifest,
                                 None if sha == GPT2_SHA256 else ranks_bytes)
        _INFO[tokenizer] = info
    return info


def describe(tokenizer: tiktoken.Encoding) -> str:
    """``name (sha256 0123456789abcdef)`` of ``tokenizer``."""
    return tokenizer_info(tokenizer).describe()


def tokenizer_tag(tokenizer: tiktoken.Encoding) -> str:
    """A short file-name-safe name: ``gpt2``, or ``bpe-<first 16 digits of the tokenizer hash>``."""
    info = tokenizer_info(tokenizer)
    return "gpt2" if info.is_gpt2 else f"bpe-{info.sha256[:16]}"


# ----------------------------------------------------------------------------- records (checkpoints)
def tokenizer_record(tokenizer: tiktoken.Encoding) -> dict[str, Any]:
    """What a checkpoint stores about its tokenizer (plain strings and dicts): name and tokenizer
    hash; for a trained tokenizer also its manifest and the text of its ranks file (about 12 bytes a
    token), so the checkpoint decodes on a machine that never saw the tokenizer's folder."""
    info = tokenizer_info(tokenizer)
    record: dict[str, Any] = {"name": info.name, "sha256": info.sha256}
    if not info.is_gpt2:
        record["manifest"] = dict(info.manifest or {})
        record["ranks"] = (info.ranks_bytes or b"").decode("ascii")
    return record


def tokenizer_from_record(record: Mapping[str, Any] | None, source: str | Path = "checkpoint") -> tiktoken.Encoding:
    """The tokenizer a checkpoint records (:func:`tokenizer_record`); None (checkpoints written
    before gptlab recorded one, all of them GPT-2) is GPT-2's. A damaged record raises
    :class:`TokenizerError` naming ``source``."""
    if record is None:
        return get_tokenizer("gpt2")
    if not isinstance(record, Mapping) or not isinstance(record.get("sha256"), str):
        raise TokenizerError(f"{source}: its tokenizer record is not a mapping with a 'sha256'")
    sha = record["sha256"]
    if sha == GPT2_SHA256:
        return get_tokenizer("gpt2")
    if sha in _BY_SHA:
        return _BY_SHA[sha]
    manifest, ranks = record.get("manifest"), record.get("ranks")
    if not isinstance(ranks, str):
        raise TokenizerError(f"{source}: records tokenizer {record.get('name')!r} (sha256 {sha[:16]}) without its ranks")
    check_manifest(manifest, f"{source} (its tokenizer manifest)")
    enc = build_tokenizer(manifest, ranks.encode("ascii"), f"{source} (its tokenizer manifest)",
                          ranks_source=f"{source} (its tokenizer ranks)")
    if tokenizer_info(enc).sha256 != sha:
        raise TokenizerError(f"{source}: its tokenizer record says sha256 {sha[:16]}, its manifest and ranks give "
                             f"{tokenizer_info(enc).sha256[:16]}: the record is damaged")
    return enc


def check_same_tokenizer(expected: tiktoken.Encoding, given: tiktoken.Encoding, expected_what: str,
                         given_what: str, hint: str = "") -> None:
    """Raise :class:`TokenizerMismatch` naming both tokenizers and hashes unless they are the same
    (``expected_what`` / ``given_what``: what each belongs to, for the message)."""
    a, b = tokenizer_info(expected), tokenizer_info(given)
    if a.sha256 != b.sha256:
        raise TokenizerMismatch(f"tokenizer mismatch: {expected_what} uses {a.describe()}, {given_what} is "
                                f"{b.describe()}" + (f"; {hint}" if hint else ""))


def check_vocab_fits(vocab_size: int, tokenizer: tiktoken.Encoding, what: str) -> None:
    """Raise :class:`TokenizerError` when a model with ``vocab_size`` token rows cannot read every id
    of ``tokenizer``."""
    if vocab_size < tokenizer.n_vocab:
        raise TokenizerError(f"{what} has {vocab_size:,} token rows, fewer than the {tokenizer.n_vocab:,} ids of "
                             f"tokenizer {describe(tokenizer)}; set model.vocab_size >= {tokenizer.n_vocab} "
                             "(it follows the tokenizer unless set)")


# ----------------------------------------------------------------------------- writing
def save_tokenizer(folder: str | Path, ranks: Mapping[bytes, int], special_tokens: Mapping[str, int],
                   name: str, pattern: str = GPT2_PAT_STR, **manifest_fields: Any) -> Path:
    """Write ``ranks.tiktoken`` and ``manifest.json`` (with ``manifest_fields`` added, e.g. the corpus)
    into ``folder`` (created); each file is written under a temporary name and renamed, so a reader
    never sees half a file. Returns the manifest's path."""
    folder = Path(folder)
    data = ranks_file_bytes(ranks)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": name, "pattern": pattern,
                "special_tokens": dict(special_tokens), "vocab_size": len(ranks) + len(special_tokens),
                "ranks_file": RANKS_FILE, "ranks_sha256": hashlib.sha256(data).hexdigest(), **manifest_fields}
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, content in ((RANKS_FILE, data), (MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())):
        tmp = folder / f".{file_name}.tmp-{os.getpid()}"
        try:
            tmp.write_bytes(content)
            os.replace(tmp, folder / file_name)
        finally:
            tmp.unlink(missing_ok=True)
    return folder / MANIFEST_FILE


# ----------------------------------------------------------------------------- text
def encode(text: str, tokenizer: tiktoken.Encoding | None = None) -> list[int]:
    """Encode ``text`` with ``<|endoftext|>`` allowed as a special token."""
    tok = tokenizer or get_tokenizer()
    return tok.encode(text, allowed_special={EOT_TOKEN})


def check_special_tokens(text: str, tokenizer: tiktoken.Encoding) -> None:
    """Raise :class:`TokenizerError` when ``text`` holds something written like a special token
    (``<|name|>``) that is not one of ``tokenizer``'s, instead of encoding it as plain text unnoticed."""
    known = tokenizer.special_tokens_set
    for m in _SPECIAL_LIKE.finditer(text):
        if m.group() not in known:
            raise TokenizerError(f"the text holds {m.group()!r} (character {m.start()}), which is not a special token of "
                                 f"{describe(tokenizer)} (it has {sorted(known)}); encode it as plain text with "
                                 "special=false")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE files store tokens in it: a space
    is ``Ġ``, a newline ``Ċ``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def hf_vocab_and_merges(tokenizer: tiktoken.Encoding) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face's byte-level BPE files of ``tokenizer``: ``vocab.json`` (token -> id, special
    tokens included) and the merges in rank order (``merges.txt`` lines).

    Each token of rank r splits into the two tokens that BPE with the ranks below r leaves of its
    bytes: the merge that made it."""
    ranks: Mapping[bytes, int] = tokenizer._mergeable_ranks  # no public accessor; tiktoken pickles it too
    table = bytes_to_unicode()

    def text(tok: bytes) -> str:
        return "".join(table[b] for b in tok)

    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best = min(((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)))
            if best[0] >= rank:
                break
            parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {tok!r} (rank {rank}) is not the merge of two tokens of lower rank: "
                                 f"{describe(tokenizer)} is not a BPE Hugging Face files can hold")
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(tok): rank for tok, rank in ranks.items()}
    vocab.update(tokenizer._special_tokens)
    return vocab, merges



def register_resolvers() -> None:
    """The config interpolations that read a run's tokenizer: ``${gptlab.vocab_size:${tokenizer}}``
    (its ids: ``model.vocab_size`` follows the tokenizer) and ``${gptlab.eot_id:${tokenizer}}`` (its
    ``<|endoftext|>`` id). :func:`gptlab.config_tree.register_model_presets` calls it before any config
    is composed (the entry factory, the tests and the benchmarks call that); calling it again changes
    nothing."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gptlab.vocab_size"):
        OmegaConf.register_new_resolver("gptlab.vocab_size", lambda name: get_tokenizer(name).n_vocab)
    if not OmegaConf.has_resolver("gptlab.eot_id"):
        OmegaConf.register_new_resolver("gptlab.eot_id", lambda name: get_tokenizer(name).eot_token)


__all__ = ["ASSETS", "EOT_TOKEN", "EOT_ID", "GPT2_VOCAB_SIZE", "GPT2_PAT_STR", "GPT2_RANKS_SHA256", "GPT2_SHA256",
           "MANIFEST_FILE", "RANKS_FILE", "MAX_VOCAB_SIZE", "TokenizerError", "TokenizerMismatch", "TokenizerInfo",
           "get_tokenizer", "build_tokenizer", "check_manifest", "load_bpe_ranks", "parse_ranks", "ranks_file_bytes",
           "tokenizer_sha256", "tokenizer_info", "describe", "tokenizer_tag", "tokenizer_record",
           "tokenizer_from_record", "check_same_tokenizer", "check_vocab_fits", "save_tokenizer", "encode",
           "check_special_tokens", "bytes_to_unicode", "hf_vocab_and_merges", "register_resolvers"]
