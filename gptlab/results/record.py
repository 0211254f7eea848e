"""``metrics.json``: what every run leaves in its folder when it ends: its status (``ok``, ``failed``,
``interrupted``), its final metrics (any logger, ``logger=none`` included) and the metric sweepers
optimise. A run folder without one crashed hard or is still running."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

RESULT_FILE = "metrics.json"
STATUSES = ("ok", "failed", "interrupted")


def write_result(folder: str | Path, status: str, metrics: Mapping[str, float], optimized_metric: str | None,
                 seconds: float | None = None, error: str | None = None) -> Path:
    """Write ``metrics.json`` into a run folder (finite metrics only; NaN/inf become null)."""
    if status not in STATUSES:
        raise ValueError(f"status={status!r}; valid choices: {list(STATUSES)}")
    clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in sorted(metrics.items())}
    data = {"status": status, "optimized_metric": optimized_metric,
            "optimized_value": clean.get(optimized_metric) if optimized_metric else None,
            "seconds": None if seconds is None else round(seconds, 1), "metrics": clean}
    if error:
        data["error"] = error
    path = Path(folder) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_result(folder: str | Path) -> dict[str, Any] | None:
    """The ``metrics.json`` of a run folder, or None when the run wrote none (crashed, still running)."""
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


__all__ = ["RESULT_FILE", "STATUSES", "write_result", "read_result"]
