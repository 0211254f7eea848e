"""Batch-1 decoding speed: gptlab's KV-cache generation vs recomputing the whole sequence each step.

    python experiments/generation_speed/run.py                       # gpt2-small shape, CPU (and GPU if present)
    python experiments/generation_speed/run.py --model gpt2-tiny --new-tokens 200

Random weights (speed does not depend on them). Greedy decoding, so both paths produce the same
tokens; the script checks that they do.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptlab import GPT, GPTConfig, generate


def bench(model: GPT, prompt: torch.Tensor, new_tokens: int, use_kv_cache: bool, repeats: int) -> tuple[float, torch.Tensor]:
    generate(model, prompt, 4, use_kv_cache=use_kv_cache)  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        if prompt.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt, new_tokens, use_kv_cache=use_kv_cache)
        if prompt.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--devices", default="cpu,cuda")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for dev in args.devices.split(","):
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        model = GPT(GPTConfig.from_name(args.model, drop_rate=0.0)).to(dev).eval()
        prompt = torch.randint(0, 50257, (1, args.prompt_len), device=dev)
        fast, a = bench(model, prompt, args.new_tokens, True, args.repeats)
        slow, b = bench(model, prompt, args.new_tokens, False, args.repeats)
        same = torch.equal(a, b)
        name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        rows.append((name, args.model, fast, slow, fast / slow, same))
    print(f"| device | model | KV cache tok/s | recompute tok/s | speed-up | same tokens |")
    print("|---|---|---:|---:|---:|---|")
    for name, m, fast, slow, ratio, same in rows:
        print(f"| {name} | {m} | {fast:,.1f} | {slow:,.1f} | {ratio:.1f}x | {same} |")


if __name__ == "__main__":
    main()
