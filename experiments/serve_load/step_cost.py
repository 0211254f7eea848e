"""The cost of one continuous-batching decode step with 1, 4 and 16 rows (the ceiling of what batching
can gain on this machine): ``ContinuousBatch.step`` of a random-weight model, repeats alternating.

    python experiments/serve_load/step_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gptlab.model.continuous import ContinuousBatch, Sampling  # noqa: E402
from gptlab.model.gpt import GPT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT.from_name(args.model).eval()
    rows = [int(r) for r in args.rows.split(",")]
    need = args.repeats * args.steps + 1
    batches = {}
    for n in rows:
        b = ContinuousBatch(model, max(rows))
        b.add([torch.randint(0, 50000, (24,)) for _ in range(n)], [need] * n, [Sampling()] * n, list(range(n)))
        batches[n] = b
    times: dict[int, list[float]] = {n: [] for n in rows}
    for rep in range(args.repeats):
        for n in rows if rep % 2 == 0 else rows[::-1]:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                batches[n].step()
            times[n].append((time.perf_counter() - t0) / args.steps)
    print(f"{args.model}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for n, t in times.items():
        t = sorted(t)
        print(f"{n:3d} rows: one step {t[0] * 1e3:.0f} / {statistics.median(t) * 1e3:.0f} / {t[-1] * 1e3:.0f} ms "
              f"(min / median / max)")


if __name__ == "__main__":
    main()
