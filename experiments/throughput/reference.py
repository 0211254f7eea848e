"""The baseline the throughput benchmark compares to: the book's plain GPT-2 (``GPTModel``).

Separate W_query/W_key/W_value, attention scores materialised and masked with a registered
(context x context) buffer; ``run.py`` trains it in fp32 with unfused AdamW, no compile, logits
returned to the loop. The model itself is the package's one copy of the book's chapter-4 code,
:mod:`gptlab.weights.book_reference` (the parity tests use the same class).
"""

from gptlab.weights.book_reference import GPTModel

__all__ = ["GPTModel"]
