"""Run folders as data: where the runs under a folder are (any folder with a ``.hydra/`` inside), and
what each one holds: its overrides (``.hydra/overrides.yaml``), its status and final metrics
(``metrics.json``), its composed config (``.hydra/config.yaml``) and its curves (TensorBoard event
files and the CSV logger's ``metrics.csv``)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptlab.results.record import read_result


@dataclass
class Run:
    """One run folder: where it is, what was overridden, how it ended, its final metrics."""

    path: Path
    name: str
    overrides: dict[str, str]
    status: str
    """``ok``, ``failed``, ``interrupted`` or ``incomplete``."""
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def find_runs(root: Path) -> list[Path]:
    """Every folder under ``root`` (``root`` included) that holds a ``.hydra/`` folder, sorted with
    numeric job numbers in numeric order."""
    root = Path(root)
    found = [p.parent for p in root.rglob(".hydra") if p.is_dir()]
    return sorted(found, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts])


def read_overrides(run: Path) -> dict[str, str]:
    """``key -> value`` from ``.hydra/overrides.yaml`` (``+``/``++`` prefixes dropped; hydra.* skipped)."""
    file = run / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(file.read_text()) if file.is_file() else None
    out: dict[str, str] = {}
    for item in items or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra."):
            out[key] = value
    return out


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run's TensorBoard event files: ``tag -> [(step, value), ...]``,
    sorted by step (for equal steps the later write wins). Event files of nested runs are skipped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    nested = {p.parent for p in run.rglob(".hydra") if p.is_dir() and p.parent != run}
    folders = sorted({f.parent for f in run.rglob("events.out.tfevents.*")
                      if not any(n in f.parents for n in nested)})
    series: dict[str, dict[int, tuple[float, float]]] = {}
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
        for tag in acc.Tags().get("scalars", []):
            points = series.setdefault(tag, {})
            for e in acc.Scalars(tag):
                if e.step not in points or e.wall_time >= points[e.step][0]:
                    points[e.step] = (e.wall_time, float(e.value))
    return {tag: [(s, v) for s, (_, v) in sorted(points.items())] for tag, points in series.items()}


def read_csv_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every series in the CSV logger's ``metrics.csv`` files of the run: ``tag -> [(step, value), ...]``."""
    series: dict[str, dict[int, float]] = {}
    for file in run.rglob("metrics.csv"):
        with file.open(newline="") as f:
            for row in csv.DictReader(f):
                step = as_number(row.get("step"))
                for tag, value in row.items():
                    v = as_number(value)
                    if tag in ("step", "epoch") or v is None or step is None:
                        continue
                    series.setdefault(tag, {})[int(step)] = v
    return {tag: sorted(points.items()) for tag, points in series.items()}


def run_status(path: Path, result: dict[str, Any] | None) -> str:
    if result is not None and result.get("status"):
        return str(result["status"])
    return "failed" if (path / "FAILED").exists() else "incomplete"


def load_run(path: Path, root: Path, read_curves: bool = True) -> Run:
    """A run folder: overrides, status and final metrics (``metrics.json``), and, with
    ``read_curves``, every scalar series (TensorBoard and CSV logs)."""
    result = read_result(path)
    curves = {**read_csv_scalars(path), **read_scalars(path)} if read_curves else {}
    metrics = {tag: pts[-1][1] for tag, pts in curves.items() if pts}
    metrics.update({k: v for k, v in ((result or {}).get("metrics") or {}).items() if v is not None})
    name = str(path.relative_to(root)) if path != root else path.name
    return Run(path=path, name=name, overrides=read_overrides(path), status=run_status(path, result),
               metrics=metrics, curves=curves)


def config_keys(run: Run) -> list[str]:
    """Every leaf key of a run's composed config (``.hydra/config.yaml``), dotted."""
    file = run.path / ".hydra" / "config.yaml"
    if not file.is_file():
        return []
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out.append(prefix[:-1])

    walk(yaml.safe_load(file.read_text()) or {}, "")
    return out


def as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def hyperparameter(run: Run, key: str) -> Any:
    """``key`` of a run: its override, else the value in its ``.hydra/config.yaml``."""
    if key in run.overrides:
        return run.overrides[key]
    file = run.path / ".hydra" / "config.yaml"
    if file.is_file():
        from omegaconf import OmegaConf

        return OmegaConf.select(OmegaConf.load(file), key, default=None)
    return None

__all__ = ["Run", "find_runs", "read_overrides", "read_scalars", "read_csv_scalars", "run_status", "load_run",
           "config_keys", "hyperparameter", "as_number"]
