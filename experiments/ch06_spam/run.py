"""Which position should the spam classifier read? ``last_position`` (the book's ``[:, -1, :]``,
a pad for every text shorter than the padded width) vs ``last_token`` (the last real token), on the
book's exact 1,045 / 149 / 300 split, everything else equal.

    python experiments/ch06_spam/run.py                      # experiment=ch06_spam_scratch, seeds 123 124 125
    python experiments/ch06_spam/run.py --seeds 123 --out outputs/ch06_pooling
    python experiments/ch06_spam/run.py --preset ch06_spam --fixed trainer=gpu   # the book's pretrained run

Each run is ``gptlab-train experiment=<preset> task.pooling=<p> data.pad_to_max_length=true seed=<s>``
(every batch as wide as the padded length, as in the book, so both poolings see the same batches and
the same padding); the table gives the test accuracy of the best-``val/loss`` checkpoint, its F1 and
the validation accuracy of the last epoch, read from each run's ``csv/metrics.csv``. ``--vary KEY V1
V2 ...`` compares another setting the same way (``experiments/appE_spam_lora/run.py`` does, for LoRA's
scaling). A finished run is reused when the script is started again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read_metrics(run_dir: Path) -> dict[str, float]:
    """The last value of every metric in the run's CSV log."""
    out: dict[str, float] = {}
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step")})
    return out


def run_one(preset: str, key: str, value: str, seed: int, out: Path, fixed: list[str]) -> dict[str, float]:
    name = f"{key.rpartition('.')[2]}-{value}-seed{seed}"
    run_dir = out / name
    done = run_dir / "result.json"
    if done.is_file():  # finished earlier: reuse (delete the folder to run again)
        return json.loads(done.read_text())
    cmd = [sys.executable, "-m", "gptlab.cli.train", f"experiment={preset}", f"{key}={value}", f"seed={seed}",
           *fixed, "logger=csv", "test=true", f"hydra.run.dir={run_dir}"]
    print("$ gptlab-train", " ".join(cmd[3:-1]), flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    result = {**read_metrics(run_dir), "wall_s": time.time() - start}
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="ch06_spam_scratch")
    ap.add_argument("--vary", nargs="+", default=["task.pooling", "last_position", "last_token"],
                    metavar=("KEY", "VALUE"), help="the config key compared and its values")
    ap.add_argument("--seeds", nargs="+", type=int, default=[123, 124, 125])
    ap.add_argument("--fixed", nargs="*", default=["data.pad_to_max_length=true"],
                    help="gptlab-train overrides shared by every run")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "ch06_pooling")
    args = ap.parse_args()
    key, values = args.vary[0], args.vary[1:]
    args.out.mkdir(parents=True, exist_ok=True)
    results = {(v, s): run_one(args.preset, key, v, s, args.out, args.fixed) for s in args.seeds for v in values}
    print(f"\nexperiment={args.preset} {' '.join(args.fixed)} (book split); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"| {key} | seed | test/acc | test/f1 | val/acc (last epoch) | wall |")
    print("|---|---:|---:|---:|---:|---:|")
    for (v, s), r in results.items():
        print(f"| {v} | {s} | {100 * r['test/acc']:.2f}% | {r['test/f1']:.3f} | {100 * r['val/acc']:.2f}% "
              f"| {r['wall_s'] / 60:.1f} min |")
    for v in values:
        accs = [100 * results[(v, s)]["test/acc"] for s in args.seeds]
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        print(f"| {v} | mean of {len(accs)} | {statistics.mean(accs):.2f}%{spread} | | | |")


if __name__ == "__main__":
    main()
