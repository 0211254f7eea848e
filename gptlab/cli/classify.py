"""``gptlab-classify``: label texts with a classifier trained by ``gptlab-train task=classify``.

    gptlab-classify ckpt_path=outputs/.../checkpoints/last.ckpt text="You won a free ticket!"
    gptlab-classify ckpt_path=... input=messages.txt output=preds.csv
    gptlab-classify init_from=gpt2-small adapter_path=.../checkpoints/adapter.safetensors text="..."

One text prints ``<label><TAB><probability>``; ``text=`` is taken verbatim from the command line,
so ``text="You won a free ticket!"`` works as typed (no Hydra quoting of ``!``, ``,`` or ``${``).
A file (one text per line, blank lines skipped; ``input=-`` reads stdin) is classified in batches
with a progress bar; predictions go to ``output`` as CSV
(``text,label,probability,p_<label>...``) or, without ``output``, to stdout as
``<label><TAB><probability><TAB><text>`` lines.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from gptlab.cli import entry_point

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 text file (``-`` = stdin), without their line endings."""
    if str(path) == "-":
        return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with path.open(encoding="utf-8", newline="") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def write_predictions(path: str | Path, texts: list[str], probs: torch.Tensor, labels: list[str]) -> Path:
    """``text,label,probability,p_<label>...`` CSV (RFC 4180 quoting) of the predictions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    best_p, best = probs.max(dim=-1)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label", "probability", *(f"p_{name}" for name in labels)])
        for text, i, p, row in zip(texts, best.tolist(), best_p.tolist(), probs.tolist()):
            writer.writerow([text, labels[i], f"{p:.6f}", *(f"{q:.6f}" for q in row)])
    return path


def run(cfg: DictConfig, out: TextIO | None = None, text: str | None = None) -> list[tuple[str, float]]:
    """Classify one text (``text``, else ``cfg.text``) or every line of ``cfg.input``; returns
    ``(label, probability)`` pairs."""
    import torch  # the heavy imports wait until a model is wanted: --help stays instant

    from gptlab.cli.validation import validate_classify_config
    from gptlab.inference import load_model, predict_texts

    validate_classify_config(cfg, text)
    out = out or sys.stdout
    text = text if text is not None else cfg.text
    if (text is None) == (cfg.input is None):
        raise ValueError("give exactly one of text=\"...\" or input=<file with one text per line>")
    clf = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="classifier", device=cfg.device,
                     precision=cfg.precision, tokenizer=cfg.get("tokenizer"))
    model = clf.model
    n = model.out_head.out_features
    labels = list(cfg.labels or clf.labels or [str(i) for i in range(n)])
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels {labels} for a {n}-class head")
    pooling = cfg.pooling or clf.pooling or "last_token"
    max_length = cfg.max_length or clf.max_length
    texts = [str(text)] if text is not None else read_lines(cfg.input)
    probs = predict_texts(model, texts, pooling, max_length, cfg.batch_size, tokenizer=clf.tokenizer,
                          progress=bool(cfg.progress) and cfg.input is not None)
    best_p, best = probs.max(dim=-1) if len(texts) else (torch.empty(0), torch.empty(0, dtype=torch.long))
    results = [(labels[i], p) for i, p in zip(best.tolist(), best_p.tolist())]
    if text is not None:
        out.write(f"{results[0][0]}\t{results[0][1]:.4f}\n")
    elif cfg.output:
        path = write_predictions(cfg.output, texts, probs, labels)
        counts = {name: sum(r[0] == name for r in results) for name in labels}
        sys.stderr.write(f"{len(texts)} predictions written to {path} ({counts})\n")
    else:
        for (label, p), text in zip(results, texts):
            out.write(f"{label}\t{p:.4f}\t{text}\n")
    out.flush()
    return results


main = entry_point("classify", run, verbatim=("text",))

if __name__ == "__main__":
    main()
