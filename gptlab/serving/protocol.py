"""The OpenAI HTTP API's requests and answers, for one served gptlab model.

A request body (already parsed JSON) becomes a :class:`GenerationRequest` (token ids, sampling,
stops), or an :class:`APIError` whose :meth:`APIError.body` is OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``; each message names the field and what is
allowed. Chat messages are written in the model's prompt style (:func:`render_chat`). Nothing in a
request can name a file: every field is a value.
"""

from __future__ import annotations

import math
import numbers
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import tiktoken

from gptlab.data.prompt_styles import PromptStyle
from gptlab.model.continuous import Sampling
from gptlab.tokenizer import EOT_TOKEN

MAX_STOPS = 4  # as OpenAI: at most four stop sequences
UNSUPPORTED = {  # field -> its value that means "off" (anything else is refused, not silently ignored)
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "best_of": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """An answer other than 200: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    """A 400 about ``param``."""
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ModelCard:
    """What requests are checked against: the served model's name, context and defaults."""

    name: str
    context_length: int
    style: PromptStyle
    tokenizer: tiktoken.Encoding = field(repr=False)
    default_max_tokens: int = 256
    max_n: int = 16
    created: int = field(default_factory=lambda: int(time.time()))

    def listing(self) -> dict[str, Any]:
        """This model as an entry of ``GET /v1/models``."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gptlab",
                "context_length": self.context_length, "prompt_style": self.style.name,
                "max_batch_size": self.max_n}


@dataclass
class GenerationRequest:
    """One request, checked: ``prompts`` (token ids each; a completion may send several), ``n``
    choices per prompt, ``max_tokens`` per choice, sampling, stop strings."""

    kind: str  # "completion" | "chat"
    prompts: list[list[int]]
    n: int
    max_tokens: int
    sampling: Sampling
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    strip_leading: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def seed_of(self, choice: int) -> int | None:
        """Choice ``i`` samples with ``seed + i``: reproducible, and the ``n`` choices differ."""
        return None if self.sampling.seed is None else self.sampling.seed + choice

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice // self.n]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ----------------------------------------------------------------------------- field checks
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _get(body: Mapping[str, Any], name: str, ok: Callable[[Any], bool], allowed: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not ok(value):
        raise bad(name, f"{name}={value!r}: expected {allowed}")
    return value


def _common(body: Any, card: ModelCard) -> dict[str, Any]:
    """The fields completions and chat share, checked."""
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    for name, off in UNSUPPORTED.items():
        if name in body and not any(body[name] == o and type(body[name]) is type(o) for o in off):
            raise bad(name, f"{name}={body[name]!r} is not supported by gptlab-serve", code="unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model={model!r}: expected a string")
    if model not in (None, card.name):
        raise APIError(404, f"the model {model!r} does not exist; this server serves {card.name!r} "
                            "(GET /v1/models lists it)", param="model", code="model_not_found")
    temperature = _get(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]", 1.0)
    top_p = _get(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    top_k = _get(body, "top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)")
    seed = _get(body, "seed", _is_int, "an integer")
    n = _get(body, "n", lambda v: _is_int(v) and 1 <= v <= card.max_n,
             f"an integer in [1, {card.max_n}] (the server's max_batch_size)", 1)
    stream = _get(body, "stream", lambda v: isinstance(v, bool), "true or false", False)
    options = _get(body, "stream_options", lambda v: isinstance(v, dict) and
                   isinstance(v.get("include_usage", False), bool), 'an object like {"include_usage": true}', {})
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not (isinstance(stops, list) and len(stops) <= MAX_STOPS
                                  and all(isinstance(s, str) and s for s in stops)):
        raise bad("stop", f"stop={stop!r}: expected a non-empty string or a list of at most {MAX_STOPS} of them")
    return {"sampling": Sampling(float(temperature), top_k, top_p, seed), "n": n, "stream": stream,
            "include_usage": bool(options.get("include_usage", False)), "stops": tuple(stops or ())}


def _max_tokens(body: Mapping[str, Any], card: ModelCard, prompts: Sequence[Sequence[int]], names: Sequence[str],
                prompt_param: str) -> int:
    """``max_tokens`` (or its newer name) checked against the context; default: the server's, up to
    what the context leaves."""
    longest = max(len(p) for p in prompts)
    if longest >= card.context_length:
        raise bad(prompt_param,
                  f"the prompt is {longest} tokens; the model's context is {card.context_length} tokens, so it "
                  "leaves no room for an answer", code="context_length_exceeded")
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not (_is_int(value) and value >= 1):
            raise bad(name, f"{name}={value!r}: expected an integer >= 1")
        if longest + value > card.context_length:
            raise bad(name, f"the prompt ({longest} tokens) + {name}={value} is {longest + value} tokens, beyond the "
                            f"model's context of {card.context_length} tokens", code="context_length_exceeded")
        return value
    return min(card.default_max_tokens, card.context_length - longest)


def _token_ids(value: list, card: ModelCard) -> list[int]:
    if not value or not all(_is_int(t) and 0 <= t < card.tokenizer.n_vocab for t in value):
        raise bad("prompt", f"a prompt of token ids must be a non-empty list of integers in [0, {card.tokenizer.n_vocab})")
    return [int(t) for t in value]


def _encode(text: str, card: ModelCard) -> list[int]:
    # "<|endoftext|>" in a prompt is the document separator the model was trained with, not an error
    return card.tokenizer.encode(text, allowed_special={EOT_TOKEN})


# ----------------------------------------------------------------------------- completions
def parse_completion(body: Any, card: ModelCard) -> GenerationRequest:
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids, or a
    list of such lists; the text is continued as is (no template)."""
    common = _common(body, card)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [_encode(prompt, card)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [_encode(p, card) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [_token_ids(prompt, card)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [_token_ids(p, card) for p in prompt]
    else:
        raise bad("prompt", f"prompt={prompt!r}: expected a string, a list of strings or a list of token ids")
    if any(not p for p in prompts):
        raise bad("prompt", "an empty prompt gives the model nothing to continue")
    if len(prompts) * common["n"] > card.max_n:
        raise bad("n", f"{len(prompts)} prompts x n={common['n']} choices exceeds the server's max_batch_size="
                       f"{card.max_n}")
    max_tokens = _max_tokens(body, card, prompts, ["max_tokens"], "prompt")
    return GenerationRequest("completion", prompts, max_tokens=max_tokens, strip_leading=False, **common)


# ----------------------------------------------------------------------------- chat
ROLES = ("system", "developer", "user", "assistant")


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{i}].content", f"messages[{i}].content: expected a string or a list of "
                                        '{"type": "text", "text": ...} parts (gptlab models read text only)')


def render_chat(messages: Any, style: PromptStyle) -> str:
    """The prompt for a conversation in ``style``: system text first (followed by a blank line),
    then each finished exchange as one example in the style (instruction + response), then the last
    user message as a prompt with the response header. Consecutive user messages are joined by a
    newline. Raises :class:`APIError` (400) naming the bad message."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"messages={messages!r}: expected a non-empty list of {{role, content}} objects")
    system: list[str] = []
    turns: list[list[str | None]] = []  # [user text, assistant text or None]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise bad(f"messages[{i}].role", f"messages[{i}].role={role!r}: expected one of {list(ROLES)}")
        text, role = _content(m, i), m["role"]
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            if turns and turns[-1][1] is None:
                turns[-1][0] = f"{turns[-1][0]}\n{text}"
            else:
                turns.append([text, None])
        elif not turns or turns[-1][1] is not None:
            raise bad(f"messages[{i}]", f"messages[{i}]: an assistant message must answer a user message")
        else:
            turns[-1][1] = text
    if not turns or turns[-1][1] is not None:
        raise bad("messages", "the last message must be from the user (the model answers it)")
    done = "".join(style.full_text({"instruction": u, "input": "", "output": a}) + "\n\n" for u, a in turns[:-1])
    head = "\n\n".join(system) + "\n\n" if system else ""
    return head + done + style.prompt({"instruction": turns[-1][0], "input": ""})


def parse_chat(body: Any, card: ModelCard) -> GenerationRequest:
    """``POST /v1/chat/completions``: the messages in the model's prompt style; the answer stops
    where the model starts a new turn (the style's markers) or at any ``stop`` string."""
    common = _common(body, card)
    prompts = [_encode(render_chat(body.get("messages"), card.style), card)]
    max_tokens = _max_tokens(body, card, prompts, ["max_completion_tokens", "max_tokens"], "messages")
    common["stops"] = tuple(dict.fromkeys((*common["stops"], *card.style.stop_markers)))
    return GenerationRequest("chat", prompts, max_tokens=max_tokens, strip_leading=True, **common)


# ----------------------------------------------------------------------------- answers
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_body(req: GenerationRequest, card: ModelCard, texts: Sequence[str], reasons: Sequence[str],
                  completion_tokens: int) -> dict[str, Any]:
    """The whole answer of a request that did not stream."""
    if req.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        head = {"id": f"chatcmpl-{req.id}", "object": "chat.completion"}
    else:
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        head = {"id": f"cmpl-{req.id}", "object": "text_completion"}
    return {**head, "created": req.created, "model": card.name, "choices": choices,
            "usage": usage(req.prompt_tokens, completion_tokens)}


def chunk_body(req: GenerationRequest, card: ModelCard, index: int, text: str | None, reason: str | None,
               first: bool = False) -> dict[str, Any]:
    """One server-sent event of a streamed answer: new text of choice ``index`` and/or its finish."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
        head = {"id": f"chatcmpl-{req.id}", "object": "chat.completion.chunk"}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        head = {"id": f"cmpl-{req.id}", "object": "text_completion"}
    return {**head, "created": req.created, "model": card.name, "choices": [choice]}


__all__ = ["APIError", "ModelCard", "GenerationRequest", "parse_completion", "parse_chat", "render_chat",
           "response_body", "chunk_body", "usage"]
