"""``experiments/gpu_suite.py``: the one command that measures every GPU figure. Its ``--smoke`` mode
runs the same benchmark scripts on CPU with tiny shapes, so the suite cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "experiments" / "gpu_suite.py"


@pytest.fixture
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_suite", None)


def test_smoke_run_writes_one_table_per_benchmark_and_a_combined_file(tmp_path, suite):
    res = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=1500, cwd=tmp_path)  # a hang guard (10 benchmarks x 120 s caps on a loaded machine)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    combined = (tmp_path / "gpu_results.md").read_text()
    assert "smoke run" in combined and "torch " in combined
    for b in suite.BENCHMARKS:
        text = (tmp_path / f"{b.name}.md").read_text()
        assert "status: **ok**" in text, text
        assert f"| {b.name} | ok |" in combined
    # the benchmarks' own tables made it into the files
    assert "| gptlab |" in (tmp_path / "throughput_b16.md").read_text()
    assert "| every 50 (bar 50, log 50) |" in (tmp_path / "progress_bar.md").read_text()
    assert "same tokens" in (tmp_path / "generation_b8.md").read_text()


def test_a_failing_and_a_hanging_benchmark_do_not_lose_the_others(tmp_path, suite, monkeypatch):
    scripts = tmp_path / "experiments"
    scripts.mkdir()
    (scripts / "ok.py").write_text("print('| a | table |')\n")
    (scripts / "fail.py").write_text("import sys\nprint('partial')\nsys.exit('boom: the reason')\n")
    (scripts / "hang.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setattr(suite, "ROOT", tmp_path)
    monkeypatch.setattr(suite, "SMOKE_CAP_S", 3)
    monkeypatch.setattr(suite, "BENCHMARKS", [
        suite.Benchmark(name, name, f"experiments/{name}.py", [], [], 3, "README.md")
        for name in ("fail", "hang", "ok")])
    assert suite.main(["--smoke", "--out", str(tmp_path / "out")]) == 1
    combined = (tmp_path / "out" / "gpu_results.md").read_text()
    assert "| fail | failed (exit code 1) |" in combined and "boom: the reason" in combined
    assert "| hang | timed out after 3 s |" in combined
    assert "| ok | ok |" in combined and "| a | table |" in (tmp_path / "out" / "ok.md").read_text()


def test_unknown_benchmark_names_are_refused_with_the_valid_ones(suite, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--smoke", "--only", "throughput_b16,nope"])
    err = capsys.readouterr().err
    assert "nope" in err and "generation_b1" in err


def test_missing_modules_are_installed_from_local_wheels(tmp_path, suite, monkeypatch):
    """A bare GPU machine lacks hydra-core & co.: the suite installs them from .whl/ without network."""
    wheels = tmp_path / ".whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gptlab_fake_dep-1.0-py3-none-any.whl", "w") as z:
        z.writestr("gptlab_fake_dep/__init__.py", "VALUE = 42\n")
        z.writestr("gptlab_fake_dep-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: gptlab-fake-dep\nVersion: 1.0\n")
        z.writestr("gptlab_fake_dep-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("gptlab_fake_dep-1.0.dist-info/RECORD", "")
    monkeypatch.setattr(suite, "WHEEL_DIRS", (wheels,))
    monkeypatch.setattr(suite, "WHEELS", {"gptlab_fake_dep": "gptlab_fake_dep"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    env, log = suite.bootstrap(tmp_path / "site")
    assert "installed gptlab_fake_dep-1.0-py3-none-any.whl" in log[0]
    assert str(tmp_path / "site") in env["PYTHONPATH"].split(":") and str(suite.ROOT) in env["PYTHONPATH"]
    out = subprocess.run([sys.executable, "-c", "import gptlab_fake_dep; print(gptlab_fake_dep.VALUE)"],
                         env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr
