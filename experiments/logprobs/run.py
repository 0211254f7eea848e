"""Per-token log-probs of the chosen tokens: which formula is leaner? (issue 21)

    python experiments/logprobs/run.py                 # vocab 50,257 x batch 8 x 512 tokens, fp32, CPU
    python experiments/logprobs/run.py --smoke         # tiny shapes: checks the script in seconds

DPO, the reward model's evaluation, PPO rollouts and GRPO all need log π(token) for the tokens a
sequence holds: ``logits`` (B, T, V) and ``labels`` (B, T) -> (B, T), 0 where the label is the ignore
index (-100). Three ways to write it:

* ``cross_entropy``: ``-F.cross_entropy(logits.view(-1, V), labels.view(-1), reduction="none")``
  (gptlab's DPO before issue 21);
* ``log_softmax_gather``: ``log_softmax(logits, -1).gather(-1, labels)`` (gptlab's PPO rollouts
  before issue 21);
* ``logsumexp_gather``: ``logits.gather(-1, labels) - logsumexp(logits, -1)`` (TRL's
  ``selective_log_softmax`` for float32).

Each (formula, pass) runs in its own subprocess, so one's peak memory cannot hide another's; the
rounds interleave the formulas (A/B/C, B/C/A, C/A/B, ...) so a load change on the machine hits them
all alike. Memory: the peak resident set size during the call (``VmHWM`` after resetting it) minus
the resident set before it: what the call itself added on top of the logits. Time: wall clock of
each call; ratios are taken against ``cross_entropy`` of the same round.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name, load_average, malloc_trim, proc_status_mb, reset_peak_rss, rss_mb  # noqa: E402

IGNORE = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T), ignore_index=IGNORE,
                          reduction="none")
    return -nll.view(B, T)


def log_softmax_gather(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ignored = labels == IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).masked_fill(ignored, 0.0)


def logsumexp_gather(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    ignored = labels == IGNORE
    chosen = logits.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1).float()
    return (chosen - torch.logsumexp(logits.float(), dim=-1)).masked_fill(ignored, 0.0)


FORMULAS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": cross_entropy, "log_softmax_gather": log_softmax_gather, "logsumexp_gather": logsumexp_gather}
PASSES = ("forward", "forward+backward")


def inputs(batch: int, seq: int, vocab: int, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (B, T, V) float32 and labels (B, T) whose first quarter is ignored (a prompt)."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, seq, vocab, generator=gen) * 2).requires_grad_(grad)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[:, : seq // 4] = IGNORE
    return logits, labels


def child(args: argparse.Namespace) -> None:
    """Measure one formula and pass: ``args.reps`` calls; print one JSON line."""
    torch.set_num_threads(args.threads)
    fn, backward = FORMULAS[args.formula], args.pass_ == "forward+backward"
    logits, labels = inputs(args.batch, args.seq, args.vocab, backward)
    times, extra = [], []
    for _ in range(args.warmup + args.reps):
        gc.collect()
        malloc_trim()
        reset_peak_rss()
        before = rss_mb()
        start = time.perf_counter()
        if backward:
            fn(logits, labels).sum().backward()
        else:
            with torch.no_grad():
                fn(logits, labels)
        elapsed = time.perf_counter() - start
        peak = proc_status_mb("VmHWM")
        logits.grad = None
        times.append(elapsed)
        extra.append(peak - before)
    print(json.dumps({"formula": args.formula, "pass": args.pass_, "times": times[args.warmup:],
                      "extra_mb": max(extra), "logits_mb": logits.numel() * 4 / 2**20}))


def agreement(vocab: int) -> float:
    """Largest |difference| between the formulas (forward and input gradient) on a small batch."""
    logits, labels = inputs(2, 32, vocab, True)
    outs, grads = [], []
    for fn in FORMULAS.values():
        out = fn(logits, labels)
        (grad,) = torch.autograd.grad(out.sum(), logits)
        outs.append(out.detach())
        grads.append(grad)
    diffs = [(o - outs[0]).abs().max() for o in outs] + [(g - grads[0]).abs().max() for g in grads]
    return float(max(diffs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one subprocess per formula and pass)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per subprocess")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="batch 2 x 16 tokens x vocab 1,000, 1 round")
    ap.add_argument("--child", choices=list(FORMULAS))
    ap.add_argument("--pass", dest="pass_", choices=PASSES)
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.seq, args.vocab, args.rounds, args.reps = 2, 16, 1000, 1, 2
    if args.child:
        args.formula = args.child
        child(args)
        return

    names = list(FORMULAS)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for pass_ in PASSES:
            for name in order:
                cmd = [sys.executable, __file__, "--child", name, "--pass", pass_, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--vocab", str(args.vocab), "--reps", str(args.reps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                results.setdefault((name, pass_), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds} {pass_:<17} {name:<19} done", file=sys.stderr, flush=True)

    logits_mb = results[(names[0], PASSES[0])][0]["logits_mb"]
    print(f"\n{cpu_name()}, torch {torch.__version__}, {args.threads} threads; load average {load_average()} "
          f"(after the runs)")
    print(f"logits ({args.batch}, {args.seq}, {args.vocab}) float32 = {logits_mb:,.0f} MiB; {args.rounds} interleaved "
          f"rounds x {args.reps} timed calls (after {args.warmup} warm-up) per formula and pass")
    print(f"largest |difference| between the formulas (values and gradients): {agreement(args.vocab):.2e}\n")
    print("| pass | formula | peak extra memory (MiB) | time per call, s (min / median / max) | time / cross_entropy "
          "(min / median / max over rounds) |")
    print("|---|---|---:|---|---|")
    for pass_ in PASSES:
        for name in names:
            runs = results[(name, pass_)]
            times = [t for run in runs for t in run["times"]]
            ratios = [statistics.median(run["times"]) / statistics.median(ref["times"])
                      for run, ref in zip(runs, results[("cross_entropy", pass_)])]
            mem = max(run["extra_mb"] for run in runs)
            print(f"| {pass_} | `{name}` | {mem:,.0f} | {min(times):.3f} / {statistics.median(times):.3f} / "
                  f"{max(times):.3f} | {min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f} |")


if __name__ == "__main__":
    main()
