"""Shared fixtures: seeds reset per test, tiny models, the config directory."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

from gptlab.config_tree import register_model_presets
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT

register_model_presets()  # the model presets conf/model/*.yaml compose from

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A real ``tmpfs`` of ``size`` (``"1m"``) mounted at ``where`` for the block (full and read-only
    disk tests); the test is skipped, saying why, where this machine does not allow mounting."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here: cannot make a small file system")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.strip() or 'not permitted'}); "
                    "the injected-error tests cover this case")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig.from_name("gpt2-tiny")


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    return GPT(tiny_config).eval()


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a gptlab console entry point (``python -m gptlab.cli.X ...``) in a subprocess, to its end
    (no time limit: a loaded machine is slow, not wrong)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True)


@pytest.fixture
def run_entry(monkeypatch, capsys):
    """Run a console entry point in this process: ``run_entry(main, "gptlab-x", *args)`` ->
    ``(exit status, stdout, stderr)``. Much faster than a subprocess (no imports to redo)."""
    from hydra.core.global_hydra import GlobalHydra

    def run(main, prog: str, *args: str) -> tuple[int, str, str]:
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", [prog, *args])
        capsys.readouterr()
        # Hydra's job logging points the root logger at this test's captured stderr: put the
        # handlers back after the run, so a later test's log line is not written to a closed stream
        handlers, level = logging.root.handlers[:], logging.root.level
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
            logging.root.handlers[:] = handlers
            logging.root.setLevel(level)
        out, err = capsys.readouterr()
        return code, out, err
    return run


# ----------------------------------------------------------------------------- preference data
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
NOUNS = ("car", "house", "dog", "cat", "tree", "book", "chair", "table", "phone", "river", "bird", "shoe",
         "lamp", "boat", "cup")


def synthetic_pairs() -> list[dict[str, str]]:
    """120 pairs whose chosen and rejected responses differ in a learnable way: the chosen one is
    polite (" Thanks for asking! ..."), the rejected one rude (" Ugh, ..."); the object varies."""
    return [{"prompt": f"Describe the {c} {n}:", "chosen": f" Thanks for asking! The {c} {n} is lovely.",
             "rejected": f" Ugh, the {c} {n} is awful."} for n in NOUNS for c in COLORS]


@pytest.fixture(scope="session")
def preference_file(tmp_path_factory) -> Path:
    """The :func:`synthetic_pairs` as a JSON-lines file."""
    path = tmp_path_factory.mktemp("preference") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs()))
    return path
