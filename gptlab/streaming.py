"""Text as a model writes it: token ids decoded piece by piece without splitting a UTF-8 character
(:class:`StreamDecoder`), held back where a stop string may begin (:class:`StopStrings`), and an
instruction-tuned model's response streamed in its prompt style (:func:`stream_response`). What
``gptlab-generate`` and ``gptlab-chat`` print, and what a server streams."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from gptlab.model.generation import generate_stream
from gptlab.model.gpt import GPT
from gptlab.tokenizer import EOT_ID, get_tokenizer

if TYPE_CHECKING:
    import tiktoken

    from gptlab.data.instruct import PromptStyle


class StreamDecoder:
    """Decode token ids incrementally; holds back bytes until they form complete UTF-8 characters."""

    def __init__(self, tokenizer: tiktoken.Encoding | None = None) -> None:
        self.tok = tokenizer or get_tokenizer()
        self.buf = b""

    def push(self, token_id: int) -> str:
        """Feed one token id; returns the text it completes ("" while a character is unfinished)."""
        self.buf += self.tok.decode_single_token_bytes(token_id)
        try:
            text, self.buf = self.buf.decode("utf-8"), b""
        except UnicodeDecodeError:
            return ""
        return text


class StopStrings:
    """Streams text pieces through, stopping before the first stop string.

    Text that could be the start of a stop string is held back until it is clear it is not, so
    nothing of a stop string is ever written; leading whitespace of the response is dropped.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.started = False
        self.stopped = False

    def push(self, piece: str) -> str:
        """Feed ``piece``; returns the text that is safe to show now."""
        if self.stopped:
            return ""
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return text[:cut]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The text still held back at the end of the stream (none after a stop string)."""
        out = "" if self.stopped else self.pending
        self.pending = ""
        return out


def stream_response(model: GPT, style: PromptStyle, instruction: str, input_text: str = "",
                    max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, use_kv_cache: bool = True) -> Iterator[str]:
    """Yield the model's response to ``instruction`` (and ``input_text``) piece by piece, written in
    the prompt ``style``; ends at ``<|endoftext|>`` or where the model starts a new turn."""
    tok = get_tokenizer()
    device = next(model.parameters()).device
    prompt = style.prompt({"instruction": instruction, "input": input_text, "output": ""})
    ids = torch.tensor(tok.encode_ordinary(prompt), device=device)
    dec, stops = StreamDecoder(tok), StopStrings(("<|endoftext|>", *style.stop_markers))
    for nxt in generate_stream(model, ids, max_new_tokens, temperature, top_k, top_p, EOT_ID, use_kv_cache):
        token = int(nxt[0])
        if token == EOT_ID:
            break
        piece = stops.push(dec.push(token))
        if piece:
            yield piece
        if stops.stopped:
            return
    tail = stops.flush()
    if tail:
        yield tail


__all__ = ["StreamDecoder", "StopStrings", "stream_response"]
