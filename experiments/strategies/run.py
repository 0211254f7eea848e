"""``trainer=ddp`` and ``trainer=fsdp`` on ONE device against ``trainer=gpu``: the same run (gpt2-small
shape from scratch, the bundled story, a few steps, dropout off) through each strategy's code path;
per-step losses compared within bf16 tolerance, the checkpoint each writes loaded back by a resumed
run of one more step.

    python experiments/strategies/run.py                     # on a GPU: gpu vs ddp vs fsdp
    python experiments/strategies/run.py --smoke             # CPU: cpu vs ddp (fsdp needs a GPU)

Prints a markdown table (experiments/gpu_suite.py collects it).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BF16_RTOL = 2e-2  # bf16 keeps 8 bits of mantissa: losses of differently fused kernels agree to ~1%


def train(out: Path, trainer: list[str], common: list[str], extra: list[str] = ()) -> tuple[int, str, list[float]]:
    """One gptlab-train run into ``out``; (exit status, console tail, per-step train/loss_step)."""
    args = [sys.executable, "-m", "gptlab.cli.train", *common, *trainer, f"hydra.run.dir={out}", *extra]
    res = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    losses = []
    for path in sorted(out.glob("csv/**/metrics.csv")):
        with open(path) as f:
            losses = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    return res.returncode, (res.stdout + res.stderr)[-1500:], losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, gpt2-tiny: cpu vs ddp (devices=1)")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    model = "model=gpt2-tiny" if args.smoke else "model=gpt2-small"
    common = [model, "model.drop_rate=0.0", "data.max_length=128", "data.batch_size=4", "data.shuffle=false",
              f"trainer.max_steps={args.steps}", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
              "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "task.sample_prompt=null",
              "task.lr_schedule.warmup_steps=0", "logger=csv"]
    if args.smoke:
        runs = {"cpu": ["trainer=cpu"],
                "ddp": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true"]}
    else:
        runs = {"gpu": ["trainer=gpu"], "ddp": ["trainer=ddp", "trainer.devices=1"],
                "fsdp": ["trainer=fsdp", "trainer.devices=1"]}
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="gptlab-strategies-") as tmp:
        for name, trainer in runs.items():
            out = Path(tmp) / name
            code, tail, losses = train(out, trainer, common)
            if code != 0 or not losses:
                rows.append(f"| {name} | failed (exit {code}) | | | |")
                print(tail, file=sys.stderr)
                continue
            first = reference is None
            reference = reference or losses
            diff = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
            ckpt = out / "checkpoints" / "last.ckpt"
            resumed = None if first else train(Path(tmp) / f"{name}-resumed", trainer, common,
                                               [f"ckpt_path={ckpt}", f"trainer.max_steps={args.steps + 1}"])[0]
            same = "yes" if diff <= BF16_RTOL or math.isclose(diff, 0.0) else f"NO (> {BF16_RTOL})"
            rows.append(f"| {name} | {' '.join(f'{x:.4f}' for x in losses)} | {diff:.2e} ({same}) | "
                        f"{'saved' if ckpt.is_file() else 'missing'} | {'-' if resumed is None else 'ok' if resumed == 0 else f'failed ({resumed})'} |")
    print(f"\n{'smoke (CPU, gpt2-tiny)' if args.smoke else 'GPU, gpt2-small shape, bf16-mixed'}, "
          f"{args.steps} steps, batch 4 x 128\n")
    print("| trainer | train/loss per step | max relative difference to the first | checkpoint | resumed from it |")
    print("|---|---|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
