"""DPO reference modes: peak memory and step time of one DPO training step, same model, same batch.

    python experiments/dpo_memory/run.py                  # CPU: gpt2-small shape, 4 pairs x 128 tokens
    python experiments/dpo_memory/run.py --device cuda    # GPU: gpt2-medium, 8 pairs x 256 tokens, bf16 autocast
    python experiments/dpo_memory/run.py --smoke          # seconds: gpt2-tiny, to check the script

Runs ``gptlab.tasks.dpo.DPOTask``'s own training path (``pair_metrics`` -> backward -> AdamW) for
five set-ups, each in its own subprocess so one's peak memory cannot hide another's:

* full fine-tuning with the reference as a frozen ``copy`` (the book) or ``precomputed``;
* LoRA (rank 16 on every linear layer but the head) with a ``copy``, ``adapters_off`` (the
  policy itself with LoRA switched off) or ``precomputed``.

The precomputed log-probs are computed once before the timed steps (by the starting policy, as
the task does before training) and looked up per step; the time of that one pass is reported
per pair. CPU memory is the process's peak RSS (``ru_maxrss``; includes Python, torch and the
weights); on CUDA it is ``torch.cuda.max_memory_allocated``. Random weights and tokens.
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

from gptlab.model.config import GPTConfig
from gptlab.tasks.dpo import DPOTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name, peak_rss_mb, rss_mb  # noqa: E402

SETUPS = [("full", "copy"), ("full", "precomputed"), ("lora", "copy"), ("lora", "adapters_off"),
          ("lora", "precomputed")]
LORA = dict(name="lora", rank=16, alpha=16, targets=["q", "k", "v", "attn_proj", "mlp_fc", "mlp_proj"])


def make_batch(pairs: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random pairs: the first half of every row is the (masked) prompt, the second the response."""
    gen = torch.Generator().manual_seed(0)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, 50257, (pairs, seq), generator=gen)
        labels = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
        labels[:, : seq // 2] = -100
        batch[f"{side}_input_ids"], batch[f"{side}_labels"] = ids.to(device), labels.to(device)
    batch["index"] = torch.arange(pairs)
    return batch


def worker(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = GPTConfig.from_name(args.model, drop_rate=0.0, context_length=max(args.seq, 64)).to_dict()
    task = DPOTask(model=model, adapter=LORA if args.policy == "lora" else None, reference=args.reference,
                   logp_reduction="sum")
    task.setup("fit")  # the copy mode builds its frozen reference here
    task.to(device).train()
    batch = make_batch(args.pairs, args.seq, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    precompute_s = None
    if args.reference == "precomputed":  # what DPOTask does once before training, for this batch
        t0 = time.perf_counter()
        with autocast:
            c, r = task.starting_pair_logps(batch)
        if cuda:
            torch.cuda.synchronize()
        precompute_s = (time.perf_counter() - t0) / args.pairs
        task.ref_logps["train"] = {"chosen": c.float().cpu(), "rejected": r.float().cpu()}
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.01)

    def step() -> None:
        with autocast:
            loss = task.pair_metrics(batch, "train")["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_mb()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out = {"policy": args.policy, "reference": args.reference, "trainable": sum(p.numel() for p in params),
           "total": task.model.num_params(), "step_s": statistics.median(times), "precompute_s_per_pair": precompute_s,
           "reference_params": task.reference_model.num_params() if task.reference_model is not None else 0}
    if cuda:
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["device"] = torch.cuda.get_device_name()
    else:
        out["peak_mb"] = peak_rss_mb()
        out["rss_before_steps_mb"] = rss_before
        out["device"] = f"{cpu_name()}, {args.threads} threads"
    return out


def run_setup(args: argparse.Namespace, policy: str, reference: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--policy", policy, "--reference", reference, "--model", args.model,
           "--pairs", str(args.pairs), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--device", args.device, "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0:
        raise RuntimeError(f"{policy}/{reference} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def markdown(args: argparse.Namespace, results: list[dict]) -> str:
    cuda = args.device.startswith("cuda")
    mem = "peak GPU memory allocated" if cuda else "peak RSS"
    base = results[0]
    lines = [f"{args.model} ({base['total']:,} parameters), {args.pairs} pairs x {args.seq} tokens (one forward of "
             f"{2 * args.pairs} sequences), sum log-probs, AdamW; LoRA rank 16 on every linear layer but the head; "
             f"{base['device']}; torch {torch.__version__}"
             + ("; bf16 autocast" if cuda else "") + f"; median of {args.steps} steps after {args.warmup} warm-up",
             "", f"| policy | reference | trainable | reference weights | step time | {mem} | vs full + copy |"
             + ("" if cuda else " RSS added by the steps |"),
             "|---|---|---:|---:|---:|---:|---:|" + ("" if cuda else "---:|")]
    for r in results:
        row = (f"| {r['policy']} | {r['reference']} | {r['trainable']:,} | {r['reference_params']:,} | "
               f"{r['step_s']:.3f} s | {r['peak_mb']:,.0f} MiB | {r['peak_mb'] / base['peak_mb']:.2f}x mem, "
               f"{base['step_s'] / r['step_s']:.2f}x speed |")
        if not cuda:
            row += f" {r['peak_mb'] - r['rss_before_steps_mb']:,.0f} MiB |"
        lines.append(row)
    pre = [r["precompute_s_per_pair"] for r in results if r["precompute_s_per_pair"] is not None]
    if pre:
        lines += ["", f"precomputed: the one pass before training costs {statistics.mean(pre) * 1000:.1f} ms per pair "
                      f"(a reference forward of its two sequences)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--model", default=None, help="preset (default: gpt2-small on CPU, gpt2-medium on CUDA)")
    ap.add_argument("--pairs", type=int, default=None, help="preference pairs per batch (default: 4 CPU, 8 CUDA)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 128 CPU, 256 CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 CPU, 10 CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="gpt2-tiny, 2 pairs x 32 tokens, 1 step, 1 thread")
    ap.add_argument("--only", default=None, help="comma-separated policy/reference set-ups, e.g. lora/adapters_off")
    ap.add_argument("--policy", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--reference", choices=["copy", "adapters_off", "precomputed"], help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    if args.smoke:
        args.model, args.pairs, args.seq, args.steps, args.threads = "gpt2-tiny", 2, 32, 1, 1
    args.model = args.model or ("gpt2-medium" if cuda else "gpt2-small")
    args.pairs = args.pairs or (8 if cuda else 4)
    args.seq = args.seq or (256 if cuda else 128)
    args.steps = args.steps or (10 if cuda else 3)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    setups = SETUPS
    if args.only:
        wanted = {tuple(s.split("/")) for s in args.only.split(",")}
        setups = [s for s in SETUPS if s in wanted]
    print(markdown(args, [run_setup(args, *s) for s in setups]))


if __name__ == "__main__":
    main()
