"""How long the tools take to start, as a ratio to ``python -c "import torch"`` timed in the same run.

    python experiments/startup/run.py                       # every tool's --help and gptlab-config ls
    python experiments/startup/run.py --reps 9 --first-output
    python experiments/startup/run.py --before /tmp/gptlab-main   # the same commands in another checkout

Each repetition runs the baseline and then every command once, in a shuffled order (interleaved,
so a load spike from other processes hits all of them alike), each in a fresh process; the wall time
is measured around the whole process. Reported per command: min/median/max seconds and
min/median/max of its ratio to the baseline of the same repetition.

* ``gptlab-<tool> --help`` (the nine Hydra tools and ``gptlab-compare``) and ``gptlab-config ls`` are the
  installed console scripts.
* ``--first-output``: ``gptlab-generate`` on a tiny random model (``gpt2-tiny`` weights written to a
  temp folder), one greedy token: the time to its first output, and whether Lightning was imported
  on the way (read from ``python -X importtime``).
* ``--before DIR``: the same commands as ``python -m gptlab.cli.<module>`` with ``PYTHONPATH=DIR``
  (e.g. a ``git worktree`` of an older commit), for a before/after table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = "python -c 'import torch'"
TOOLS = {"train": "train", "generate": "generate", "chat": "chat", "classify": "classify", "eval": "evaluate",
         "export": "export", "judge": "judge", "respond": "respond", "reward": "reward"}
"""Tool name (``gptlab-<name>``) -> its module under ``gptlab.cli``."""


def commands(before: Path | None, tiny: Path | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Label -> (argv, extra environment) of every command to time."""
    bin_dir = Path(sys.executable).parent
    out: dict[str, tuple[list[str], dict[str, str]]] = {BASELINE: ([sys.executable, "-c", "import torch"], {})}
    for name in TOOLS:
        out[f"gptlab-{name} --help"] = ([str(bin_dir / f"gptlab-{name}"), "--help"], {})
    out["gptlab-compare --help"] = ([str(bin_dir / "gptlab-compare"), "--help"], {})
    out["gptlab-config ls"] = ([str(bin_dir / "gptlab-config"), "ls"], {})
    if tiny is not None:
        out["gptlab-generate (tiny model, 1 token)"] = (
            [str(bin_dir / "gptlab-generate"), f"init_from={tiny}", "max_new_tokens=1", "prompt=Hello", "device=cpu"], {})
    if before is not None:
        env = {"PYTHONPATH": str(before)}
        for name, module in TOOLS.items():
            out[f"before: gptlab-{name} --help"] = ([sys.executable, "-m", f"gptlab.cli.{module}", "--help"], env)
        out["before: gptlab-compare --help"] = ([sys.executable, "-m", "gptlab.cli.compare", "--help"], env)
        out["before: gptlab-config ls"] = ([sys.executable, "-m", "gptlab.cli.configs", "ls"], env)
    return out


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of one run of ``argv`` (exits non-zero: the script stops, showing why)."""
    start = time.perf_counter()
    res = subprocess.run(argv, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode:
        sys.exit(f"{' '.join(argv)} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return seconds


def imports_lightning(argv: list[str], cwd: Path) -> bool:
    """Whether running ``argv`` (a console script) imports ``lightning`` (``python -X importtime``)."""
    res = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=cwd, capture_output=True, text=True)
    return any(line.rsplit("|", 1)[-1].strip().split(".")[0] == "lightning" for line in res.stderr.splitlines())


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="repetitions (each runs every command once)")
    ap.add_argument("--first-output", action="store_true", help="also time gptlab-generate on a tiny model")
    ap.add_argument("--before", type=Path, default=None, help="another checkout to time the same commands in")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gptlab-startup-"))
    try:
        tiny = None
        if args.first_output:
            import torch

            from gptlab.model.config import GPTConfig
            from gptlab.model.gpt import GPT

            tiny = work / "tiny.pt"
            torch.save(GPT(GPTConfig.from_name("gpt2-tiny")).state_dict(), tiny)
        todo = commands(args.before, tiny)
        rng = random.Random(args.seed)
        times: dict[str, list[float]] = {label: [] for label in todo}
        load = [os.getloadavg()]
        for rep in range(args.reps):
            order = list(todo)
            rng.shuffle(order)
            for label in order:
                times[label].append(timed(*todo[label], cwd=work))
            load.append(os.getloadavg())
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)
        lightning = imports_lightning(todo["gptlab-generate (tiny model, 1 token)"][0], work) if tiny else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = times[BASELINE]
    print(f"{args.reps} interleaved repetitions; {os.cpu_count()} CPUs; Python {platform.python_version()}; "
          f"load average (1 min) {spread([la[0] for la in load], '.2f')} (min / median / max over the run)\n")
    print("| command | seconds (min / median / max) | ratio to `import torch` (min / median / max) |")
    print("|---|---:|---:|")
    for label, values in times.items():
        ratios = [v / b for v, b in zip(values, base)]
        print(f"| `{label}` | {spread(values, '.2f')} | {spread(ratios, '.3f')} |")
    if lightning is not None:
        print(f"\ngptlab-generate (tiny model) imports Lightning on the way to its first output: {lightning}")


if __name__ == "__main__":
    main()
