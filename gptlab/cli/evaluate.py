"""``gptlab-eval``: cross-entropy loss and perplexity of a model on a text, split like training.

    gptlab-eval init_from=gpt2-small          # the book's exercise 5.5: train ~3.75, val ~3.56
    gptlab-eval ckpt_path=outputs/.../last.ckpt data.path=corpus.txt splits=[val] output=eval.json

The text goes through the same :class:`~gptlab.data.pretrain.PretrainDataModule` as training
(``data.*`` overrides work the same way); the loss is the mean over every target token of a split.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gptlab.cli import CONFIG_DIR
from gptlab.cli.entry import call_hydra, handle_help, require_values, user_errors
from gptlab.data.pretrain import resolve_sources
from gptlab.errors import ConfigError
from gptlab.inference import LoadedModel, load_model, resolve_device, resolve_precision
from gptlab.cli.validation import validate_eval_config

VALID_SPLITS = ("train", "val", "all")


@torch.no_grad()
def evaluate_loader(lm: LoadedModel, loader: DataLoader, max_batches: int | None = None, progress: bool = True,
                    desc: str = "eval") -> dict[str, float]:
    """Token-weighted mean cross-entropy of ``lm`` over ``loader`` (batches of ``input_ids``/``labels``)."""
    device = lm.device
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    for i, batch in enumerate(tqdm(loader, total=n_batches, desc=desc, disable=not progress, leave=False)):
        if i >= n_batches:
            break
        x = batch["input_ids"].to(device, non_blocking=True)
        y = batch["labels"].to(device, non_blocking=True)
        with lm.autocast():
            loss = lm.model.loss(x, y)
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
    # evaluation keeps fp32 weights; bf16 (auto: on GPU) means a bf16-autocast forward
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device, auto="bf16-mixed")
    lm = load_model(cfg.get("ckpt_path"), cfg.get("init_from"), cfg.get("adapter_path"), expect="lm",
                    device=device, precision="bf16-mixed" if precision == "bf16" else precision,
                    tokenizer=cfg.get("tokenizer"))
    context = lm.model.config.context_length
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    if data_cfg.get("max_length") is None:  # model.context_length=null: windows as long as the model reads
        data_cfg["max_length"] = context
        if data_cfg.get("stride") is None:
            data_cfg["stride"] = context
    if data_cfg["max_length"] > context:
        raise ConfigError(f"data.max_length={data_cfg['max_length']} exceeds the model's context length "
                         f"{context}; set model.context_length=<= {context}")
    if "all" in splits:
        data_cfg["train_ratio"] = 1.0
    # in file order, every window: the train split goes through the same public loader as training
    data_cfg.update(shuffle=False, drop_last=False)
    dm = instantiate(data_cfg, tokenizer=lm.tokenizer, _convert_="all")
    dm.setup("fit")
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
        results[split] = evaluate_loader(lm, loader, cfg.max_batches, cfg.progress, split)
    for split, r in results.items():
        print(f"{split:>5}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  ({r['tokens']:,} tokens, {r['batches']} batches)")
    if cfg.get("output"):
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        source = cfg.get("ckpt_path") or cfg.get("init_from")
        sources = [str(f) for f in resolve_sources(data_cfg.get("path"))]
        out.write_text(json.dumps({"model": str(source), "data": sources, "max_length": data_cfg["max_length"],
                                   **results}, indent=2))
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    require_values(cfg, "eval", "gptlab-eval")
    with user_errors("gptlab-eval"):
        run(cfg)


def main() -> None:
    """Console entry: this tool's ``--help``; everything else through Hydra."""
    handle_help("eval", "gptlab-eval", ["data"])
    call_hydra(_hydra_main, "eval", "gptlab-eval")


if __name__ == "__main__":
    main()
