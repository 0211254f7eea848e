"""Hydra entry points (``gptlab-train``, ``gptlab-generate``, ...)."""

from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

from gptlab.tokenizer import get_tokenizer


def config_dir() -> str:
    """The config tree the entry points compose from.

    The repository's top-level ``conf/`` is the source of truth: a source checkout (an editable
    install, or ``PYTHONPATH`` pointing at it) reads it in place, so editing a YAML there takes effect.
    A regular install (``pip install .``) carries the same tree inside the package as ``gptlab.conf``
    (``pyproject.toml`` maps ``conf/`` there), so nothing is copied by hand.
    """
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    return str(files("gptlab.conf"))


CONFIG_DIR = config_dir()


def register_resolvers() -> None:
    """The config interpolations that read the run's tokenizer (registered once per process, before
    any config is composed): ``${gptlab.vocab_size:${tokenizer}}`` (its ids: ``model.vocab_size``
    follows the tokenizer) and ``${gptlab.eot_id:${tokenizer}}`` (its ``<|endoftext|>`` id)."""
    if not OmegaConf.has_resolver("gptlab.vocab_size"):
        OmegaConf.register_new_resolver("gptlab.vocab_size", lambda name: get_tokenizer(name).n_vocab)
    if not OmegaConf.has_resolver("gptlab.eot_id"):
        OmegaConf.register_new_resolver("gptlab.eot_id", lambda name: get_tokenizer(name).eot_token)


register_resolvers()
