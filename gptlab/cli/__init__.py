"""Hydra entry points (``gptlab-train``, ``gptlab-generate``, ...)."""

from importlib.resources import files
from pathlib import Path


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
