"""Prompt styles: how an instruction entry (``instruction``, ``input``) is written as a prompt, where
the response starts and where a generated response ends; and left-padding prompts for batched
generation. Shared by the data modules, the tasks' test-stage generation, the inference tools and
the judge (nothing here needs Lightning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from gptlab.tokenizer import EOT_ID

@dataclass(frozen=True)
class PromptStyle:
    """How an entry is written as text.

    ``format_input(entry)`` is the instruction (+ input) part, ``response_header`` is what separates
    it from the response (the prompt for generation is their concatenation), ``prompt_marker`` is a
    string every prompt holds before the header, and ``stop_markers`` are strings that start a new
    turn: a generated response is cut at the first of them.
    """

    name: str
    format_input: Callable[[Mapping[str, str]], str]
    response_header: str
    prompt_marker: str
    stop_markers: tuple[str, ...]

    def prompt(self, entry: Mapping[str, str]) -> str:
        """Everything the model is given before its response."""
        return self.format_input(entry) + self.response_header

    def full_text(self, entry: Mapping[str, str]) -> str:
        """Prompt and reference response: one training example."""
        return self.prompt(entry) + entry["output"]


def _alpaca_input(entry: Mapping[str, str]) -> str:
    text = ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    return text + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else "")


def _phi3_input(entry: Mapping[str, str]) -> str:
    return f"<|user|>\n{entry['instruction']}" + (f"\n{entry['input']}" if entry.get("input") else "")


def _raw_input(entry: Mapping[str, str]) -> str:
    return entry["instruction"] + (f"\n{entry['input']}" if entry.get("input") else "")


# Adding a style is one entry here (and then ``data.prompt_style=<name>``).
PROMPT_STYLES: dict[str, PromptStyle] = {
    # the book's chapter 7 (Stanford Alpaca's template)
    "alpaca": PromptStyle("alpaca", _alpaca_input, "\n\n### Response:\n", "### Instruction:", ("###",)),
    # the book's exercise 7.1 in Phi-3's own spelling (the book's solution writes "<|assistant|>:")
    "phi3": PromptStyle("phi3", _phi3_input, "\n<|assistant|>\n", "<|user|>", ("<|user|>", "<|assistant|>", "<|end|>")),
    # the instruction verbatim, no template: for prompts that carry their own turn markers
    # (Anthropic HH: "\n\nHuman: ...\n\nAssistant:")
    "raw": PromptStyle("raw", _raw_input, "", "", ()),
}


def get_prompt_style(name: str | PromptStyle) -> PromptStyle:
    """The registered :class:`PromptStyle` called ``name``."""
    if isinstance(name, PromptStyle):
        return name
    if name not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {name!r}; valid choices: {sorted(PROMPT_STYLES)}")
    return PROMPT_STYLES[name]


def format_input(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """The instruction (+ input) of ``entry`` in ``style``, without the response header (the book's
    ``format_input``)."""
    return get_prompt_style(style).format_input(entry)


def format_prompt(entry: Mapping[str, str], style: str | PromptStyle = "alpaca") -> str:
    """The generation prompt of ``entry``: instruction (+ input) and the response header."""
    return get_prompt_style(style).prompt(entry)


def extract_response(text: str, style: str | PromptStyle = "alpaca") -> str:
    """The model's answer inside ``text`` (a prompt + generation, or a generation alone).

    Drops everything up to the first response header when a prompt (or nothing) precedes it, then
    cuts at ``<|endoftext|>`` and at the first stop marker (a new ``###`` section, ``<|user|>``,
    ...) and strips surrounding whitespace.
    """
    st = get_prompt_style(style)
    header = st.response_header.strip()
    at = text.find(header) if header else -1
    if at >= 0 and (st.prompt_marker in text[:at] or not text[:at].strip()):
        text = text[at + len(header):]
    for stop in ("<|endoftext|>", *st.stop_markers):
        text = text.split(stop, 1)[0]
    return text.strip()


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int = EOT_ID,
             max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (B, T) ``ids`` and ``attention_mask`` (1 = real), for batched
    generation. ``max_length`` keeps only the last ``max_length`` ids of each sequence."""
    rows = [torch.as_tensor(list(s)[-max_length:] if max_length else list(s), dtype=torch.long) for s in seqs]
    # pad_sequence pads on the right: flip, pad, flip back
    ids = pad_sequence([r.flip(0) for r in rows], batch_first=True, padding_value=pad_id).flip(1)
    lengths = torch.tensor([len(r) for r in rows])[:, None]
    T = ids.size(1)
    mask = (torch.arange(T)[None, :] >= T - lengths).long()
    return ids, mask


__all__ = ["PromptStyle", "PROMPT_STYLES", "get_prompt_style", "format_input", "format_prompt", "extract_response",
           "left_pad"]
