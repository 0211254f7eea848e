from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache"]
