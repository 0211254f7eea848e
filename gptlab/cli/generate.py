"""``gptlab-generate``: load a model and stream a continuation of a prompt to stdout."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from gptlab.cli import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig


def run(cfg: DictConfig) -> str:
    """Generate from ``cfg``; prints as it goes when ``cfg.stream``; returns the full text."""
    import torch  # the heavy imports wait until a model is wanted: --help stays instant

    from gptlab.cli.validation import validate_generate_config
    from gptlab.inference import load_model
    from gptlab.model.generation import generate_stream
    from gptlab.streaming import StreamDecoder

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


main = entry_point("generate", run)

if __name__ == "__main__":
    main()
