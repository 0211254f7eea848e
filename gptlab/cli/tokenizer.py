"""``gptlab-tokenizer``: train a byte-level BPE on your corpus; encode, decode and measure text.

    gptlab-tokenizer train data.path=corpus/ vocab_size=8192 out=tokenizers/corpus-8k
    gptlab-tokenizer encode tokenizer=tokenizers/corpus-8k text="Every effort moves you"
    gptlab-tokenizer decode tokenizer=tokenizers/corpus-8k ids=[1204,3290,5]
    gptlab-tokenizer stats tokenizer=gpt2 file=heldout.txt

The first argument is the command; the rest are Hydra overrides of ``conf/tokenizer.yaml``
(``text=`` is taken verbatim). The work is done by :mod:`gptlab.tokenizer_training` (train) and
:mod:`gptlab.tokenizer` (everything else).
"""

from __future__ import annotations

import difflib
import functools
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from gptlab.cli import entry_point, handle_help
from gptlab.errors import InvalidInput

if TYPE_CHECKING:
    from omegaconf import DictConfig

PROG = "gptlab-tokenizer"
COMMANDS = ("train", "encode", "decode", "stats")


def run(cfg: DictConfig, command: str, text: str | None = None, out: TextIO | None = None) -> Any:
    """Run ``command`` (one of :data:`COMMANDS`) with ``cfg``; ``text``: a verbatim ``text=``."""
    from gptlab.tokenizer import get_tokenizer  # heavy imports wait until a command runs: --help stays instant

    out = out or sys.stdout
    if command == "train":
        return train(cfg, out)
    tok = get_tokenizer(cfg.tokenizer)
    if command == "decode":
        return decode(tok, cfg.ids, out)
    source = input_text(cfg, text, required=command == "encode")
    if command == "encode":
        return encode(tok, source, bool(cfg.special), out)
    return stats(tok, source, bool(cfg.special), out)


def train(cfg: DictConfig, out: TextIO) -> Path:
    """``train``: the corpus of ``data.path`` -> a tokenizer folder at ``out``; returns the folder."""
    from omegaconf import ListConfig, OmegaConf

    from gptlab.data.pretrain import read_text, resolve_sources
    from gptlab.tokenizer_training import train_bpe

    if cfg.data.path is None:
        raise InvalidInput("train needs data.path=<the corpus: a text file, a folder of .txt files or a glob>")
    if cfg.out is None:
        raise InvalidInput("train needs out=<the folder to write the tokenizer to>")
    try:
        files = resolve_sources(OmegaConf.to_container(cfg.data.path) if isinstance(cfg.data.path, ListConfig)
                                else cfg.data.path)
    except FileNotFoundError as e:
        raise InvalidInput(str(e)) from None
    strip = bool(cfg.data.strip_gutenberg)
    reading = "UTF-8, BOM removed, CRLF -> LF" + (", Project Gutenberg header and trailer removed" if strip else "")
    result = train_bpe(files, cfg.vocab_size, cfg.out, special_tokens=list(cfg.special_tokens),
                       min_frequency=cfg.min_frequency, read_text=functools.partial(read_text, strip_gutenberg=strip),
                       progress=bool(cfg.progress), overwrite=bool(cfg.overwrite), reading=reading)
    for line in result.summary():
        out.write(line + "\n")
    return result.folder


def input_text(cfg: DictConfig, text: str | None, required: bool) -> str | None:
    """The text of ``text=`` (verbatim) or ``file=``; exactly one unless not ``required`` (None then)."""
    text = text if text is not None else cfg.get("text")
    if text is not None and cfg.file is not None:
        raise InvalidInput("give text=\"...\" or file=<path>, not both")
    if cfg.file is not None:
        path = Path(str(cfg.file)).expanduser()
        if not path.is_file():
            raise InvalidInput(f"file={str(cfg.file)!r}: no such file")
        try:
            return path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"file={str(cfg.file)!r}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if text is None and required:
        raise InvalidInput("encode needs text=\"...\" or file=<path>")
    return None if text is None else str(text)


def _encode(tok: Any, text: str, special: bool) -> list[int]:
    from gptlab.tokenizer import check_special_tokens

    if not special:
        return tok.encode_ordinary(text)
    check_special_tokens(text, tok)
    return tok.encode(text, allowed_special="all")


def token_text(tok: Any, token_id: int) -> str:
    """How a token is shown: its text when its bytes are whole UTF-8 characters, else its bytes."""
    raw = tok.decode_single_token_bytes(token_id)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)


def encode(tok: Any, text: str, special: bool, out: TextIO) -> list[int]:
    """``encode``: the ids of ``text`` (a JSON list), its tokens, and tokens per character."""
    from gptlab.tokenizer import describe

    ids = _encode(tok, text, special)
    out.write(json.dumps(ids) + "\n")
    out.write("[" + ", ".join(token_text(tok, i) for i in ids) + "]\n")
    out.write(f"{len(ids):,} tokens for {len(text):,} characters ({len(ids) / max(1, len(text)):.3f} tokens per "
              f"character) with {describe(tok)}\n")
    return ids


def decode(tok: Any, ids: Any, out: TextIO) -> str:
    """``decode``: the text of ``ids`` (bytes that are not UTF-8 shown as U+FFFD)."""
    from omegaconf import ListConfig, OmegaConf

    from gptlab.tokenizer import describe

    if isinstance(ids, ListConfig):
        ids = OmegaConf.to_container(ids)
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    if not isinstance(ids, list) or not ids:
        raise InvalidInput(f"ids={ids!r}: expected a list of token ids, e.g. ids=[1204,3290,5]")
    bad = [i for i in ids if type(i) is not int or not 0 <= i < tok.n_vocab]
    if bad:
        raise InvalidInput(f"ids: {bad[0]!r} is not an id of {describe(tok)} (0..{tok.n_vocab - 1})")
    text = tok.decode(ids, errors="replace")
    out.write(text + "\n")
    return text


def stats(tok: Any, text: str | None, special: bool, out: TextIO) -> dict[str, Any]:
    """``stats``: the tokenizer (vocabulary, hash, training corpus) and, given a text, tokens per
    character / byte / word and how much of the vocabulary the text uses."""
    from gptlab.tokenizer import tokenizer_info

    info = tokenizer_info(tok)
    report: dict[str, Any] = {"tokenizer": info.name, "sha256": info.sha256, "vocab_size": tok.n_vocab,
                              "special_tokens": sorted(tok.special_tokens_set)}
    specials = ", ".join(f"{s}={tok.encode_single_token(s)}" for s in sorted(tok.special_tokens_set))
    rows = [("tokenizer", info.describe()), ("vocabulary", f"{tok.n_vocab:,} ids, special tokens {specials}")]
    corpus = (info.manifest or {}).get("corpus")
    if corpus:
        rows.append(("trained on", f"{len(corpus.get('files', []))} file(s), {corpus.get('bytes', 0):,} bytes"))
    if text is not None:
        ids = _encode(tok, text, special)
        n, chars, nbytes, words = len(ids), len(text), len(text.encode("utf-8")), len(text.split())
        report.update(characters=chars, bytes=nbytes, words=words, tokens=n,
                      tokens_per_character=n / max(1, chars), characters_per_token=chars / max(1, n),
                      tokens_per_word=n / max(1, words), distinct_tokens=len(set(ids)))
        rows += [("text", f"{chars:,} characters, {nbytes:,} bytes, {words:,} words"),
                 ("tokens", f"{n:,}"),
                 ("tokens per character", f"{report['tokens_per_character']:.4f}"),
                 ("characters per token", f"{report['characters_per_token']:.3f}"),
                 ("bytes per token", f"{nbytes / max(1, n):.3f}"),
                 ("tokens per word", f"{report['tokens_per_word']:.3f}"),
                 ("distinct tokens", f"{len(set(ids)):,} of {tok.n_vocab:,} ({100 * len(set(ids)) / tok.n_vocab:.1f}%)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        out.write(f"{k:<{width}}  {v}\n")
    return report


def take_command(argv: list[str]) -> str:
    """Remove the command (the first argument) from ``argv`` and return it; a missing or unknown one
    is one ``gptlab-tokenizer: error:`` line and exit status 2."""
    command = argv[1] if len(argv) > 1 else None
    if command not in COMMANDS:
        what = "no command" if command is None or "=" in command or command.startswith("-") else \
            f"unknown command {command!r}"
        close = difflib.get_close_matches(command or "", COMMANDS, n=1)
        sys.stderr.write(f"{PROG}: error: {what}" + (f" (did you mean {close[0]}?)" if close else "") +
                         f"; the first argument is one of: {', '.join(COMMANDS)} (see {PROG} --help)\n")
        raise SystemExit(2)
    del argv[1]
    return command


def main() -> None:
    """Console entry: ``gptlab-tokenizer <command> key=value ...``; ``--help`` is the page of
    ``conf/tokenizer.yaml``; the rest goes through the entry factory (``text=`` taken verbatim)."""
    handle_help("tokenizer", PROG)
    command = take_command(sys.argv)
    entry_point("tokenizer", functools.partial(run, command=command), prog=PROG, verbatim=("text",))()


if __name__ == "__main__":
    main()
