"""``gptlab-serve``: serve a model over the OpenAI HTTP API, with a chat page at ``/``.

    gptlab-serve ckpt_path=outputs/ch07_instruct/runs/<time>/checkpoints/last.ckpt model_name=sft
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "sft", "messages": [{"role": "user", "content": "Name a primary color."}]}'

The model comes through the one inference loader; the server itself is :mod:`gptlab.serving`.
SIGTERM or Ctrl-C: new requests are refused, running ones finish (``drain_timeout``), then it stops.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.cli import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig

API_KEY_ENV = "GPTLAB_API_KEY"


def model_name(cfg: DictConfig) -> str:
    """What clients call the model: ``model_name``, else ``init_from``'s name, else the file's stem."""
    if cfg.model_name:
        return str(cfg.model_name)
    source = str(cfg.init_from or cfg.ckpt_path)
    path = Path(source)
    return path.stem if path.suffix else path.name or source


def run(cfg: DictConfig) -> None:
    """Load the model and serve until SIGTERM/SIGINT."""
    from gptlab.cli.validation import validate_serve_config  # heavy imports here: --help stays instant
    from gptlab.inference import load_model
    from gptlab.serving.app import build_server, require_server_libraries

    validate_serve_config(cfg)
    require_server_libraries()  # before the (slow) model load: the install hint comes at once
    lm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="lm", device=cfg.device,
                    precision=cfg.precision, tokenizer=cfg.get("tokenizer"))
    name = model_name(cfg)
    server = build_server(lm, name, cfg.prompt_style, cfg.host, cfg.port, cfg.api_key or os.environ.get(API_KEY_ENV) or None,
                          cfg.max_batch_size, cfg.batch_window_ms / 1000, cfg.max_queue, cfg.max_tokens,
                          cfg.max_body_bytes, cfg.drain_timeout, cfg.seed, cfg.log_level)
    print(f"gptlab-serve: {name!r} from {lm.source} ({lm.model.num_params() / 1e6:.1f}M parameters, {lm.device.type}, "
          f"context {lm.model.config.context_length}), up to {server.engine.max_batch_size} sequences per batch", file=sys.stderr)
    print(f"gptlab-serve: listening on {server.url} (chat page: {server.url}/, API: {server.url}/v1); "
          "Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
    server.run()
    print("gptlab-serve: stopped", file=sys.stderr)


main = entry_point("serve", run)

if __name__ == "__main__":
    main()
