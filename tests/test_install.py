"""A regular install works: the wheel carries the Hydra configs (``gptlab.conf``) and the assets, and
``gptlab-train`` runs from an unrelated folder of a fresh virtualenv (system site-packages for the
dependencies, no network, no checkout on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    """``[tool.setuptools] packages`` is explicit (so ``conf/`` can ship as ``gptlab.conf``): a new
    subpackage must be added there, or the wheel would lack it."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "gptlab").rglob("__init__.py")}
    assert found | {"gptlab.conf"} == listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return next(out.glob("gptlab-*.whl"))


def test_the_wheel_carries_every_config_and_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"gptlab/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")}
    assert configs and configs <= names
    assert {"gptlab/assets/the-verdict.txt", "gptlab/assets/vocab.bpe", "gptlab/assets/encoder.json"} <= names


@pytest.mark.slow
def test_a_regular_install_trains_from_an_unrelated_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed",
                          "-q", str(wheel)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import gptlab, gptlab.cli; print(gptlab.__file__); "
                            "print(gptlab.cli.CONFIG_DIR)"], cwd=work, env=env, capture_output=True, text=True)
    module, config_dir = where.stdout.split()
    assert str(venv) in module and str(venv) in config_dir, where.stdout + where.stderr  # not the checkout
    res = subprocess.run([str(venv / "bin" / "gptlab-train"), "model=gpt2-tiny", "data.max_length=32",
                          "trainer.max_steps=2", "trainer.enable_progress_bar=false", "logger=csv"],
                         cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = list((work / "outputs" / "pretrain" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").is_file() and (runs[0] / ".hydra" / "config.yaml").is_file()
    assert f"run folder: {runs[0]}" in res.stdout
