"""Big corpora: tokenization speed, data-loader capacity, and step time with real vs synthetic batches.

    python experiments/tokenize_corpus/run.py                                 # the Gutenberg folder
    python experiments/tokenize_corpus/run.py --corpus ~/books --steps 40 --threads 1,8

1. Tokenize the corpus into a memory-mapped uint16 token file with
   ``gptlab.data.pretrain.build_token_file`` (``force=True``: really tokenized, not reused), once per
   ``--threads`` setting; tokens/s and MB/s of text.
2. The training loader alone (``PretrainDataModule`` on that file, ``--workers`` workers): how many
   tokens/s it can hand out, against the 500k tokens/s a GPU run is aimed at.
3. The same tiny model trained through ``gptlab-train``'s code path on the real memory-mapped data
   (``data=gutenberg``) and on synthetic batches (``data=random``), same shapes and workers: the
   step times must match, or the data path is starving the device.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gutenberg"


def tokenize(corpus: Path, cache_dir: Path, threads: int) -> tuple[float, int, int]:
    """(seconds, tokens, characters' bytes) of one full tokenization with ``threads`` threads."""
    from gptlab.data.pretrain import build_token_file, resolve_sources

    files = resolve_sources(corpus)
    nbytes = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    path = build_token_file(files, cache_dir=cache_dir, strip_gutenberg=True, num_threads=threads, force=True)
    dt = time.perf_counter() - t0
    return dt, os.path.getsize(path) // 2, nbytes


def loader_capacity(corpus: Path, cache_dir: Path, max_length: int, batch: int, workers: int,
                    n_batches: int) -> float:
    """Tokens/s the training DataLoader delivers on its own (memory-mapped windows, ``workers``)."""
    from gptlab.data.pretrain import PretrainDataModule

    dm = PretrainDataModule(path=str(corpus), max_length=max_length, batch_size=batch, num_workers=workers,
                            memmap=True, cache_dir=str(cache_dir), strip_gutenberg=True)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # workers started
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):
        tokens += next(it)["input_ids"].numel()
    return tokens / (time.perf_counter() - t0)


def step_time(data_overrides: list[str], args: argparse.Namespace, out: Path) -> dict[str, float]:
    """Train ``args.steps`` steps of the tiny model through ``gptlab.cli.train.train``; the
    ThroughputMonitor's tokens/s and step time over the steps after ``args.warmup``."""
    from hydra import compose, initialize_config_dir

    from gptlab.cli import CONFIG_DIR, register_model_presets
    from gptlab.cli.train import train

    timed = args.steps - args.warmup
    overrides = ["model=gpt2-tiny", f"model.context_length={args.max_length}", "trainer=cpu",
                 *data_overrides, f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
                 "logger=none", f"paths.output_dir={out}", f"trainer.max_steps={args.steps}",
                 "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                 "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false",
                 "~callbacks.model_checkpoint", "~callbacks.step_checkpoint", "~callbacks.exception_checkpoint",
                 "~callbacks.lr_monitor",
                 f"callbacks.throughput.log_every_n_steps={timed}", f"+callbacks.throughput.skip_steps={args.warmup}",
                 "task.sample_prompt=null"]
    register_model_presets()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = train(cfg)
    return {"tokens_per_sec": metrics["throughput/tokens_per_sec"], "step_time_ms": metrics["throughput/step_time_ms"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a folder of .txt files (or one file)")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="tokenizer thread counts to time")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--loader-batches", type=int, default=2000)
    args = ap.parse_args()
    if not args.corpus.exists():
        raise SystemExit(f"--corpus {args.corpus}: no such file or folder")
    tmp = Path(tempfile.mkdtemp(prefix="gptlab-tokenize-"))
    cache_dir = tmp / "tokens"  # never beside the corpus: the shared folder stays untouched

    try:
        rows = []
        for threads in [int(t) for t in args.threads.split(",")]:
            dt, n_tokens, nbytes = tokenize(args.corpus, cache_dir, threads)
            rows.append((threads, dt, n_tokens, nbytes))
        cap = loader_capacity(args.corpus, cache_dir, args.max_length, args.batch, args.workers, args.loader_batches)
        # the GPU benchmark's shape (gpt2-small, experiments/throughput --preset gpu): 16 x 1024 tokens
        cap_gpu = loader_capacity(args.corpus, cache_dir, 1024, 16, args.workers, max(1, args.loader_batches // 16))
        real = step_time(["data=gutenberg", f"data.path={args.corpus}", f"data.cache_dir={cache_dir}"], args,
                         tmp / "real")
        synthetic = step_time(["data=random"], args, tmp / "synthetic")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\ncorpus: {args.corpus} ({rows[0][3] / 2**20:.1f} MiB of text, {rows[0][2]:,} tokens); "
          f"CPU: {os.cpu_count()} cores, torch {torch.__version__}\n")
    print("| tokenizer threads | time (s) | tokens/s | MiB of text/s |")
    print("|---:|---:|---:|---:|")
    for threads, dt, n_tokens, nbytes in rows:
        print(f"| {threads} | {dt:.1f} | {n_tokens / dt:,.0f} | {nbytes / 2**20 / dt:.1f} |")
    print(f"\ntraining loader alone ({args.workers} workers, memory-mapped): {cap:,.0f} tokens/s at batch "
          f"{args.batch} x {args.max_length}, {cap_gpu:,.0f} tokens/s at batch 16 x 1024")
    print(f"\nstep time, gpt2-tiny (context {args.max_length}), batch {args.batch}, {args.workers} workers, "
          f"{args.steps - args.warmup} timed steps:\n")
    print("| data | step time (ms) | tokens/s |")
    print("|---|---:|---:|")
    for name, r in (("Gutenberg, memory-mapped (data=gutenberg)", real), ("synthetic (data=random)", synthetic)):
        print(f"| {name} | {r['step_time_ms']:.1f} | {r['tokens_per_sec']:,.0f} |")
    print(f"\nreal / synthetic step time: {real['step_time_ms'] / synthetic['step_time_ms']:.2f}")


if __name__ == "__main__":
    main()
