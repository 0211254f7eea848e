"""``gptlab-generate``: load a model and stream a continuation of a prompt to stdout."""

from __future__ import annotations

import codecs
import sys
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from gptlab.cli import CONFIG_DIR
from gptlab.cli.entry import call_hydra, handle_help, require_values, user_errors
from gptlab.inference import load_model
from gptlab.cli.validation import validate_generate_config
from gptlab.model.generation import generate_stream
from gptlab.tokenizer import get_tokenizer


class StreamDecoder:
    """Decode token ids incrementally with ``tokenizer`` (None = GPT-2's): bytes of a character split
    over tokens are held back until it is complete; bytes that can never form one become U+FFFD, as
    ``tokenizer.decode`` of the whole sequence gives them (a byte-level vocabulary samples such bytes)."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tok = tokenizer or get_tokenizer()
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.tok.decode_single_token_bytes(token_id))

    def flush(self) -> str:
        """What is left of a character cut short at the end (U+FFFD), else ``""``."""
        return self.utf8.decode(b"", final=True)


def run(cfg: DictConfig) -> str:
    """Generate from ``cfg``; prints as it goes when ``cfg.stream``; returns the full text."""
    validate_generate_config(cfg)
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="lm", device=cfg.device,
                    precision=cfg.precision, tokenizer=cfg.get("tokenizer"))
    eot = lm.tokenizer.eot_token
    model = lm.model
    ids = torch.tensor(lm.tokenizer.encode(cfg.prompt, allowed_special={"<|endoftext|>"}), device=lm.device)
    out = [cfg.prompt]
    if cfg.stream:
        sys.stdout.write(cfg.prompt)
        sys.stdout.flush()
    dec = StreamDecoder(lm.tokenizer)
    for nxt in generate_stream(model, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                               eot if cfg.stop_at_eos else None, cfg.use_kv_cache):
        token = int(nxt[0])
        if cfg.stop_at_eos and token == eot:
            break
        piece = dec.push(token)
        out.append(piece)
        if cfg.stream and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    out.append(dec.flush())
    if cfg.stream:
        sys.stdout.write(out[-1])
    text = "".join(out)
    if cfg.stream:
        sys.stdout.write("\n")
    else:
        print(text)
    return text


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    require_values(cfg, "generate", "gptlab-generate")
    with user_errors("gptlab-generate"):
        run(cfg)


def main() -> None:
    """Console entry: this tool's ``--help``; everything else through Hydra."""
    handle_help("generate", "gptlab-generate")
    call_hydra(_hydra_main, "generate", "gptlab-generate")


if __name__ == "__main__":
    main()
