"""Full fine-tuning vs LoRA: training step time and peak memory, same model, same batch.

    python experiments/lora_vs_full/run.py                               # CPU: gpt2-small shape, batch 8 x 128
    python experiments/lora_vs_full/run.py --model gpt2-tiny --steps 2   # a quick check
    python experiments/lora_vs_full/run.py --device cuda                 # GPU: gpt2-medium, batch 8 x 256

The setting is the book's appendix E: a GPT whose head is replaced by a 2-class ``nn.Linear``, trained
with AdamW on the last token's logits. "full" trains every parameter; "lora" freezes them and trains
rank-16 LoRA on every linear layer (the head included). Each mode runs in its own subprocess, so
the CPU peak memory (``ru_maxrss``) of one does not hide the other's; on CUDA the peak is
``torch.cuda.max_memory_allocated``. Random weights and tokens: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import GPT, GPTConfig
from gptlab.model.lora import apply_lora, trainable_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name, peak_rss_mb, rss_mb  # noqa: E402


def worker(args: argparse.Namespace) -> dict:
    """Build the model, run warm-up + timed training steps, return the measurements."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = GPT(GPTConfig.from_name(args.model, drop_rate=0.0, context_length=max(args.seq, 64)))
    model.out_head = nn.Linear(model.config.emb_dim, 2)  # the classifier head of appendix E
    if args.mode == "lora":
        apply_lora(model, rank=args.rank, alpha=args.rank, scaling="plain")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)
    x = torch.randint(0, 50257, (args.batch, args.seq), device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x)[:, -1, :].float(), y)  # last token's logits, as in ch06
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mb()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out = {
        "mode": args.mode,
        "trainable": trainable_parameters(model),
        "total": model.num_params(),
        "step_s": statistics.median(times),
        "tokens_per_s": args.batch * args.seq / statistics.median(times),
    }
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device"] = torch.cuda.get_device_name()
    else:
        out["peak_mb"] = peak_rss_mb()
        out["rss_before_train_mb"] = rss_before
        out["device"] = f"{cpu_name()}, {args.threads} threads"
    return out


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank",
           str(args.rank), "--device", args.device, "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(args: argparse.Namespace, full: dict, lora: dict) -> str:
    mem = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS"
    rows = [
        ("trainable parameters", f"{full['trainable']:,}", f"{lora['trainable']:,}",
         f"{lora['trainable'] / full['trainable']:.2%}"),
        ("step time (median)", f"{full['step_s']:.3f} s", f"{lora['step_s']:.3f} s",
         f"{full['step_s'] / lora['step_s']:.2f}x faster"),
        ("tokens / s", f"{full['tokens_per_s']:,.0f}", f"{lora['tokens_per_s']:,.0f}",
         f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}x"),
        (mem, f"{full['peak_mb']:,.0f} MiB", f"{lora['peak_mb']:,.0f} MiB",
         f"{lora['peak_mb'] / full['peak_mb']:.2f}x ({full['peak_mb'] - lora['peak_mb']:,.0f} MiB less)"),
    ]
    if "rss_before_train_mb" in full:
        f_inc, l_inc = (d["peak_mb"] - d["rss_before_train_mb"] for d in (full, lora))
        rows.append(("peak RSS - RSS after model build", f"{f_inc:,.0f} MiB", f"{l_inc:,.0f} MiB",
                     f"{l_inc / f_inc:.2f}x"))
    lines = [f"{args.model} ({full['total']:,} parameters), 2-class head, batch {args.batch} x {args.seq} tokens, "
             f"AdamW, LoRA rank {args.rank} on every linear layer; {full['device']}; torch {torch.__version__}; "
             f"median of {args.steps} steps after {args.warmup} warm-up",
             "", "| | full fine-tuning | LoRA | LoRA vs full |", "|---|---:|---:|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--model", default=None, help="preset (default: gpt2-small on CPU, gpt2-medium on CUDA)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 128 CPU, 256 CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    args.model = args.model or ("gpt2-medium" if cuda else "gpt2-small")
    args.seq = args.seq or (256 if cuda else 128)
    args.steps = args.steps or (20 if cuda else 3)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    full, lora = run_mode(args, "full"), run_mode(args, "lora")
    print(markdown(args, full, lora))


if __name__ == "__main__":
    main()
