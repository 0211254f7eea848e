"""``gptlab-chat``: wrap instructions in the model's prompt style and stream its answers.

    gptlab-chat ckpt_path=outputs/.../checkpoints/last.ckpt instruction="Name a primary color."
    printf 'Name a primary color.\\nWhat is 2 + 2?\\n' | gptlab-chat ckpt_path=...

Without ``instruction=`` it reads one instruction per line from stdin (``instruction<TAB>input``
gives an input too) and answers each, until end of input. A response ends at ``<|endoftext|>`` or
where the model starts a new turn (``###`` in the Alpaca style, ``<|user|>`` in Phi-3's).
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TextIO

import hydra
import torch
from omegaconf import DictConfig

from gptlab.cli import CONFIG_DIR
from gptlab.cli.entry import call_hydra, handle_help, require_values, user_errors
from gptlab.cli.generate import StreamDecoder
from gptlab.cli.validation import validate_chat_config
from gptlab.data.prompt_styles import PromptStyle, get_prompt_style
from gptlab.inference import LoadedModel, load_model
from gptlab.model.generation import generate_stream
from gptlab.model.gpt import GPT
from gptlab.tokenizer import EOT_ID, get_tokenizer


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
        out = "" if self.stopped else self.pending
        self.pending = ""
        return out


def stream_response(model: GPT, style: PromptStyle, instruction: str, input_text: str = "",
                    max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, use_kv_cache: bool = True) -> Iterator[str]:
    """Yield the model's response to ``instruction`` (and ``input_text``) piece by piece."""
    tok = get_tokenizer()
    device = next(model.parameters()).device
    prompt = style.prompt({"instruction": instruction, "input": input_text, "output": ""})
    ids = torch.tensor(tok.encode_ordinary(prompt), device=device)
    dec, stops = StreamDecoder(), StopStrings(("<|endoftext|>", *style.stop_markers))
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


def answer(model: GPT, style: PromptStyle, cfg: DictConfig, instruction: str, input_text: str,
           out: TextIO) -> str:
    """Stream one response to ``out``; returns it (stripped)."""
    pieces = []
    for piece in stream_response(model, style, instruction, input_text, cfg.max_new_tokens, cfg.temperature,
                                 cfg.top_k, cfg.top_p, cfg.use_kv_cache):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def run(cfg: DictConfig, stdin: TextIO | None = None, out: TextIO | None = None) -> list[str]:
    """Answer ``cfg.instruction``, or every line of ``stdin``; returns the responses."""
    validate_chat_config(cfg)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="lm", device=cfg.device,
                    precision=cfg.precision)
    model = lm.model
    style = get_prompt_style(cfg.prompt_style or lm.prompt_style or "alpaca")
    if cfg.instruction is not None:
        return [answer(model, style, cfg, cfg.instruction, cfg.input or "", out)]
    interactive = stdin.isatty()
    if interactive:
        enable_line_editing()
        sys.stderr.write(banner(lm, style.name, cfg) + "\n")
    responses = []
    while True:
        line = read_line(stdin, interactive)
        if line is None:  # end of input
            return responses
        instruction, _, input_text = line.rstrip("\r\n").partition("\t")
        if not instruction.strip():
            continue
        responses.append(answer(model, style, cfg, instruction.strip(), input_text.strip(), out))


def banner(lm: LoadedModel, style: str, cfg: DictConfig) -> str:
    """One line: the model, its size and device, the prompt style and the sampling settings."""
    sampling = "greedy" if not cfg.temperature else (
        f"temperature {cfg.temperature}" + (f", top-k {cfg.top_k}" if cfg.top_k else "")
        + (f", top-p {cfg.top_p}" if cfg.top_p else ""))
    return (f"gptlab-chat: {lm.source} ({lm.model.num_params() / 1e6:.1f}M parameters, {lm.device.type}), "
            f"prompt style {style}, {sampling}, up to {cfg.max_new_tokens} new tokens. "
            f"Up/Down for history, Ctrl-D to quit.")


def enable_line_editing() -> None:
    """Arrow keys, history and Ctrl-R for :func:`input` (the standard library's ``readline``; absent on
    some platforms, where plain input still works)."""
    try:
        import readline  # noqa: F401  - importing it is what turns line editing on for input()
    except ImportError:
        pass


def read_line(stdin: TextIO, interactive: bool) -> str | None:
    """The next instruction line; None at end of input. A terminal gets a prompt with line editing."""
    if interactive and stdin is sys.stdin:
        try:
            return input("> ")
        except EOFError:
            sys.stderr.write("\n")
            return None
    line = stdin.readline()
    return line or None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="chat")
def _hydra_main(cfg: DictConfig) -> None:
    require_values(cfg, "chat", "gptlab-chat")
    try:
        with user_errors("gptlab-chat"):
            run(cfg)
    except KeyboardInterrupt:
        sys.stderr.write("\n")


def main() -> None:
    """Console entry: this tool's ``--help``; everything else through Hydra."""
    handle_help("chat", "gptlab-chat")
    call_hydra(_hydra_main, "chat", "gptlab-chat")


if __name__ == "__main__":
    main()
