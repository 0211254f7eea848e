"""gptlab: build, pretrain and fine-tune GPT-style language models with Lightning and Hydra."""

from gptlab.model.config import GPTConfig
from gptlab.model.generation import generate, generate_stream, sample_next_token
from gptlab.model.gpt import GPT, KVCache
from gptlab.tokenizer import EOT_ID, get_tokenizer

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "generate_stream", "sample_next_token",
           "get_tokenizer", "EOT_ID"]
__version__ = "0.1.0"
