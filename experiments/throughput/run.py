"""Training throughput: gptlab's pretraining path vs a plain book-style loop, same data and shapes.

    python experiments/throughput/run.py                      # CPU: gpt2-tiny-ish shape, a few steps
    python experiments/throughput/run.py --preset gpu         # GPU: gpt2-small, context 1024, batch 16, bf16, compile

Each side runs in its own subprocess (so peak memory is its own):
  gptlab     Hydra config -> RandomTokenDataModule -> PretrainTask -> Lightning Trainer (the real
             ``gptlab-train`` code path: ``gptlab.cli.train.train``), with whatever the preset enables
             (bf16-mixed, torch.compile, fused AdamW, padded vocab, TF32, SDPA).
  reference  the book's GPTModel (``reference.py``): materialised masked attention, fp32, unfused
             AdamW, no compile, a plain Python loop.
Both read identical batches (RandomTokenDataset) and report tokens/s over the timed steps (after
warm-up), MFU (FLOPs per token from the model shape, the device's peak looked up from its name),
step time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import peak_rss_mb  # noqa: E402

PRESETS = {
    # shapes: (model overrides, batch, steps, warmup)
    # CPU: small enough for a couple of minutes on 2 cores (the 50,257-row head dominates the cost)
    "cpu": dict(model="gpt2-tiny", overrides=dict(context_length=128, emb_dim=128, n_heads=4, n_layers=4),
                batch=4, steps=15, warmup=3, gptlab_args=["trainer=cpu"]),
    # smoke: the same code paths in seconds (experiments/gpu_suite.py --smoke; measures nothing)
    "smoke": dict(model="gpt2-tiny", overrides=dict(context_length=32), batch=2, steps=4, warmup=1, workers=0,
                  gptlab_args=["trainer=cpu"]),
    "gpu": dict(model="gpt2-small", overrides=dict(context_length=1024, drop_rate=0.0, pad_vocab_multiple=64),
                batch=16, steps=60, warmup=15,
                gptlab_args=["trainer=gpu", "compile=true", "float32_matmul_precision=high"]),
}


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


def progress_bar_overrides(refresh: int, log_every: int | None) -> list[str]:
    """Overrides for the progress bar and logging: ``refresh`` 0 = no bar; N = the bar refreshes
    (and reads the logged loss: a host sync on GPU) every N steps. ``log_every``: the loggers'
    interval (converting logged tensors to numbers: a sync), None = the trainer preset's."""
    out = [] if log_every is None else [f"trainer.log_every_n_steps={log_every}"]
    if refresh <= 0:
        return [*out, "trainer.enable_progress_bar=false"]
    return [*out, "trainer.enable_progress_bar=true", f"callbacks.progress_bar.refresh_rate={refresh}"]


def run_gptlab(p: dict) -> dict:
    from hydra import compose, initialize_config_dir

    from gptlab.cli import CONFIG_DIR, register_model_presets
    from gptlab.cli.train import train

    steps, warmup = p["steps"], p["warmup"]
    out = tempfile.mkdtemp(prefix="gptlab-throughput-")
    overrides = [f"model={p['model']}", *[f"model.{k}={v}" for k, v in p["overrides"].items()],
                 "data=random", f"data.batch_size={p['batch']}", f"data.num_workers={p.get('workers', 2)}",
                 "logger=none", f"paths.output_dir={out}", f"trainer.max_steps={steps}",
                 "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                 *progress_bar_overrides(p.get("progress_bar", 0), p.get("log_every")), "+trainer.enable_checkpointing=false",
                 "~callbacks.model_checkpoint", "~callbacks.step_checkpoint", "~callbacks.exception_checkpoint", "~callbacks.lr_monitor",
                 f"callbacks.throughput.log_every_n_steps={steps - warmup}",
                 f"+callbacks.throughput.skip_steps={warmup}", "task.sample_prompt=null", *p["gptlab_args"]]
    register_model_presets()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    try:
        metrics = train(cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() and "trainer=gpu" in p["gptlab_args"] else "cpu"
    return {"tokens_per_sec": metrics["throughput/tokens_per_sec"],
            "step_time_ms": metrics["throughput/step_time_ms"],
            "mfu": metrics.get("throughput/mfu"), "peak_mem_mb": peak_memory_mb(device)}


def run_reference(p: dict) -> dict:
    from reference import GPTModel

    from gptlab.callbacks import peak_flops
    from gptlab.data.synthetic import RandomTokenDataset
    from gptlab.model.config import GPTConfig
    from gptlab.model.gpt import GPT

    device = "cuda" if torch.cuda.is_available() and "trainer=gpu" in p["gptlab_args"] else "cpu"
    cfg = GPTConfig.from_name(p["model"], **{**p["overrides"], "pad_vocab_multiple": 1})
    torch.manual_seed(123)
    model = GPTModel(dict(vocab_size=cfg.vocab_size, context_length=cfg.context_length, emb_dim=cfg.emb_dim,
                          n_heads=cfg.n_heads, n_layers=cfg.n_layers, drop_rate=cfg.drop_rate,
                          qkv_bias=cfg.qkv_bias)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, foreach=False, fused=False)
    loader = torch.utils.data.DataLoader(RandomTokenDataset(10_000, cfg.context_length), batch_size=p["batch"],
                                         shuffle=True, drop_last=True,
                                         num_workers=p.get("workers", 2))
    with torch.device("meta"):
        fpt = GPT(cfg).flops_per_token(cfg.context_length)  # same formula and shape as the gptlab side
    it = iter(loader)
    model.train()
    for step in range(p["steps"]):
        if step == p["warmup"]:
            if device == "cuda":
                torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        batch = next(it)
        x, y = batch["input_ids"].to(device), batch["labels"].to(device)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= p["warmup"]:
            tokens += x.numel()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = tokens / dt
    peak = peak_flops(device, "32") if device == "cuda" else None
    return {"tokens_per_sec": tps, "step_time_ms": 1000 * dt / (p["steps"] - p["warmup"]),
            "mfu": tps * fpt / peak if peak else None, "peak_mem_mb": peak_memory_mb(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--progress-bar", type=int, default=0, metavar="N",
                    help="gptlab side: show the progress bar, refreshed every N steps; 0 = off")
    ap.add_argument("--log-every", type=int, default=None, metavar="N",
                    help="gptlab side: trainer.log_every_n_steps (default: the trainer preset's)")
    ap.add_argument("--only", choices=["gptlab", "reference"], help="run one side in this process, print RESULT json")
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"], p["warmup"] = args.steps, max(1, args.steps // 5)
    if args.batch:
        p["batch"] = args.batch
    p["progress_bar"], p["log_every"] = args.progress_bar, args.log_every
    if args.only:
        res = run_gptlab(p) if args.only == "gptlab" else run_reference(p)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for side in ("gptlab", "reference"):
        cmd = [sys.executable, __file__, "--preset", args.preset, "--only", side]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        cmd += ["--progress-bar", str(args.progress_bar)]
        if args.log_every:
            cmd += ["--log-every", str(args.log_every)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[side] = json.loads(line[-1][7:])
    dev = torch.cuda.get_device_name() if args.preset == "gpu" else f"CPU, {os.cpu_count()} cores"
    p_desc = f"{p['model']} {p['overrides']}, batch {p['batch']}, {p['steps'] - p['warmup']} timed steps"
    print(f"device: {dev}\nshape: {p_desc}\n")
    print("| implementation | tokens/s | MFU | step time (ms) | peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for side, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"| {side} | {r['tokens_per_sec']:,.0f} | {mfu} | {r['step_time_ms']:.1f} | {r['peak_mem_mb']:,.0f} |")
    g, ref = results["gptlab"], results["reference"]
    print(f"\ngptlab / reference: {g['tokens_per_sec'] / ref['tokens_per_sec']:.2f}x tokens/s, "
          f"{g['peak_mem_mb'] / ref['peak_mem_mb']:.2f}x peak memory")


if __name__ == "__main__":
    main()
