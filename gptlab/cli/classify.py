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
from typing import Any, TextIO

import hydra
import torch
from omegaconf import DictConfig

from gptlab.cli import CONFIG_DIR
from gptlab.cli.generate import resolve_device
from gptlab.cli.validation import refuse_bad_input, validate_classify_config
from gptlab.model.gpt import GPT
from gptlab.tasks.classify import predict_texts

META_KEYS = ("labels", "pooling", "max_length")


def load_classifier(ckpt_path: str | None = None, init_from: str | None = None, adapter_path: str | None = None,
                    device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """A classifier backbone (LoRA merged in, eval mode, on ``device``) and what prediction needs
    from its training run: ``labels``, ``pooling``, ``max_length`` (None where unknown).

    ``ckpt_path``: a gptlab checkpoint of a classification run; or ``init_from`` base weights plus
    ``adapter_path``, an adapter saved by a classification run (it brings the head and the labels).
    """
    from gptlab.model.lora import load_adapter, merge_lora, read_adapter

    if bool(ckpt_path) == bool(init_from):
        raise ValueError("give exactly one of ckpt_path=... or init_from=...")
    meta: dict[str, Any] = dict.fromkeys(META_KEYS)
    if ckpt_path:
        from gptlab.tasks.base import load_task

        task = load_task(ckpt_path)
        model = task.model
        meta.update({k: task.hparams.get(k) for k in META_KEYS})
    else:
        model = GPT.from_pretrained(init_from)
    if adapter_path:
        _, adapter_cfg = read_adapter(adapter_path)
        meta.update({k: adapter_cfg[k] for k in META_KEYS if adapter_cfg.get(k) is not None})
        load_adapter(model, adapter_path)
    merge_lora(model)  # plain matmuls at inference; a no-op without LoRA
    if model.out_head.out_features >= model.config.vocab_size:
        source = " + ".join(str(s) for s in (ckpt_path or init_from, adapter_path) if s)
        raise ValueError(f"{source}: the model has a language-model head, not a classifier; train one with "
                         "gptlab-train task=classify (e.g. experiment=ch06_spam), or give the classification "
                         "run's adapter_path=")
    return model.to(device).eval(), meta


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
    validate_classify_config(cfg, text)
    out = out or sys.stdout
    text = text if text is not None else cfg.text
    device = resolve_device(cfg.device)
    model, meta = load_classifier(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, device)
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        model = model.to(torch.bfloat16)
    n = model.out_head.out_features
    labels = list(cfg.labels or meta["labels"] or [str(i) for i in range(n)])
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels {labels} for a {n}-class head")
    pooling = cfg.pooling or meta["pooling"] or "last_token"
    max_length = cfg.max_length or meta["max_length"]
    texts = [str(text)] if text is not None else read_lines(cfg.input)
    probs = predict_texts(model, texts, pooling, max_length, cfg.batch_size,
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


_RAW_TEXT: list[str] = []


def pop_text_argument(argv: list[str]) -> str | None:
    """Remove ``text=...`` arguments from ``argv``; the last one's value, verbatim (None if none).

    Hydra's override grammar rejects many characters of ordinary messages (``!``, ``(``, ``,``
    lists, ``${`` interpolations) unless the value is quoted once more inside the shell quotes, so
    the text never goes through it."""
    value = None
    for arg in list(argv[1:]):
        key, sep, rest = arg.partition("=")
        if sep and key.lstrip("+") == "text":
            argv.remove(arg)
            value = rest
    if value and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]  # already quoted for Hydra ('text="..."'): one level of quotes off
    return value


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="classify")
def _hydra_main(cfg: DictConfig) -> None:
    with refuse_bad_input("gptlab-classify"):
        run(cfg, text=_RAW_TEXT[-1] if _RAW_TEXT else None)


def main() -> None:
    """Console entry: ``text=`` taken verbatim, every other argument parsed by Hydra."""
    text = pop_text_argument(sys.argv)
    _RAW_TEXT[:] = [] if text is None else [text]  # only this call's text (main may run twice in a process)
    _hydra_main()


if __name__ == "__main__":
    main()
