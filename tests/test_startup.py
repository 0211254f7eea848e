"""Tools that start at once: a tool module imports its heavy libraries only inside the functions that
need them, so ``--help`` and ``gptlab-config ls`` load no torch, Lightning, Hydra or tiktoken, and
``import gptlab`` loads its public API on first use. (The time it saves is measured, not asserted:
``experiments/startup/``.)"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("torch", "lightning", "pytorch_lightning", "hydra", "omegaconf", "tiktoken", "numpy", "tensorboard")
HYDRA_TOOLS = {name: target for name, target in SCRIPTS.items() if name not in ("gptlab-compare", "gptlab-config")}


def modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; the heavy modules it left in ``sys.modules`` and what it
    printed."""
    probe = (f"import io, json, sys, contextlib\nout = io.StringIO()\n"
             f"with contextlib.redirect_stdout(out):\n"
             + "".join(f"    {line}\n" for line in code.splitlines())
             + f"print(json.dumps({{'loaded': sorted(m for m in {HEAVY!r} if m in sys.modules), 'out': out.getvalue()}}))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.parametrize("prog", sorted(HYDRA_TOOLS))
def test_help_imports_no_heavy_library(prog):
    module, _, attr = HYDRA_TOOLS[prog].partition(":")
    found = modules_after(f"import sys\nsys.argv = [{prog!r}, '--help']\nimport {module} as tool\n"
                          f"try:\n    tool.{attr}()\nexcept SystemExit as e:\n    assert e.code == 0, e.code")
    assert found["out"].startswith(f"{prog}: ") and "Keys (key=default" in found["out"]
    assert found["loaded"] == [], f"{prog} --help imported {found['loaded']}"


def test_config_ls_imports_no_heavy_library():
    found = modules_after("from gptlab.cli.configs import main\nmain(['ls'])")
    assert "experiment/ch05_verdict" in found["out"] and found["loaded"] == []


def test_importing_every_tool_module_leaves_lightning_out():
    """What a tool module does at import time; what it imports once it runs is the library's part
    (an inference tool reaches its first output without Lightning once ``inference.py`` needs none)."""
    modules = sorted({t.partition(":")[0] for t in SCRIPTS.values()})
    found = modules_after("".join(f"import {m}\n" for m in modules))
    assert found["loaded"] == []


def test_the_public_api_loads_on_first_use():
    found = modules_after("import gptlab\nprint(set(gptlab.__all__) <= set(dir(gptlab)))")
    assert found["loaded"] == [] and found["out"].strip() == "True"  # listed, but nothing heavy until used
    found = modules_after("from gptlab import GPT, GPTConfig, generate, get_tokenizer, load_pretrained\n"
                          "import gptlab\nprint(gptlab.GPT is GPT, GPT.__module__, callable(load_pretrained))")
    assert found["out"].split() == ["True", "gptlab.model.gpt", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import gptlab

        gptlab.nothing  # noqa: B018 - the lookup itself is the test
