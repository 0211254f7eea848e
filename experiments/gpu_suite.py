"""Every GPU figure from one command: run all benchmarks, each with a time cap, and write the tables.

    python experiments/gpu_suite.py                         # on a GPU machine: everything, <= 9 minutes
    python experiments/gpu_suite.py --out $OUT              # where the markdown files go
    python experiments/gpu_suite.py --only throughput_b16,generation_b1
    python experiments/gpu_suite.py --smoke                 # the same code paths on CPU, tiny shapes
    python experiments/gpu_suite.py --smoke --no-cap --budget 0   # ... to the end, however busy the machine
    python experiments/gpu_suite.py --list                  # the registered benchmarks

Made for a bare machine: it needs only python + torch. Whatever else gptlab imports and the machine
lacks (hydra-core, omegaconf, antlr4, safetensors, torchdata, ...) is installed from wheel files in
``.whl/`` or ``../shared/wheels/`` into a private folder (``pip --no-index --no-deps --target``;
no network), and gptlab itself is imported from this checkout (PYTHONPATH), so nothing needs
``pip install -e .``. Each benchmark is an ``experiments/<name>/run.py`` script run in its own
subprocess with a time cap; one failing or timing out never loses the others' tables.

Writes into ``--out`` (default ``$OUT`` when set, else ``experiments/gpu_results/``): one
``<benchmark>.md`` per benchmark (command, status, wall time, its output tables) and
``gpu_results.md`` with the device, torch/CUDA versions and every section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIRS = (ROOT / ".whl", ROOT.parent / "shared" / "wheels")
# import name -> wheel file prefix; installed from a wheel only when the import fails
WHEELS = {"hydra": "hydra_core", "omegaconf": "omegaconf", "antlr4": "antlr4_python3_runtime",
          "safetensors": "safetensors", "torchdata": "torchdata", "torchao": "torchao", "tiktoken": "tiktoken",
          "lightning": "lightning", "torchmetrics": "torchmetrics", "tensorboard": "tensorboard",
          # gptlab-serve (serve_load): FastAPI, uvicorn and what they import
          "fastapi": "fastapi", "starlette": "starlette", "uvicorn": "uvicorn", "h11": "h11", "click": "click",
          "pydantic": "pydantic", "pydantic_core": "pydantic_core", "annotated_types": "annotated_types",
          "typing_inspection": "typing_inspection", "anyio": "anyio", "sniffio": "sniffio", "idna": "idna",
          "annotated_doc": "annotated_doc", "opentelemetry": "opentelemetry_api",
          "importlib_metadata": "importlib_metadata", "zipp": "zipp"}
TOTAL_BUDGET_S = 540  # one device call is capped at 600 s: leave room for start-up and the copy back


@dataclass
class Benchmark:
    """One entry of the suite: a script under ``experiments/`` with its GPU and smoke arguments."""

    name: str
    title: str
    script: str
    gpu_args: list[str]
    smoke_args: list[str]
    cap_s: int
    """Wall-clock cap on the GPU."""
    readme: str
    """Where the measured table belongs (the benchmark's own README)."""
    needs: list[str] = field(default_factory=list)
    """Modules the benchmark imports beyond gptlab's own dependencies (skipped if absent)."""
    smoke_cap_s: float | None = None
    """Wall-clock cap of a smoke run; None: ``SMOKE_CAP_S`` (None there too: no cap)."""


# The registry. Adding a benchmark is one entry; its script prints markdown tables to stdout.
BENCHMARKS: list[Benchmark] = [
    Benchmark("throughput_b16", "Training throughput, gpt2-small, context 1024, batch 16 (gptlab vs book reference)",
              "experiments/throughput/run.py", ["--preset", "gpu", "--batch", "16"],
              ["--preset", "smoke"], 45, "experiments/throughput/README.md"),
    Benchmark("throughput_b32", "Training throughput, gpt2-small, context 1024, batch 32 (gptlab vs book reference)",
              "experiments/throughput/run.py", ["--preset", "gpu", "--batch", "32"],
              ["--preset", "smoke", "--batch", "4"], 40, "experiments/throughput/README.md"),
    Benchmark("progress_bar", "Progress bar and logging on vs off the critical path (gptlab, gpt2-small, batch 16)",
              "experiments/progress_bar/run.py", ["--preset", "gpu"], ["--preset", "smoke"], 45,
              "experiments/progress_bar/README.md"),
    Benchmark("generation_b1", "Decoding speed, batch 1: dynamic / static / compiled (CUDA graph) KV cache vs recompute",
              "experiments/generation_speed/run.py",
              ["--devices", "cuda", "--compile", "--dtype", "bfloat16", "--batch", "1", "--new-tokens", "200"],
              ["--devices", "cpu", "--model", "gpt2-tiny", "--batch", "1", "--new-tokens", "8", "--repeats", "1"],
              45, "experiments/generation_speed/README.md"),
    Benchmark("generation_b8", "Decoding speed, batch 8: dynamic / static / compiled (CUDA graph) KV cache vs recompute",
              "experiments/generation_speed/run.py",
              ["--devices", "cuda", "--compile", "--dtype", "bfloat16", "--batch", "8", "--new-tokens", "200"],
              ["--devices", "cpu", "--model", "gpt2-tiny", "--batch", "8", "--new-tokens", "8", "--repeats", "1"],
              40, "experiments/generation_speed/README.md"),
    Benchmark("lora_vs_full", "Full fine-tuning vs LoRA: step time and peak memory, gpt2-medium, batch 8 x 256",
              "experiments/lora_vs_full/run.py", ["--device", "cuda"],
              ["--device", "cpu", "--model", "gpt2-tiny", "--batch", "2", "--seq", "32", "--steps", "1",
               "--threads", "1", "--in-process"], 40, "experiments/lora_vs_full/README.md"),
    Benchmark("ppo_speed", "PPO iteration time: rollout generation (dynamic / static / compiled KV cache) vs scoring vs update",
              "experiments/ppo_speed/run.py",
              ["--device", "cuda", "--model", "gpt2-small", "--batch", "16", "--prompt-len", "64", "--new-tokens", "64",
               "--warmup", "1", "--iters", "2"],
              ["--smoke"], 40, "experiments/ppo_speed/README.md"),
    Benchmark("qlora_memory", "Full vs LoRA vs QLoRA (NF4 base): frozen-weight memory, step peak and step time, gpt2-medium",
              "experiments/qlora_memory/run.py", ["--device", "cuda", "--model", "gpt2-medium", "--steps", "10"],
              ["--smoke"], 40, "experiments/qlora_memory/README.md", needs=["torchao"]),
    Benchmark("dpo_memory", "DPO reference modes (copy / adapters off / precomputed): peak memory and step time, gpt2-medium",
              "experiments/dpo_memory/run.py", ["--device", "cuda", "--model", "gpt2-medium", "--steps", "5"],
              ["--smoke"], 40, "experiments/dpo_memory/README.md"),
    Benchmark("serve_load", "gptlab-serve under load: 1 and 16 concurrent clients, continuous batching vs one request at a time, gpt2-small",
              "experiments/serve_load/run.py",
              ["--device", "cuda", "--clients", "1,16", "--requests", "4,32", "--max-tokens", "32,96", "--rounds", "1"],
              ["--smoke"], 40, "experiments/serve_load/README.md", needs=["fastapi", "uvicorn"]),
    # without transformers/TRL on the machine the gptlab sides still run, the peer columns say why not
    Benchmark("peers", "gptlab vs a nanoGPT-style loop and TRL's RewardTrainer: training and reward-model steps (bf16)",
              "experiments/peers/run.py", ["--preset", "gpu", "--only", "train,reward"],
              ["--quick", "--only", "fwdbwd", "--no-peers", "--reps", "1"], 40, "experiments/peers/README.md"),
    # the DDP and FSDP code paths on one device (FSDP refuses a CPU): losses vs trainer=gpu, checkpoint resumed
    Benchmark("fsdp_ddp", "trainer=ddp / trainer=fsdp (FullShard) on one GPU vs trainer=gpu: losses, checkpoint, resume",
              "experiments/strategies/run.py", ["--steps", "5"], ["--smoke", "--steps", "2"], 45,
              "experiments/strategies/README.md"),
    # without TRL on the machine the gptlab side still runs, the TRL row says why not
    Benchmark("grpo_speed", "One GRPO step (generation + scoring + update), gptlab vs TRL's GRPOTrainer, gpt2-small, 8 prompts x 8",
              "experiments/grpo_speed/run.py",
              ["--device", "cuda", "--model", "gpt2-small", "--prompts", "8", "--G", "8", "--prompt-len", "64",
               "--new-tokens", "128", "--warmup", "1", "--steps", "2"],
              ["--smoke"], 40, "experiments/grpo_speed/README.md"),
]
SMOKE_CAP_S = 600
"""A smoke entry's cap: only a hang reaches it (the entries take seconds to a minute on 2 busy cores)."""


def missing_modules(names: list[str]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def bootstrap(site: Path) -> tuple[dict[str, str], list[str]]:
    """Install the wheels of missing modules into ``site``; the environment for the benchmarks
    (PYTHONPATH = site + this checkout) and a log of what was installed."""
    log: list[str] = []
    missing = missing_modules(list(WHEELS))
    wheels = [w for d in WHEEL_DIRS if d.is_dir() for w in sorted(d.glob("*.whl"))]
    picked = [w for mod in missing for w in wheels if w.name.lower().startswith(WHEELS[mod].lower() + "-")]
    if picked:
        site.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
               *map(str, picked)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        log.append(f"installed {', '.join(w.name for w in picked)} into {site}"
                   + ("" if res.returncode == 0 else f" (pip failed: {res.stderr.strip()[-500:]})"))
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    still = missing_modules(list(WHEELS))
    if still:
        log.append(f"not available (no wheel found in {', '.join(map(str, WHEEL_DIRS))}): {', '.join(still)}")
    env = dict(os.environ)
    paths = [str(site)] if picked else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env, log


def environment(smoke: bool) -> list[str]:
    """Device, versions and machine, as markdown bullet lines."""
    import torch

    lines = [f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}, python {platform.python_version()}"]
    if torch.cuda.is_available() and not smoke:
        p = torch.cuda.get_device_properties(0)
        lines.insert(0, f"- device: {torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB), "
                        f"driver CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible")
    else:
        lines.insert(0, f"- device: CPU ({os.cpu_count()} cores){' — smoke run: tiny shapes, not a measurement' if smoke else ''}")
    try:
        import lightning

        lines.append(f"- lightning {lightning.__version__}")
    except ImportError:
        pass
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        if rev:
            lines.append(f"- gptlab commit {rev}")
    except OSError:
        pass
    return lines


def run_benchmark(b: Benchmark, smoke: bool, env: dict[str, str], cap: float | None) -> dict:
    """Run one benchmark under its cap (None: none); its status, wall time, command and output."""
    args = b.smoke_args if smoke else b.gpu_args
    cmd = [sys.executable, str(ROOT / b.script), *args]
    shown = " ".join(["python", b.script, *map(shlex.quote, args)])
    absent = missing_modules(b.needs)
    if absent:
        return dict(status=f"skipped: {', '.join(absent)} not installed", wall=0.0, command=shown, output="")
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=cap)
        out, err, code = res.stdout, res.stderr, res.returncode
        status = "ok" if code == 0 else f"failed (exit code {code})"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        status = f"timed out after {cap:.0f} s"
    wall = time.perf_counter() - t0
    output = out.strip()
    if status != "ok":
        output += "\n\nstderr (last lines):\n```\n" + "\n".join(err.strip().splitlines()[-30:]) + "\n```"
    return dict(status=status, wall=wall, command=shown, output=output)


def section(b: Benchmark, r: dict) -> str:
    return "\n".join([f"## {b.name}: {b.title}", "", f"- command: `{r['command']}`",
                      f"- status: **{r['status']}**, wall time {r['wall']:.0f} s (cap {b.cap_s} s)",
                      f"- paste into: `{b.readme}`", "", r["output"] or "(no output)", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default: $OUT, else experiments/gpu_results)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the code paths, measures nothing")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names (see --list)")
    ap.add_argument("--list", action="store_true", help="print the registered benchmarks and exit")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all benchmarks together; 0 = no limit (default {TOTAL_BUDGET_S} on the GPU, "
                         "where one device call is capped; none with --smoke, whose benchmarks each have SMOKE_CAP_S)")
    ap.add_argument("--no-cap", action="store_true",
                    help="run every benchmark to its end, however long (no per-benchmark cap)")
    args = ap.parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:16s} cap {b.cap_s:4d} s  {b.title}")
        return 0
    chosen = BENCHMARKS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
        if unknown:
            ap.error(f"unknown benchmark(s) {unknown}; valid: {[b.name for b in BENCHMARKS]}")
        chosen = [b for b in BENCHMARKS if b.name in names]
    out = Path(args.out or os.environ.get("OUT") or ROOT / "experiments" / "gpu_results")
    out.mkdir(parents=True, exist_ok=True)

    env, boot_log = bootstrap(Path(tempfile.gettempdir()) / "gptlab-gpu-suite-site")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks would measure the CPU. Use --smoke to check the code paths.",
              file=sys.stderr)
        return 2
    header = ["# gptlab GPU results", "", *environment(args.smoke), *(f"- setup: {line}" for line in boot_log),
              f"- suite: `python experiments/gpu_suite.py{' --smoke' if args.smoke else ''}"
              f"{' --only ' + args.only if args.only else ''}`", ""]
    summary = ["| benchmark | status | wall (s) |", "|---|---|---:|"]
    sections = []
    started = time.perf_counter()
    budget = args.budget if args.budget is not None else (float("inf") if args.smoke else TOTAL_BUDGET_S)
    budget = budget if budget > 0 else float("inf")
    failures = 0
    for b in chosen:
        left = budget - (time.perf_counter() - started)
        own = None if args.no_cap else (b.smoke_cap_s or SMOKE_CAP_S) if args.smoke else b.cap_s
        limits = [x for x in (own, left) if x is not None and x != float("inf")]
        cap = min(limits) if limits else None
        if left < 5:  # no time left for a meaningful run
            r = dict(status="skipped: suite time budget used up (run it with --only)", wall=0.0,
                     command=" ".join(["python", b.script, *(b.smoke_args if args.smoke else b.gpu_args)]), output="")
        else:
            print(f"[gpu_suite] {b.name} ({'no cap' if cap is None else f'cap {cap:.0f} s'}) ...", flush=True)
            r = run_benchmark(b, args.smoke, env, cap)
            print(f"[gpu_suite] {b.name}: {r['status']} in {r['wall']:.0f} s", flush=True)
        failures += r["status"] != "ok"
        text = section(b, r)
        (out / f"{b.name}.md").write_text("\n".join(header) + "\n" + text)
        sections.append(text)
        summary.append(f"| {b.name} | {r['status']} | {r['wall']:.0f} |")
    combined = "\n".join([*header, *summary, "", *sections])
    (out / "gpu_results.md").write_text(combined)
    print(combined)
    print(f"[gpu_suite] wrote {len(chosen) + 1} files to {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
