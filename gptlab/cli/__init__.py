"""Hydra entry points (``gptlab-train``, ``gptlab-generate``, ...)."""

from importlib.resources import files
from pathlib import Path

from hydra.core.config_store import ConfigStore

from gptlab.model.config import PRESETS, GPTConfig


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


def register_model_presets() -> None:
    """Every :class:`~gptlab.model.config.GPTConfig` preset as the config ``model/preset/<name>``, its
    fields those of ``GPTConfig.from_name(name)``: ``conf/model/<name>.yaml`` takes it as its defaults
    and states only what differs, so a preset's numbers are written once (``PRESETS``) and every
    field is still a key of the composed ``model`` node (``model.n_layers=2`` works)."""
    store = ConfigStore.instance()
    for name in PRESETS:
        store.store(group="model/preset", name=name, node=GPTConfig.from_name(name).to_dict())


register_model_presets()
