"""Batch-1 decoding speed: gptlab's KV-cache generation vs recomputing the whole sequence each step.

    python experiments/generation_speed/run.py                       # gpt2-small shape, CPU (and GPU if present)
    python experiments/generation_speed/run.py --model gpt2-tiny --new-tokens 200
    python experiments/generation_speed/run.py --devices cuda --compile   # + static cache, torch.compile, CUDA graph

Random weights (speed does not depend on them). Greedy decoding, so every path produces the same
tokens; the script checks that they do. Paths:
  dynamic cache   ``generate(model, ids, n)``: prefill the prompt once, then one token per step,
                  attending to the keys/values written so far
  static cache    ``static_cache=True``: the same, attending over the whole preallocated cache with a
                  mask, so every step has the same shapes
  compiled        ``compile=True``: the static-cache step through ``torch.compile`` (a CUDA graph on GPU)
  recompute       ``use_kv_cache=False``: the whole sequence through the model at every step
Tokens/s count the new tokens over the whole call (prefill included), best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptlab import GPT, GPTConfig, generate


def bench(model: GPT, prompt: torch.Tensor, new_tokens: int, repeats: int, **kwargs) -> tuple[float, torch.Tensor]:
    generate(model, prompt, 4, **kwargs)  # warm-up (allocator, kernels; compilation when compile=True)
    best = float("inf")
    for _ in range(repeats):
        if prompt.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt, new_tokens, **kwargs)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return new_tokens * prompt.size(0) / best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (tokens/s counts all rows)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--compile", action="store_true", help="also time the compiled static-cache path")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and cache")
    args = ap.parse_args()
    torch.manual_seed(0)
    paths = {"dynamic cache": dict(), "static cache": dict(static_cache=True)}
    if args.compile:
        paths["compiled"] = dict(compile=True)
    paths["recompute"] = dict(use_kv_cache=False)
    rows = []
    for dev in args.devices.split(","):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        model = GPT(GPTConfig.from_name(args.model, drop_rate=0.0)).to(dev, getattr(torch, args.dtype)).eval()
        prompt = torch.randint(0, 50257, (args.batch, args.prompt_len), device=dev)
        results = {name: bench(model, prompt, args.new_tokens, args.repeats, **kw) for name, kw in paths.items()}
        ref = results["dynamic cache"][1]
        same = all(torch.equal(out, ref) for _, out in results.values())
        name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        rows.append((name, {k: v[0] for k, v in results.items()}, same))
    print(f"\n{args.model}, {args.dtype}, batch {args.batch}, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; tokens/s:\n")
    names = list(paths)
    print("| device | " + " | ".join(names) + " | KV cache / recompute | same tokens |")
    print("|---|" + "---:|" * len(names) + "---:|---|")
    for dev_name, tps, same in rows:
        best = max(v for k, v in tps.items() if k != "recompute")
        cells = " | ".join(f"{tps[k]:,.1f}" for k in names)
        print(f"| {dev_name} | {cells} | {best / tps['recompute']:.1f}x | {same} |")


if __name__ == "__main__":
    main()
