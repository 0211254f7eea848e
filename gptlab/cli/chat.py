"""``gptlab-chat``: wrap instructions in the model's prompt style and stream its answers.

    gptlab-chat ckpt_path=outputs/.../checkpoints/last.ckpt instruction="Name a primary color."
    printf 'Name a primary color.\\nWhat is 2 + 2?\\n' | gptlab-chat ckpt_path=...

Without ``instruction=`` it reads one instruction per line from stdin (``instruction<TAB>input``
gives an input too) and answers each, until end of input. A response ends at ``<|endoftext|>`` or
where the model starts a new turn (``###`` in the Alpaca style, ``<|user|>`` in Phi-3's).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

from gptlab.cli import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from gptlab.data.prompt_styles import PromptStyle
    from gptlab.inference import LoadedModel
    from gptlab.model.gpt import GPT


def answer(model: GPT, style: PromptStyle, cfg: DictConfig, instruction: str, input_text: str,
           out: TextIO, tokenizer: Any = None) -> str:
    """Stream one response to ``out`` (``tokenizer``: the model's; None = GPT-2's); returns it (stripped)."""
    from gptlab.streaming import stream_response

    pieces = []
    for piece in stream_response(model, style, instruction, input_text, cfg.max_new_tokens, cfg.temperature,
                                 cfg.top_k, cfg.top_p, cfg.use_kv_cache, tokenizer):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def run(cfg: DictConfig, stdin: TextIO | None = None, out: TextIO | None = None) -> list[str]:
    """Answer ``cfg.instruction``, or every line of ``stdin``; returns the responses."""
    import torch  # the heavy imports wait until a model is wanted: --help stays instant

    from gptlab.cli.validation import validate_chat_config
    from gptlab.data.prompt_styles import get_prompt_style
    from gptlab.inference import load_model

    validate_chat_config(cfg)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="lm", device=cfg.device,
                    precision=cfg.precision, tokenizer=cfg.get("tokenizer"))
    model = lm.model
    style = get_prompt_style(cfg.prompt_style or lm.prompt_style or "alpaca")
    if cfg.instruction is not None:
        return [answer(model, style, cfg, cfg.instruction, cfg.input or "", out, lm.tokenizer)]
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
        responses.append(answer(model, style, cfg, instruction.strip(), input_text.strip(), out, lm.tokenizer))


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


def chat(cfg: DictConfig) -> list[str]:
    """:func:`run` from the command line: Ctrl-C ends the conversation quietly."""
    try:
        return run(cfg)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return []


main = entry_point("chat", chat)

if __name__ == "__main__":
    main()
