"""gptlab: build, pretrain and fine-tune GPT-style language models with Lightning and Hydra."""

from gptlab.model.config import GPTConfig
from gptlab.model.generation import generate, generate_stream, sample_next_token
from gptlab.model.gpt import GPT, KVCache
from gptlab.tokenizer import EOT_ID, get_tokenizer
from gptlab.weights import export_hf, load_pretrained

__all__ = ["GPT", "GPTConfig", "KVCache", "generate", "generate_stream", "sample_next_token",
           "get_tokenizer", "EOT_ID", "load_pretrained", "export_hf"]
__version__ = "0.1.0"
