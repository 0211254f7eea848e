"""``gptlab-eval``: cross-entropy loss and perplexity of a model on a text, split like training.

    gptlab-eval init_from=gpt2-small          # the book's exercise 5.5: train ~3.75, val ~3.56
    gptlab-eval ckpt_path=outputs/.../last.ckpt data.path=corpus.txt splits=[val] output=eval.json

The text goes through the same :class:`~gptlab.data.pretrain.PretrainDataModule` as training
(``data.*`` overrides work the same way); the loss is the mean over every target token of a split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.cli import entry_point
from gptlab.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

VALID_SPLITS = ("train", "val", "all")


def run(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate the model ``cfg`` names on each of ``cfg.splits`` of ``cfg.data``; prints one line per
    split, writes ``cfg.output`` (JSON) when set, returns ``{split: {loss, ppl, tokens, batches}}``."""
    from hydra.utils import instantiate  # the heavy imports wait until a model is wanted
    from omegaconf import OmegaConf

    from gptlab.cli.validation import validate_eval_config
    from gptlab.data.pretrain import resolve_sources
    from gptlab.evaluation import evaluate_loader
    from gptlab.inference import load_model, resolve_device, resolve_precision

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


main = entry_point("eval", run, prog="gptlab-eval", groups=["data"])

if __name__ == "__main__":
    main()
