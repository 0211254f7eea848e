"""Hydra entry points (``gptlab-train``, ``gptlab-generate``, ...)."""

from pathlib import Path

# The config tree lives at the repository root (``conf/``); an editable install finds it here.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
