"""Peak memory of loading GPT-2 weights: gptlab's lazy loader vs a naive full read.

    python experiments/pretrained_memory/run.py --size gpt2-medium      # ~1.4 GB checkpoint, ~2 min
    python experiments/pretrained_memory/run.py --size gpt2-large       # ~3.1 GB checkpoint

Steps, each in its own subprocess so one's memory never counts for another:
  1. create a random GPT2LMHeadModel of that shape and ``save_pretrained`` it (HF layout), and the
     same weights as a state dict in the book's naming (``book.pth``);
  2. load it by each method, then read every weight once (as a forward pass would, so memory-mapped
     pages count), and report the process's peak resident set (``ru_maxrss``), minus the peak
     after imports, and its ratio to the checkpoint's size on disk.
Prints a Markdown table (paste it into README.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import peak_rss_mb  # noqa: E402

SHAPES = {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
          "gpt2-xl": (1600, 48, 25)}

METHODS = {
    "lazy_hf": ("HF safetensors", "gptlab `load_pretrained` (file reads, meta device, assign)"),
    "safeopen_hf": ("HF safetensors", "`load_from_reader` (meta, assign) over `safe_open`, one tensor at a time"),
    "mmap_hf": ("HF safetensors", "meta device + assign, all tensors from `safe_open` (mmap) first"),
    "naive_hf": ("HF safetensors", "naive: `GPT(cfg)`, whole file read, convert, `load_state_dict`"),
    "transformers_hf": ("HF safetensors", "reference: `GPT2LMHeadModel.from_pretrained`"),
    "lazy_book": ("book .pth", "gptlab `load_pretrained` (`torch.load(mmap=True)`, meta, assign)"),
    "naive_book": ("book .pth", "naive: `GPT(cfg)`, `torch.load`, convert, `load_state_dict`"),
}


def create(size: str, out: Path) -> None:
    """Random weights of ``size`` in the HF layout (out/hf) and the book's naming (out/book.pth)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d, layers, heads = SHAPES[size]
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=d, n_layer=layers, n_head=heads)).save_pretrained(out / "hf")
    from gptlab.weights import load_pretrained, save_book_state_dict

    save_book_state_dict(load_pretrained(out / "hf"), out / "book.pth")


class SafeOpenReader:
    """The alternative to gptlab's file reader: tensors from ``safetensors.safe_open`` (memory-mapped),
    one at a time, transposed where GPT-2's Conv1D needs it (the reader interface
    ``load_from_reader`` takes: ``keys``, ``shape``, ``get``)."""

    def __init__(self, f):
        self.f = f

    def keys(self) -> list[str]:
        return list(self.f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.f.get_slice(key).get_shape())

    def get(self, key: str, transpose: bool = False):
        t = self.f.get_tensor(key)
        return t.t().contiguous() if transpose else t


def measure(method: str, out: Path, size: str) -> dict:
    """Load by ``method``; return peak RSS figures (MiB) and seconds."""
    import torch

    from gptlab.model.config import GPTConfig
    from gptlab.model.gpt import GPT
    from gptlab.weights import MappingReader, config_from_hf, load_from_reader, load_pretrained

    if method == "transformers_hf":
        from transformers import GPT2LMHeadModel
    torch.set_num_threads(2)
    hf_dir, book = out / "hf", out / "book.pth"
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if method == "lazy_hf":
        model = load_pretrained(hf_dir)
    elif method == "safeopen_hf":
        from safetensors import safe_open

        hints = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
        with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
            model = load_from_reader(SafeOpenReader(f), "safe_open", hints)
    elif method == "mmap_hf":
        from safetensors import safe_open

        hints = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
        with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            model = load_from_reader(MappingReader(tensors), "mmap", hints)
            del tensors
    elif method == "naive_hf":
        from safetensors.torch import load

        hints = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
        model = GPT(GPTConfig(**hints, qkv_bias=True))
        sd = load((hf_dir / "model.safetensors").read_bytes())
        converted = load_from_reader(MappingReader(sd), "naive", hints).state_dict()
        model.load_state_dict(converted)
        del sd, converted
    elif method == "transformers_hf":
        model = GPT2LMHeadModel.from_pretrained(hf_dir)
    elif method == "lazy_book":
        model = load_pretrained(book)
    elif method == "naive_book":
        d, layers, heads = SHAPES[size]
        sd = torch.load(book, weights_only=True)
        model = GPT(GPTConfig.from_name(size, qkv_bias=True, tie_weights=True))
        converted = load_from_reader(MappingReader(sd), "naive").state_dict()
        model.load_state_dict(converted)
        del sd, converted
    else:
        raise ValueError(f"unknown method {method!r}; valid choices: {sorted(METHODS)}")
    seconds = time.perf_counter() - t0
    loaded = peak_rss_mb()
    # read every weight once, as a forward pass would: memory-mapped pages become resident here
    params = list({id(p): p for p in model.parameters()}.values())
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in params)
    n = sum(p.numel() for p in params)
    return {"method": method, "base_mib": base, "loaded_mib": loaded, "peak_mib": peak_rss_mb(), "seconds": seconds,
            "params": n, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="gpt2-medium", choices=sorted(SHAPES))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gptlab_pretrained_memory"))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--_create", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = args.workdir / args.size
    if args._create:
        return create(args.size, out)
    if args._measure:
        print(json.dumps(measure(args._measure, out, args.size)))
        return
    me = [sys.executable, __file__, "--size", args.size, "--workdir", str(args.workdir)]
    if not (out / "hf" / "model.safetensors").is_file() or not (out / "book.pth").is_file():
        print(f"creating a random {args.size} checkpoint in {out} ...", flush=True)
        subprocess.run([*me, "--_create"], check=True)
    sizes = {"HF safetensors": (out / "hf" / "model.safetensors").stat().st_size / 2**20,
             "book .pth": (out / "book.pth").stat().st_size / 2**20}
    print(f"\n{args.size}: model.safetensors {sizes['HF safetensors']:,.0f} MiB, book.pth {sizes['book .pth']:,.0f} MiB\n")
    print("| checkpoint | method | peak RSS (MiB) | after imports | load + first use adds | / file size | "
          "right after load adds | load seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods:
        res = subprocess.run([*me, "--_measure", method], capture_output=True, text=True)
        if res.returncode != 0:
            print(f"| {METHODS[method][0]} | {METHODS[method][1]} | failed: {res.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        fmt, desc = METHODS[method]
        added = r["peak_mib"] - r["base_mib"]
        print(f"| {fmt} | {desc} | {r['peak_mib']:,.0f} | {r['base_mib']:,.0f} | {added:,.0f} | "
              f"{added / sizes[fmt]:.2f}x | {r['loaded_mib'] - r['base_mib']:,.0f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
