"""``gptlab-generate``: load a model and stream a continuation of a prompt to stdout."""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from gptlab.cli import CONFIG_DIR
from gptlab.cli.validation import refuse_bad_input, validate_generate_config
from gptlab.model.generation import generate_stream
from gptlab.model.gpt import GPT
from gptlab.tokenizer import EOT_ID, get_tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(ckpt_path: str | None = None, init_from: str | None = None, adapter_path: str | None = None,
               device: str | torch.device = "cpu") -> GPT:
    """The backbone of a gptlab checkpoint, or pretrained weights, optionally with a LoRA adapter
    merged in; in eval mode on ``device``."""
    if bool(ckpt_path) == bool(init_from):
        raise ValueError("give exactly one of ckpt_path=... or init_from=...")
    if ckpt_path:
        from gptlab.tasks.base import load_task

        model = load_task(ckpt_path).model
    else:
        model = GPT.from_pretrained(init_from)
    from gptlab.model.lora import load_adapter, merge_lora

    if adapter_path:
        load_adapter(model, adapter_path)
    merge_lora(model)  # LoRA from the adapter or the checkpoint folded in: plain matmuls; no-op without
    return model.to(device).eval()


class StreamDecoder:
    """Decode token ids incrementally; holds back bytes until they form complete UTF-8 characters."""

    def __init__(self) -> None:
        self.tok = get_tokenizer()
        self.buf = b""

    def push(self, token_id: int) -> str:
        self.buf += self.tok.decode_single_token_bytes(token_id)
        try:
            text, self.buf = self.buf.decode("utf-8"), b""
        except UnicodeDecodeError:
            return ""
        return text


def run(cfg: DictConfig) -> str:
    """Generate from ``cfg``; prints as it goes when ``cfg.stream``; returns the full text."""
    validate_generate_config(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, device)
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        model = model.to(torch.bfloat16)
    if model.out_head.out_features < model.config.vocab_size:
        raise ValueError("this checkpoint's head is not a language-model head (a classifier?); "
                         "use gptlab-classify instead")
    tok = get_tokenizer()
    ids = torch.tensor(tok.encode(cfg.prompt, allowed_special={"<|endoftext|>"}), device=device)
    out = [cfg.prompt]
    if cfg.stream:
        sys.stdout.write(cfg.prompt)
        sys.stdout.flush()
    dec = StreamDecoder()
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
    text = "".join(out)
    if cfg.stream:
        sys.stdout.write("\n")
    else:
        print(text)
    return text


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    with refuse_bad_input("gptlab-generate"):
        run(cfg)


if __name__ == "__main__":
    main()
