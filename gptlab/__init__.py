from gptlab.tokenizer import get_tokenizer
