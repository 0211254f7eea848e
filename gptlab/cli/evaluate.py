"""``gptlab-eval``: cross-entropy loss and perplexity of a model on a text, split like training.

    gptlab-eval init_from=gpt2-small          # the book's exercise 5.5: train ~3.75, val ~3.56
    gptlab-eval ckpt_path=outputs/.../last.ckpt data.path=corpus.txt splits=[val] output=eval.json

The text goes through the same :class:`~gptlab.data.pretrain.PretrainDataModule` as training
(``data.*`` overrides work the same way); the loss is the mean over every target token of a split.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from gptlab.cli import CONFIG_DIR
from gptlab.cli.generate import load_model, resolve_device
from gptlab.cli.validation import refuse_bad_input, validate_eval_config
from gptlab.errors import ConfigError
from gptlab.model.gpt import GPT
from gptlab.tokenizer import get_tokenizer

VALID_SPLITS = ("train", "val", "all")


@torch.no_grad()
def evaluate_loader(model: GPT, loader: DataLoader, device: torch.device, max_batches: int | None = None,
                    autocast: bool = False, progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """Token-weighted mean cross-entropy over ``loader`` (batches of ``input_ids``/``labels``)."""
    from tqdm.auto import tqdm

    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    for i, batch in enumerate(tqdm(loader, total=n_batches, desc=desc, disable=not progress, leave=False)):
        if i >= n_batches:
            break
        x = batch["input_ids"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        with ctx:
            loss = model.loss(x, y)
        n = int((y != -100).sum())
        total_loss += loss.double() * n
        total_tokens += n
    if total_tokens == 0:
        raise ValueError(f"{desc}: no windows to evaluate (the split is shorter than data.max_length + 1)")
    mean = float(total_loss / total_tokens)
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": total_tokens, "batches": n_batches}


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    validate_eval_config(cfg)
    splits = list(cfg.splits)
    bad = [s for s in splits if s not in VALID_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits={splits}: valid choices are {list(VALID_SPLITS)}")
    device = resolve_device(cfg.device)
    model = load_model(cfg.get("ckpt_path"), cfg.get("init_from"), cfg.get("adapter_path"), device)
    if cfg.data.max_length > model.config.context_length:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's context length "
                         f"{model.config.context_length}; set model.context_length=<= {model.config.context_length}")
    autocast = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if "all" in splits:
        data_cfg["train_ratio"] = 1.0
    dm = instantiate(data_cfg, tokenizer=get_tokenizer(), _convert_="all")
    dm.setup("validate")
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        loader = dm.val_dataloader() if split == "val" else dm._loader(dm.train_set, dm.val_batch_size, False)
        results[split] = evaluate_loader(model, loader, device, cfg.max_batches, autocast, cfg.progress, split)
    for split, r in results.items():
        print(f"{split:>5}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  ({r['tokens']:,} tokens, {r['batches']} batches)")
    if cfg.get("output"):
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        source = cfg.get("ckpt_path") or cfg.get("init_from")
        out.write_text(json.dumps({"model": str(source), "data": str(data_cfg.get("path")), **results}, indent=2))
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    with refuse_bad_input("gptlab-eval"):
        run(cfg)


if __name__ == "__main__":
    main()
