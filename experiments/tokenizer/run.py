"""Your own tokenizer, measured: training time (Hugging Face ``tokenizers`` through ``gptlab-tokenizer``
vs the book's chapter-2 BPE from scratch), encode throughput and tokens per character (the trained
BPE vs GPT-2's, both through tiktoken), and a short pretraining run of the same model with each,
compared in bits per character at equal characters seen.

    python experiments/tokenizer/run.py                                  # everything (about an hour on 2 CPU cores)
    python experiments/tokenizer/run.py --skip-book --skip-pretrain      # the tokenizer measurements only
    python experiments/tokenizer/run.py --book-repo ~/LLMs-from-scratch  # a clone, or its bare git folder

The corpus (~10 MB) is built in ``--workdir`` from ``--data`` (tinyshakespeare first, then Project
Gutenberg books with their licence headers stripped, in file-name order); one more book is held out.
The book's ``BPETokenizerSimple`` is read from ``ch02/05_bpe-from-scratch/bpe-from-scratch.ipynb`` of
``--book-repo`` at run time into a temporary folder (its source is not part of gptlab). Results go to
``results.json`` and ``bpc.png`` beside this script; the README quotes them.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import load_average  # noqa: E402  (experiments/machine.py: the facts every benchmark reports)

from gptlab.data.pretrain import build_token_file, read_text
from gptlab.tokenizer import get_tokenizer, tokenizer_info
from gptlab.tokenizer_training import train_bpe

HERE = Path(__file__).resolve().parent
NOTEBOOK = "ch02/05_bpe-from-scratch/bpe-from-scratch.ipynb"
HELD_OUT = "frankenstein.txt"
BATCH, CONTEXT = 8, 128  # gpt2-mini's context; the preset's batch size


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


# ----------------------------------------------------------------------------- corpus
def build_corpus(data: Path, work: Path, target_chars: int) -> tuple[list[Path], Path]:
    """``work/train/NN_<name>.txt`` (tinyshakespeare, then Gutenberg books without their licence
    headers, until ``target_chars``) and ``work/heldout.txt`` (one more book)."""
    train = work / "train"
    if train.exists():
        shutil.rmtree(train)
    train.mkdir(parents=True)
    sources = [data / "tinyshakespeare" / "input.txt"] + sorted(
        p for p in (data / "gutenberg").glob("*.txt") if p.name != HELD_OUT)
    files, total = [], 0
    for i, src in enumerate(sources):
        text = read_text(src, strip_gutenberg=src.parent.name == "gutenberg")
        out = train / f"{i:02d}_{src.parent.name if src.stem == 'input' else src.stem}.txt"
        out.write_text(text, encoding="utf-8")
        files.append(out)
        total += len(text)
        if total >= target_chars:
            break
    held = work / "heldout.txt"
    held.write_text(read_text(data / "gutenberg" / HELD_OUT, strip_gutenberg=True), encoding="utf-8")
    return files, held


def corpus_text(files: list[Path]) -> str:
    return "".join(f.read_text(encoding="utf-8") for f in files)


# ----------------------------------------------------------------------------- training time
def time_hf(files: list[Path], vocab: int, out: Path, repeats: int, min_frequency: int = 2) -> dict[str, Any]:
    """``train_bpe`` ``repeats`` times: its whole wall time (what ``gptlab-tokenizer train`` costs) and
    the ``tokenizers`` training call alone."""
    times, trainer_times, result = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = train_bpe(files, vocab, out, min_frequency=min_frequency, progress=False, overwrite=True)
        times.append(time.perf_counter() - t0)
        trainer_times.append(result.seconds["train"])
    return {"vocab_asked": vocab, "vocab": result.vocab_size, "merges": result.merges, "seconds": spread(times),
            "trainer_seconds": spread(trainer_times), "trainer_runs": trainer_times, "stages_last_run": result.seconds,
            "pieces_checked": result.checked_pieces, "pieces_differing": result.differing_pieces,
            "load_average": load_average()}


def load_book_bpe(repo: Path, tmp: Path) -> Callable[[], Any]:
    """``BPETokenizerSimple`` from the book's notebook (the code cell defining it), written to ``tmp``."""
    if (repo / NOTEBOOK).is_file():
        notebook = (repo / NOTEBOOK).read_text(encoding="utf-8")
    else:  # a bare git folder (what `git clone --bare` or a mirror holds)
        notebook = subprocess.run(["git", f"--git-dir={repo}", "show", f"HEAD:{NOTEBOOK}"], check=True,
                                  capture_output=True, text=True).stdout
    cells = ["".join(c["source"]) for c in json.loads(notebook)["cells"] if c["cell_type"] == "code"]
    [cell] = [c for c in cells if "class BPETokenizerSimple" in c]
    (tmp / "book_bpe.py").write_text(cell, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("book_bpe", tmp / "book_bpe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BPETokenizerSimple


def time_book(cls: Callable[[], Any], text: str, vocab: int) -> dict[str, Any]:
    tok = cls()
    t0 = time.perf_counter()
    tok.train(text, vocab_size=vocab, allowed_special={"<|endoftext|>"})
    seconds = time.perf_counter() - t0
    return {"chars": len(text), "vocab_asked": vocab, "vocab": len(tok.vocab), "merges": len(tok.bpe_merges),
            "seconds": seconds, "load_average": load_average()}


def book_comparison(repo: Path, files: list[Path], work: Path, vocab: int, slice_chars: int,
                    scaling_slices: list[int], scaling_vocab: int, corpus_chars: int) -> dict[str, Any]:
    text = corpus_text(files)
    piece = work / "slice.txt"
    piece.write_text(text[:slice_chars], encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        book = load_book_bpe(repo, Path(tmp))
        # the same slice and vocabulary: HF before and after the book's run (min_frequency=1: it merges
        # pairs seen once, as the book's trainer does, so both can reach the vocabulary)
        hf_before = time_hf([piece], vocab, work / "tok-slice", 3, min_frequency=1)
        same = time_book(book, text[:slice_chars], vocab)
        hf_after = time_hf([piece], vocab, work / "tok-slice", 2, min_frequency=1)
        scaling = [time_book(book, text[:n], scaling_vocab) for n in scaling_slices]
    hf_times = hf_before["trainer_runs"] + hf_after["trainer_runs"]
    per_char = [s["seconds"] / s["chars"] for s in scaling]
    return {
        "slice_chars": slice_chars, "book_same_slice": same,
        "hf_same_slice": {**hf_before, "trainer_seconds": spread(hf_times), "after_book": hf_after},
        "ratio_book_over_hf_trainer_median": same["seconds"] / statistics.median(hf_times),
        "book_scaling": scaling,
        "book_seconds_per_char_at_fixed_merges": per_char,
        # extrapolation (not measured): the book's trainer rescans every token of the corpus for each
        # merge, so at a fixed number of merges its time grows with the corpus (the scaling rows)
        "book_extrapolated_full_corpus_seconds": same["seconds"] * corpus_chars / slice_chars,
    }


# ----------------------------------------------------------------------------- encoding
def encode_throughput(toks: dict[str, Any], text: str, rounds: int) -> dict[str, Any]:
    chunks = [text[i:i + (1 << 16)] for i in range(0, len(text), 1 << 16)]
    out: dict[str, Any] = {"chars": len(text), "bytes": len(text.encode()), "load_average_start": load_average()}
    timing: dict[str, dict[str, list[float]]] = {n: {"single": [], "batch2": []} for n in toks}
    names = list(toks)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # A/B, then B/A
            enc = toks[name]
            t0 = time.perf_counter()
            ids = enc.encode_ordinary(text)
            timing[name]["single"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            enc.encode_ordinary_batch(chunks, num_threads=2)
            timing[name]["batch2"].append(time.perf_counter() - t0)
            out.setdefault(name, {})["tokens"] = len(ids)
    mb = out["bytes"] / 2**20
    for name in names:
        for mode, ts in timing[name].items():
            out[name][mode] = {"seconds": spread(ts), "MiB_per_s_median": mb / statistics.median(ts),
                               "tokens_per_s_median": out[name]["tokens"] / statistics.median(ts)}
    a, b = names
    out["ratio_single_median"] = statistics.median(timing[a]["single"]) / statistics.median(timing[b]["single"])
    out["ratio_batch2_median"] = statistics.median(timing[a]["batch2"]) / statistics.median(timing[b]["batch2"])
    out["load_average_end"] = load_average()
    return out


# ----------------------------------------------------------------------------- pretraining
def val_tokens_per_char(token_file: Path, enc: Any, limit_val_batches: int) -> float:
    """Tokens per character of exactly the validation windows a run evaluates (the first
    ``limit_val_batches`` batches of the last 10% of the token file)."""
    tokens = np.memmap(token_file, dtype=np.uint16, mode="r")
    k = int(0.9 * len(tokens))
    n = min(limit_val_batches * BATCH * CONTEXT, len(tokens) - k - 1)
    targets = tokens[k + 1:k + 1 + n].tolist()
    return len(targets) / len(enc.decode(targets))


def read_metrics(run: Path) -> list[dict[str, float]]:
    rows = []
    for path in sorted(run.rglob("metrics.csv")):
        with open(path) as f:
            rows += [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
    return rows


def pretrain(name: str, tokenizer: str, files: list[Path], held: Path, work: Path, chars: int,
             val_every: int, limit_val: int) -> dict[str, Any]:
    enc = get_tokenizer(tokenizer)
    token_file = build_token_file(files, tokenizer=enc, progress=False)
    n_tokens = os.path.getsize(token_file) // 2
    corpus_chars = sum(len(f.read_text(encoding="utf-8")) for f in files)
    chars_per_token = corpus_chars / n_tokens
    steps = round(chars / (BATCH * CONTEXT * chars_per_token))
    run = work / "runs" / name
    if run.exists():
        shutil.rmtree(run)
    cmd = [sys.executable, "-m", "gptlab.cli.train", "experiment=own_tokenizer", f"tokenizer={tokenizer}",
           f"data.path={files[0].parent}", f"data.batch_size={BATCH}", f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={val_every}", f"trainer.limit_val_batches={limit_val}",
           "trainer.enable_progress_bar=false", "logger=csv", "validate_before_fit=true",
           f"hydra.run.dir={run}"]
    load_start = load_average()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=work)
    wall = time.perf_counter() - t0
    val_tpc = val_tokens_per_char(token_file, enc, limit_val)
    curve = []
    for row in read_metrics(run):
        if "val/loss" in row:
            seen = row.get("step", 0) * BATCH * CONTEXT
            curve.append({"step": int(row.get("step", 0)), "tokens_seen": seen, "chars_seen": seen * chars_per_token,
                          "val_loss": row["val/loss"], "val_bpc": row["val/loss"] * val_tpc / math.log(2)})
    # the held-out book, through gptlab-eval (the same windows as training: 128 tokens, no overlap)
    out_json = run / "heldout_eval.json"
    subprocess.run([sys.executable, "-m", "gptlab.cli.evaluate", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                    f"data.path={held}", "splits=[all]", "progress=false", f"output={out_json}",
                    "data.batch_size=16"], check=True, cwd=work)
    ev = json.loads(out_json.read_text())["all"]
    held_ids = enc.encode_ordinary(held.read_text(encoding="utf-8"))
    n_windows = max(0, -(-(len(held_ids) - CONTEXT) // CONTEXT))
    covered = held_ids[1:1 + n_windows * CONTEXT]  # the targets gptlab-eval scored
    assert len(covered) == ev["tokens"], (len(covered), ev["tokens"])
    bpc = ev["loss"] * len(covered) / len(enc.decode(covered)) / math.log(2)
    return {"tokenizer": tokenizer_info(enc).describe(), "vocab": enc.n_vocab, "train_tokens": n_tokens,
            "train_chars_per_token": chars_per_token, "steps": steps,
            "chars_seen": steps * BATCH * CONTEXT * chars_per_token,
            "wall_seconds": wall, "load_average_start": load_start, "load_average_end": load_average(),
            "val_tokens_per_char": val_tpc, "curve": curve,
            "heldout": {"loss_nats_per_token": ev["loss"], "tokens": ev["tokens"], "bits_per_char": bpc}}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, r in results["pretrain"].items():
        xs = [p["chars_seen"] / 1e6 for p in r["curve"]]
        ax.plot(xs, [p["val_bpc"] for p in r["curve"]], marker="o", label=f"{name} ({r['vocab']:,} ids)")
    ax.set_xlabel("characters seen (millions)")
    ax.set_ylabel("validation bits per character")
    ax.set_title("gpt2-mini shape, same data, same characters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gptlab-tokenizer-study")
    p.add_argument("--corpus-chars", type=int, default=10_000_000)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--more-vocabs", default="8192,16384", help="extra vocabulary sizes timed with tokenizers")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--book-repo", type=Path, default=Path("/work/.mirror/rasbt+LLMs-from-scratch/repo"))
    p.add_argument("--book-slice", type=int, default=64_000)
    p.add_argument("--book-scaling", default="16000,32000,64000")
    p.add_argument("--book-scaling-vocab", type=int, default=800)
    p.add_argument("--encode-rounds", type=int, default=5)
    p.add_argument("--pretrain-chars", type=int, default=1_200_000)
    p.add_argument("--val-every", type=int, default=50)
    p.add_argument("--limit-val", type=int, default=16)
    p.add_argument("--skip-book", action="store_true")
    p.add_argument("--skip-pretrain", action="store_true")
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPU cores", "load_average_start": load_average()}

    files, held = build_corpus(args.data, work, args.corpus_chars)
    text = corpus_text(files)
    results["corpus"] = {"files": [f.name for f in files], "chars": len(text), "bytes": len(text.encode()),
                         "heldout": HELD_OUT, "heldout_chars": len(held.read_text(encoding="utf-8"))}
    print(json.dumps(results["corpus"]), flush=True)

    tok_dir = work / f"tok{args.vocab}"
    results["train_hf"] = [time_hf(files, args.vocab, tok_dir, args.repeats)]
    for v in (int(x) for x in args.more_vocabs.split(",") if x):
        results["train_hf"].append(time_hf(files, v, work / f"tok{v}", 1))
    print(json.dumps(results["train_hf"]), flush=True)

    if not args.skip_book:
        results["book"] = book_comparison(args.book_repo, files, work, args.vocab, args.book_slice,
                                          [int(x) for x in args.book_scaling.split(",")], args.book_scaling_vocab,
                                          len(text))
        print(json.dumps(results["book"]), flush=True)

    toks = {"trained": get_tokenizer(tok_dir), "gpt2": get_tokenizer("gpt2")}
    results["encode"] = encode_throughput(toks, text, args.encode_rounds)
    held_text = held.read_text(encoding="utf-8")
    results["tokens_per_char"] = {
        name: {"heldout": len(enc.encode_ordinary(held_text)) / len(held_text),
               "train_corpus": results["encode"][name]["tokens"] / len(text)} for name, enc in toks.items()}
    print(json.dumps({k: results[k] for k in ("encode", "tokens_per_char")}), flush=True)

    if not args.skip_pretrain:
        results["pretrain"] = {name: pretrain(name, str(tok_dir) if name == "trained" else "gpt2", files, held, work,
                                              args.pretrain_chars, args.val_every, args.limit_val)
                               for name in ("gpt2", "trained")}
        plot(results, HERE / "bpc.png")
    results["load_average_end"] = load_average()
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"results in {HERE / 'results.json'}")


if __name__ == "__main__":
    main()
