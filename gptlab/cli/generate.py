"""``gptlab-generate``: load a model and stream a continuation of a prompt to stdout."""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from gptlab.cli import CONFIG_DIR
from gptlab.cli.entry import call_hydra, handle_help, require_values, user_errors
from gptlab.inference import load_model
from gptlab.cli.validation import validate_generate_config
from gptlab.model.generation import generate_stream
from gptlab.text_stream import StreamDecoder
from gptlab.tokenizer import EOT_ID


def run(cfg: DictConfig) -> str:
    """Generate from ``cfg``; prints as it goes when ``cfg.stream``; returns the full text."""
    validate_generate_config(cfg)
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="lm", device=cfg.device,
                    precision=cfg.precision)
    model = lm.model
    ids = torch.tensor(lm.tokenizer.encode(cfg.prompt, allowed_special={"<|endoftext|>"}), device=lm.device)
    out = [cfg.prompt]
    if cfg.stream:
        sys.stdout.write(cfg.prompt)
        sys.stdout.flush()
    dec = StreamDecoder(lm.tokenizer)
    for nxt in generate_stream(model, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                               EOT_ID if cfg.stop_at_eos else None, cfg.use_kv_cache):
        token = int(nxt[0])
        if cfg.stop_at_eos and token == EOT_ID:
            break
        piece = dec.push(token)
        out.append(piece)
        if cfg.stream and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = dec.flush()
    out.append(tail)
    if cfg.stream and tail:
        sys.stdout.write(tail)
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
