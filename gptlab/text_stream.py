"""Generated tokens into text as they come: whole UTF-8 characters only, cut before a stop string.

Shared by the streaming tools (``gptlab-generate``, ``gptlab-chat``) and the server, which all show
text while the model is still generating.
"""

from __future__ import annotations

import codecs
from typing import Iterable

import tiktoken

from gptlab.tokenizer import get_tokenizer


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


__all__ = ["StreamDecoder", "StopStrings"]
