"""Does the progress bar slow training down? gptlab's training step with the bar and logging on
the critical path vs off it, same model, data and steps.

    python experiments/progress_bar/run.py                 # CPU preset of experiments/throughput
    python experiments/progress_bar/run.py --preset gpu    # gpt2-small, context 1024, batch 16, bf16, compile

Each variant is the gptlab side of ``experiments/throughput/run.py`` (the real ``gptlab-train`` code
path) in its own subprocess (the ``smoke`` preset: in this process, a check that measures nothing):
  off           no progress bar; loggers log once per timing window
  every step    the bar refreshes every step (Lightning's default ``TQDMProgressBar``) and the loggers
                log every 5 steps: what ``trainer=gpu`` did before. Each refresh reads the logged
                loss, ``.item()`` on a GPU tensor: the host waits for the GPU queue to drain
  every 50      the bar and the loggers every 50 steps: ``trainer=gpu`` now
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

THROUGHPUT = Path(__file__).resolve().parents[1] / "throughput" / "run.py"
VARIANTS = {  # name: (bar refresh rate, logger interval)
    "off": (0, None),
    "every step (bar 1, log 5)": (1, 5),
    "every 50 (bar 50, log 50)": (50, 50),
}


def run_variant(preset: str, refresh: int, log_every: int | None, steps: int | None) -> dict:
    if preset == "smoke":  # checks the code path, measures nothing: no process (and imports) per variant
        spec = importlib.util.spec_from_file_location("throughput_run", THROUGHPUT)
        throughput = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(throughput)
        return throughput.run_gptlab(throughput.settings(preset, steps, None, refresh, log_every))
    cmd = [sys.executable, str(THROUGHPUT), "--preset", preset, "--only", "gptlab", "--progress-bar", str(refresh)]
    if log_every:
        cmd += ["--log-every", str(log_every)]
    if steps:
        cmd += ["--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"variant bar={refresh} log={log_every} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "gpu"])
    ap.add_argument("--steps", type=int, default=None, help="steps per variant (default: the preset's)")
    args = ap.parse_args()
    results = {name: run_variant(args.preset, r, log, args.steps) for name, (r, log) in VARIANTS.items()}
    base = results["off"]["tokens_per_sec"]
    print(f"gptlab training step, throughput preset {args.preset!r}; tokens/s over the timed steps\n")
    print("| progress bar / logging | tokens/s | step time (ms) | vs off |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_sec']:,.0f} | {r['step_time_ms']:.1f} | {r['tokens_per_sec'] / base:.3f}x |")


if __name__ == "__main__":
    main()
