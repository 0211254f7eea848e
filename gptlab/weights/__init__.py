"""Checkpoint formats, beside ``data/``: GPT-2 weights in (OpenAI's Hugging Face layout, the book's
``GPTModel`` state dicts, gptlab state dicts) and out (Hugging Face folders, book state dicts), and
the one cached, checksummed downloader. Files are read with ``safetensors`` or
``torch.load(weights_only=True)``: nothing in a file can run code, and a file that lies (a malformed
safetensors header, NaN or infinite weights) is refused, naming it (:class:`InvalidWeightsError`)."""

from gptlab.weights.checks import InvalidWeightsError, NonFiniteWeightsError, refuse_non_finite
from gptlab.weights.download import DownloadError, fetch_hf_model
from gptlab.weights.export import export_hf, plain_state_dict, save_book_state_dict, to_book_state_dict, to_hf_state_dict
from gptlab.weights.formats import HF_REPOS, config_from_hf, config_to_hf, pretrained_names, resolve_pretrained_name
from gptlab.weights.loading import TrainingCheckpointError, is_training_checkpoint, load_from_reader, load_pretrained
from gptlab.weights.readers import MappingReader, SafetensorsReader, UnsafeCheckpointError, safe_torch_load

__all__ = ["InvalidWeightsError", "NonFiniteWeightsError", "refuse_non_finite", "DownloadError", "fetch_hf_model", "export_hf", "plain_state_dict", "save_book_state_dict",
           "to_book_state_dict", "to_hf_state_dict", "HF_REPOS", "config_from_hf", "config_to_hf",
           "pretrained_names", "resolve_pretrained_name", "TrainingCheckpointError", "is_training_checkpoint",
           "load_from_reader", "load_pretrained", "MappingReader", "SafetensorsReader", "UnsafeCheckpointError",
           "safe_torch_load"]
