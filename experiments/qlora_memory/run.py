"""Full fine-tuning vs LoRA vs QLoRA: model memory, peak training memory and step time, same batch.

    python experiments/qlora_memory/run.py                          # CPU: gpt2-medium shape, batch 4 x 128
    python experiments/qlora_memory/run.py --model gpt2-large --modes lora qlora
    python experiments/qlora_memory/run.py --device cuda            # GPU: gpt2-medium and gpt2-large, batch 8 x 256
    python experiments/qlora_memory/run.py --smoke                  # tiny shapes on CPU, seconds: checks the script

The setting is the book's appendix E scaled up: a GPT whose LM head is replaced by a 2-class
``nn.Linear``, trained with AdamW on the last token's logits.
- full: every parameter trains.
- lora: every base weight frozen (fp32), rank-16 LoRA on q, k, v, attention output, both MLP layers, head.
- qlora: the same LoRA, with the frozen block linear weights stored in 4-bit NF4 (torchao, blocks of
  64, double-quantized scales in groups of 256); compute dtype float32 on CPU, bfloat16 on CUDA.

Each configuration runs in its own subprocess (a process's peak RSS never goes down). Reported:
- weight bytes, counted: the bytes every parameter occupies (NF4: codes + scales + factors), split
  into frozen and trainable; and the frozen block linears alone against their fp32 size.
- CPU: RSS after building the model and optimizer (model memory, above the bare process), and the
  peak RSS of the training steps alone (the high-water mark is reset via /proc/self/clear_refs after
  the build: building a QLoRA model briefly holds the fp32 weights, as loading any checkpoint does,
  but a GPU only ever receives the 4-bit ones). glibc is told to return freed blocks to the OS
  (MALLOC_MMAP_THRESHOLD_), so freed fp32 weights do not linger in the RSS.
- CUDA: ``torch.cuda.memory_allocated`` after moving the model and ``max_memory_allocated`` of the steps.
Random weights and tokens in the GPT-2 shapes: neither time nor memory depends on their values.
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
from gptlab.model.qlora import apply_qlora, frozen_linear_bytes, nf4_module, nf4_nbytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name, malloc_trim, proc_status_mb, reset_peak_rss  # noqa: E402

MODES = ("full", "lora", "qlora")
SMOKE_SHAPE = dict(vocab_size=512, context_length=64, emb_dim=128, n_heads=4, n_layers=2)  # quantizes with 64 / 256


def build(args: argparse.Namespace) -> GPT:
    """The model of ``args.mode``: GPT-2 shape, 2-class head, adapter applied."""
    overrides = dict(drop_rate=0.0, context_length=max(args.seq, 64))
    config = GPTConfig(**{**GPTConfig.from_name("gpt2-tiny").to_dict(), **SMOKE_SHAPE, **overrides}) if args.smoke \
        else GPTConfig.from_name(args.model, **overrides)
    model = GPT(config)
    model.out_head = nn.Linear(config.emb_dim, 2)  # the classifier head of appendix E
    adapter = dict(rank=args.rank, alpha=args.rank, scaling="plain")  # appendix E's LoRA
    if args.mode == "lora":
        apply_lora(model, **adapter)
    elif args.mode == "qlora":
        apply_qlora(model, **adapter, block_size=64, scaler_block_size=256,
                    compute_dtype="bfloat16" if args.device.startswith("cuda") else "float32")
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the parameters occupy (an NF4 weight: its codes, scales and factors), frozen and trainable."""
    frozen = sum(nf4_nbytes(p) for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    linears_stored, linears_fp32 = frozen_linear_bytes(model)  # (0, 0) without (Q)LoRA
    return {"frozen_bytes": frozen, "trainable_bytes": trainable, "frozen_linear_bytes": linears_stored,
            "frozen_linear_fp32_bytes": linears_fp32}


def worker(args: argparse.Namespace) -> dict:
    """Build the model, run warm-up + timed training steps, return the measurements."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.mode == "qlora":
        nf4_module()  # torchao's import (~20 MiB of code) is not model memory
    rss_bare = proc_status_mb("VmRSS")
    model = build(args)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)
    x = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x)[:, -1, :].float(), y)  # last token's logits, as in ch06
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    malloc_trim()
    out = {"mode": args.mode, "trainable": trainable_parameters(model), "total": model.num_params(),
           **weight_bytes(model)}
    if cuda:
        torch.cuda.synchronize()
        out["model_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        out["model_mb"] = proc_status_mb("VmRSS") - rss_bare
        out["rss_after_build_mb"] = proc_status_mb("VmRSS")
        out["peak_build_mb"] = proc_status_mb("VmHWM")
        reset_peak_rss()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(times)
    out["tokens_per_s"] = args.batch * args.seq / out["step_s"]
    if cuda:
        out["peak_step_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device"] = torch.cuda.get_device_name()
    else:
        out["peak_step_mb"] = proc_status_mb("VmHWM")
        out["device"] = f"{cpu_name()}, {args.threads} threads"
    return out


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--rank",
           str(args.rank), "--device", args.device, "--threads", str(args.threads)] + (["--smoke"] if args.smoke else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(args: argparse.Namespace, results: dict[str, dict]) -> str:
    modes = list(results)
    gpu = args.device.startswith("cuda")
    first = results[modes[0]]
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731

    def row(label: str, fmt) -> str:
        return f"| {label} | " + " | ".join(fmt(results[m]) for m in modes) + " |"

    lines = [f"{'smoke shape' if args.smoke else args.model} ({first['total']:,} parameters), 2-class head, batch "
             f"{args.batch} x {args.seq} tokens, AdamW, LoRA rank {args.rank} on every linear layer; {first['device']}; "
             f"torch {torch.__version__}; median of {args.steps} steps after {args.warmup} warm-up", "",
             "| | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    lines.append(row("trainable parameters", lambda r: f"{r['trainable']:,}"))
    lines.append(row("frozen weight bytes (counted)", lambda r: mib(r["frozen_bytes"])))
    lines.append(row("frozen block linears vs fp32", lambda r: (f"{r['frozen_linear_bytes'] / r['frozen_linear_fp32_bytes']:.3f}x"
                                                               if r["frozen_linear_fp32_bytes"] else "-")))
    lines.append(row("model memory " + ("(allocated)" if gpu else "(RSS above the bare process)"),
                     lambda r: f"{r['model_mb']:,.0f} MiB"))
    lines.append(row("peak memory of the steps " + ("(max allocated)" if gpu else "(peak RSS)"),
                     lambda r: f"{r['peak_step_mb']:,.0f} MiB"))
    lines.append(row("step time (median)", lambda r: f"{r['step_s']:.3f} s"))
    lines.append(row("tokens / s", lambda r: f"{r['tokens_per_s']:,.0f}"))
    if "lora" in results and "qlora" in results:
        lo, q = results["lora"], results["qlora"]
        lines += ["", f"QLoRA vs LoRA: frozen weights {q['frozen_bytes'] / lo['frozen_bytes']:.3f}x, frozen block "
                      f"linears {q['frozen_linear_bytes'] / lo['frozen_linear_bytes']:.3f}x, model memory "
                      f"{q['model_mb'] / lo['model_mb']:.2f}x, step peak {q['peak_step_mb'] / lo['peak_step_mb']:.2f}x, "
                      f"step time {q['step_s'] / lo['step_s']:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--model", default=None, help="preset (default: gpt2-medium)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: 4 CPU, 8 CUDA)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 128 CPU, 256 CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step each, CPU: checks the script in seconds")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON results here")
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if args.smoke:
        args.device, args.batch, args.seq, args.steps = "cpu", args.batch or 2, args.seq or 32, args.steps or 1
    args.model = args.model or "gpt2-medium"
    args.batch = args.batch or (8 if cuda else 4)
    args.seq = args.seq or (256 if cuda else 128)
    args.steps = args.steps or (20 if cuda else 3)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = {mode: run_mode(args, mode) for mode in args.modes}
    print(markdown(args, results))
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
