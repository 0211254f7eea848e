"""The page's table and curves from finished run.sh folders: held-out greedy accuracy of the SFT base and
of the GRPO model (gptlab-solve), the gain, GRPO's wall time, and curves of the reward, the held-out
accuracy (``val/rewards/answer/mean``), the completion length and the KL (when beta > 0) per step.

    python experiments/rlvr_arith_scratch/report.py dapo=outputs/rlvr_s1,outputs/rlvr_s2,outputs/rlvr_s3 \\
        grpo=outputs/rlvr_grpo dr_grpo=outputs/rlvr_dr --plot experiments/rlvr_arith_scratch/curves.png

Each argument is ``label=folder[,folder...]`` (the folders of one setting, e.g. its seeds); the table
gives each folder and each label's mean +- std (sample std over its folders).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any


def read_curves(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] from every Lightning CSV log under ``folder`` (a resumed run writes
    one more); a step logged twice keeps its last value."""
    curves: dict[str, dict[int, float]] = {}
    for csv_path in sorted(folder.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                step = int(float(row.get("step") or 0))
                for k, v in row.items():
                    if k != "step" and v not in ("", None):
                        curves.setdefault(k, {})[step] = float(v)
    return {k: sorted(v.items()) for k, v in curves.items()}


def read_run(folder: Path) -> dict[str, Any]:
    acc = {}
    for name in ("sft", "grpo"):
        acc[name] = json.loads((folder / f"solve_{name}.jsonl.summary.json").read_text())["accuracy"]
        extra = folder / f"solve_{name}_extra.jsonl.summary.json"  # run.sh's 999 more held-out problems
        acc[f"{name}_extra"] = json.loads(extra.read_text())["accuracy"] if extra.is_file() else None
    # the run's wall time: metrics.json, plus metrics_*.json kept from the parts of a resumed run
    seconds = sum(json.loads(p.read_text())["seconds"] for p in (folder / "grpo").glob("metrics*.json"))
    curves = read_curves(folder / "grpo")
    gain_extra = None if acc["sft_extra"] is None else acc["grpo_extra"] - acc["sft_extra"]
    return {"folder": str(folder), "sft": acc["sft"], "grpo": acc["grpo"], "gain": acc["grpo"] - acc["sft"],
            "sft_extra": acc["sft_extra"], "grpo_extra": acc["grpo_extra"], "gain_extra": gain_extra,
            "seconds": seconds, "steps": max(s for s, _ in curves.get("reward", [(0, 0)])) + 1, "curves": curves}


def smooth(points: list[tuple[int, float]], window: int) -> tuple[list[int], list[float]]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    out = [statistics.fmean(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
    return xs, out


def plot(groups: dict[str, list[dict[str, Any]]], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", f"reward (answer + 0.1 format), mean of {window} steps", window),
              ("val/rewards/answer/mean", "held-out greedy accuracy (validation problems)", 1),
              ("completions/mean_length", f"completion length (tokens), mean of {window} steps", window),
              ("kl", f"KL to the reference, mean of {window} steps", window)]
    has_kl = any(any(v for _, v in r["curves"].get("kl", [])) for runs in groups.values() for r in runs)
    panels = panels if has_kl else panels[:3]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, w) in zip(axes, panels):
        for c, (label, runs) in zip(colors, groups.items()):
            for i, r in enumerate(runs):
                if r["curves"].get(key):
                    xs, ys = smooth(r["curves"][key], w)
                    ax.plot(xs, ys, color=c, alpha=0.85, lw=1.2, label=label if i == 0 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def extra_mean(runs: list[dict[str, Any]]) -> str:
    gains = [100 * r["gain_extra"] for r in runs if r["gain_extra"] is not None]
    return f"**{statistics.fmean(gains):+.1f} +- {statistics.stdev(gains):.1f}**" if len(gains) > 1 else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("groups", nargs="+", help="label=folder[,folder...]")
    p.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    p.add_argument("--window", type=int, default=20, help="steps averaged in the reward / length curves")
    args = p.parse_args()
    groups: dict[str, list[dict[str, Any]]] = {}
    for g in args.groups:
        label, _, folders = g.partition("=")
        groups[label] = [read_run(Path(f)) for f in folders.split(",") if f]
    def extra(r: dict[str, Any]) -> str:
        if r["gain_extra"] is None:
            return "-"
        return f"{100 * r['sft_extra']:.1f}% -> {100 * r['grpo_extra']:.1f}% ({100 * r['gain_extra']:+.1f})"

    print("| setting | run | SFT greedy | GRPO greedy | gain (points) | 999 more held-out | GRPO steps "
          "| GRPO wall time |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, runs in groups.items():
        for r in runs:
            print(f"| {label} | `{r['folder']}` | {100 * r['sft']:.1f}% | {100 * r['grpo']:.1f}% | "
                  f"{100 * r['gain']:+.1f} | {extra(r)} | {r['steps']} | {r['seconds'] / 60:.1f} min |")
        if len(runs) > 1:
            gains = [100 * r["gain"] for r in runs]
            grpo = [100 * r["grpo"] for r in runs]
            sft = [100 * r["sft"] for r in runs]
            print(f"| **{label}** | mean +- std of {len(runs)} | "
                  f"{statistics.fmean(sft):.1f} +- {statistics.stdev(sft):.1f}% "
                  f"| {statistics.fmean(grpo):.1f} +- {statistics.stdev(grpo):.1f}% | "
                  f"**{statistics.fmean(gains):+.1f} +- {statistics.stdev(gains):.1f}** | {extra_mean(runs)} | | "
                  f"{statistics.fmean(r['seconds'] for r in runs) / 60:.1f} min |")
    if args.plot:
        plot(groups, args.plot, args.window)
        print(f"curves: {args.plot}")


if __name__ == "__main__":
    main()
