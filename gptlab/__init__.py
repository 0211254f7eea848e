"""gptlab: build, pretrain and fine-tune GPT-style language models with Lightning and Hydra.

The public API (``from gptlab import GPT, GPTConfig, generate, get_tokenizer, load_pretrained``) is
imported on first use (PEP 562 module ``__getattr__``), so ``import gptlab`` and the command-line
tools' ``--help`` cost no torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "GPTConfig": "gptlab.model.config",
    "generate": "gptlab.model.generation",
    "generate_stream": "gptlab.model.generation",
    "sample_next_token": "gptlab.model.generation",
    "GPT": "gptlab.model.gpt",
    "KVCache": "gptlab.model.gpt",
    "EOT_ID": "gptlab.tokenizer",
    "get_tokenizer": "gptlab.tokenizer",
    "export_hf": "gptlab.weights",
    "load_pretrained": "gptlab.weights",
}
"""Public name -> the module that defines it."""

if TYPE_CHECKING:
    from gptlab.model.config import GPTConfig
    from gptlab.model.generation import generate, generate_stream, sample_next_token
    from gptlab.model.gpt import GPT, KVCache
    from gptlab.tokenizer import EOT_ID, get_tokenizer
    from gptlab.weights import export_hf, load_pretrained

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "generate_stream", "sample_next_token",
           "get_tokenizer", "EOT_ID", "load_pretrained", "export_hf"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
