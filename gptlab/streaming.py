"""Text as a model writes it: token ids decoded piece by piece without splitting a UTF-8 character
(:class:`StreamDecoder`), held back where a stop string may begin (:class:`StopStrings`), and an
instruction-tuned model's response streamed in its prompt style (:func:`stream_response`). What
``gptlab-generate`` and ``gptlab-chat`` print, and what a server streams."""

from __future__ import annotations

import codecs

from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from gptlab.model.generation import generate_stream
from gptlab.model.gpt import GPT
from gptlab.tokenizer import get_tokenizer

if TYPE_CHECKING:
    import tiktoken

    from gptlab.data.prompt_styles import PromptStyle


class StreamDecoder:
    """Decode token ids incrementally. A GPT-2 token may hold part of a UTF-8 character: its bytes
    are held back until the character is complete; bytes that can never form one become U+FFFD
    (a model can emit any byte sequence), so the text never stalls."""

    def __init__(self, tokenizer: tiktoken.Encoding | None = None) -> None:
        self.tok = tokenizer or get_tokenizer()
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` completes (may be empty)."""
        return self.utf8.decode(self.tok.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """Bytes still held at the end (an incomplete character becomes U+FFFD)."""
        return self.utf8.decode(b"", final=True)


class StopStrings:
    """Streams text pieces through, stopping before the first stop string.

    Text that could be the start of a stop string is held back until it is clear it is not, so
    nothing of a stop string is ever written. ``strip_leading``: drop whitespace before the first
    visible character (a chat response), or keep the text as generated (a completion).
    """

    def __init__(self, stops: Iterable[str], strip_leading: bool = True):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.started = not strip_leading
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
        out = "" if self.stopped else self.pending
        self.pending = ""
        return out


def stream_response(model: GPT, style: PromptStyle, instruction: str, input_text: str = "",
                    max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, use_kv_cache: bool = True,
                    tokenizer: tiktoken.Encoding | None = None) -> Iterator[str]:
    """Yield the model's response to ``instruction`` (and ``input_text``) piece by piece, written in
    the prompt ``style``; ends at ``<|endoftext|>`` or where the model starts a new turn.
    ``tokenizer``: the model's (None = GPT-2's)."""
    tok = tokenizer or get_tokenizer()
    eot = tok.eot_token
    device = next(model.parameters()).device
    prompt = style.prompt({"instruction": instruction, "input": input_text, "output": ""})
    ids = torch.tensor(tok.encode_ordinary(prompt), device=device)
    dec, stops = StreamDecoder(tok), StopStrings(("<|endoftext|>", *style.stop_markers))
    for nxt in generate_stream(model, ids, max_new_tokens, temperature, top_k, top_p, eot, use_kv_cache):
        token = int(nxt[0])
        if token == eot:
            break
        piece = stops.push(dec.push(token))
        if piece:
            yield piece
        if stops.stopped:
            return
    tail = stops.push(dec.flush()) + stops.flush()  # bytes of an unfinished character, held text
    if tail:
        yield tail


__all__ = ["StreamDecoder", "StopStrings", "stream_response"]
