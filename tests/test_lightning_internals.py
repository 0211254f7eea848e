"""Lightning's private API is used in one module, gptlab/lightning_internals.py, for the Lightning
versions pyproject.toml allows: the installed Lightning must be one of them and still have every
private name that module uses (a Lightning upgrade that drops one fails here, not in a user's run)."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import lightning
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from gptlab import lightning_internals

REPO = Path(__file__).resolve().parents[1]


def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def test_the_installed_lightning_is_in_the_range_pyproject_allows():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("lightning")]
    low, high = re.fullmatch(r"lightning>=([\d.]+),<([\d.]+)", spec).groups()
    assert version(low) <= version(lightning.__version__) < version(high), (lightning.__version__, spec)


def test_every_private_name_the_module_uses_exists():
    for owner, names in lightning_internals.PRIVATE_NAMES.items():
        for name in names:
            assert hasattr(owner, name), f"{owner} has no {name}"
    assert list(inspect.signature(lightning.pytorch.callbacks.ModelCheckpoint._save_topk_checkpoint).parameters) == \
        ["self", "trainer", "monitor_candidates"]
    fit_loop = inspect.getsource(_FitLoop)
    for attribute in ("_combined_loader_states_to_load", "_combined_loader", "_data_fetcher"):
        assert f"self.{attribute}" in fit_loop, attribute
    assert hasattr(CombinedLoader, "_load_state_dicts")


def test_no_other_module_touches_a_private_lightning_name():
    pattern = re.compile(r"\b(fit_loop\._|_hydra_subprocess_cmd|_should_skip_saving_checkpoint|_monitor_candidates|"
                         r"_save_topk_checkpoint|_save_last_checkpoint|_load_state_dicts)")
    users = sorted(str(p.relative_to(REPO)) for p in (REPO / "gptlab").rglob("*.py") if pattern.search(p.read_text()))
    assert users == ["gptlab/lightning_internals.py"]
