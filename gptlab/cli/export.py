"""``gptlab-export``: write a model as a Hugging Face GPT-2 folder.

    gptlab-export ckpt_path=outputs/pretrain/runs/<time>/checkpoints/last.ckpt out_dir=exported/my-gpt
    gptlab-export init_from=book-gpt2-small.pth out_dir=exported/gpt2 dtype=float16

The folder loads with ``transformers.GPT2LMHeadModel.from_pretrained(out_dir)`` and
``AutoTokenizer.from_pretrained(out_dir)``; LoRA (in the checkpoint or from ``adapter_path``) is
merged into the weights first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.cli import entry_point

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
"""The ``dtype=`` names -> the torch dtype's name."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``float32|float16|bfloat16`` (or ``fp32|fp16|bf16``) -> torch dtype; None stays None."""
    import torch

    if name is None:
        return None
    if str(name) not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid choices: {sorted(DTYPES)}")
    return getattr(torch, DTYPES[str(name)])


def run(cfg: DictConfig) -> Path:
    """Load the model ``cfg`` names (``ckpt_path`` or ``init_from``, + ``adapter_path``) and export
    it to ``cfg.out_dir``; returns that folder."""
    from gptlab.cli.validation import validate_export_config  # the heavy imports wait until they are needed
    from gptlab.inference import load_model
    from gptlab.weights import export_hf

    validate_export_config(cfg)
    n_heads = cfg.get("n_heads")
    lm = load_model(cfg.get("ckpt_path"), cfg.get("init_from"), cfg.get("adapter_path"), expect="lm", device="cpu",
                    precision="keep", overrides={"n_heads": int(n_heads)} if n_heads else None,
                    tokenizer=cfg.get("tokenizer"))
    model = lm.model
    out = export_hf(model, cfg.out_dir, dtype=parse_dtype(cfg.get("dtype")), tokenizer=lm.tokenizer)
    c = model.config
    print(f"exported {c.name} ({model.num_params():,} parameters, {c.n_layers} layers, emb_dim {c.emb_dim}, "
          f"tied head: {c.tie_weights}) to {out.resolve()}")
    print(f"  transformers: GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return out


main = entry_point("export", run)

if __name__ == "__main__":
    main()
