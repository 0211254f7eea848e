"""Every ``experiment=`` preset has a result page, ``experiments/<preset>/README.md``, that gives the
preset's command (measured results next to the book's, or why it was not run here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO

PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_there_are_presets():
    assert {"ch05_verdict", "ch06_spam", "ch07_instruct", "ch07_dpo", "ch08_ppo"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_has_a_result_page_with_its_command(preset):
    page = REPO / "experiments" / preset / "README.md"
    assert page.is_file(), f"no {page.relative_to(REPO)}"
    assert f"experiment={preset}" in page.read_text()


@pytest.mark.parametrize("preset", PRESETS)
def test_the_readme_results_link_each_page(preset):
    assert f"experiments/{preset}" in (REPO / "README.md").read_text()
