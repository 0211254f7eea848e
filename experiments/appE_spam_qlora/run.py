"""Appendix E on a 4-bit base, CPU-sized: train experiment=appE_spam_qlora_cpu on a saved base, then
measure how the ways of loading its adapter compare on the spam test split.

    python experiments/appE_spam_qlora/run.py                    # ~1 min on 2 cores
    python experiments/appE_spam_qlora/run.py --out /tmp/qlora_merge --skip-train   # re-measure

The base is the preset's random-init GPT (seed 123), saved as a Hugging Face folder ``<out>/base`` so that the run can
start from it (``init_from=``) and the adapter can be put back onto it. Compared, as class logits over
the 300 test messages (the same split the run's ``test/acc`` uses):
- ``qlora``: the base re-quantized with the adapter's settings + the adapter, unmerged (what training computed);
- ``merged``: the same, merged: each base weight dequantized to fp32 with the update folded in (full precision);
- ``fp32 base + adapter``: the adapter put on the original, unrounded fp32 weights (plain LoRA);
- ``load_model(init_from=base, adapter_path=adapter)``: what gptlab-classify/-generate/-chat load (re-quantize, merge);
- ``load_model(ckpt_path=last.ckpt)``: the checkpoint stores the base dequantized; the loader puts LoRA on
  exactly those weights and merges;
- ``load_task(last.ckpt)``: the QLoRA task rebuilt: the stored dequantized base is quantized again (the
  same 4-bit codes, the double-quantized scales rounded once more).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from gptlab.cli import CONFIG_DIR, register_model_presets
from gptlab.inference import load_model
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.model.lora import merge_lora
from gptlab.model.qlora import load_qlora_adapter, qlora_layers
from gptlab.model.heads import class_logits
from gptlab.tasks.registry import load_task
from gptlab.tokenizer import get_tokenizer
from gptlab.weights import export_hf
from gptlab.weights.checkpoint import load_backbone



@torch.no_grad()
def test_logits(model: GPT, loader, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for batch in loader:
        logits.append(class_logits(model, batch["input_ids"], batch["attention_mask"], pooling))
        labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("outputs/appE_spam_qlora_merge"))
    ap.add_argument("--skip-train", action="store_true", help="reuse <out>/base and <out>/run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    register_model_presets()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=appE_spam_qlora_cpu"])
    base_file, run = args.out / "base", args.out / "run"
    if not args.skip_train:
        shutil.rmtree(run, ignore_errors=True)  # a fresh run folder: no stale last.ckpt
        torch.manual_seed(cfg.seed)
        # a Hugging Face folder: its config.json carries n_heads=4, which the weight shapes do not tell
        export_hf(GPT(GPTConfig.from_dict(dict(cfg.model))), base_file)
        cmd = [sys.executable, "-m", "gptlab.cli.train", "experiment=appE_spam_qlora_cpu", f"init_from={base_file.resolve()}",
               "trainer.enable_progress_bar=false", f"hydra.run.dir={run.resolve()}",
               # checkpoint every epoch (not only on a new best val/loss): last.ckpt = the final weights = the adapter's
               "callbacks.model_checkpoint.monitor=null"]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if res.returncode != 0:
            sys.exit(f"training failed:\n{res.stderr[-4000:]}")
    adapter = run / "checkpoints" / "adapter.safetensors"

    dm = instantiate(cfg.data, tokenizer=get_tokenizer())
    dm.setup("test")
    loader = dm.test_dataloader()
    pooling = cfg.task.pooling

    def base() -> GPT:
        return load_backbone(base_file).eval()

    qlora = load_qlora_adapter(base(), adapter)
    assert qlora_layers(qlora), "the adapter should re-quantize the base"
    ckpt = run / "checkpoints" / "last.ckpt"
    variants = {"qlora": qlora, "merged": merge_lora(copy.deepcopy(qlora)),
                "load_model(init_from=base, adapter_path=adapter)": load_model(init_from=base_file, adapter_path=adapter,
                                                                             expect="classifier").model,
                "fp32 base + adapter": load_qlora_adapter(base(), adapter, requantize=False),
                "load_model(ckpt_path=last.ckpt)": load_model(ckpt_path=ckpt, expect="classifier").model,
                "load_task(last.ckpt)": load_task(ckpt).model}
    results = {name: test_logits(model, loader, pooling) for name, model in variants.items()}
    ref, labels = results["qlora"]
    print(f"{len(labels)} test messages; class logits of the QLoRA model span "
          f"[{ref.min():.3f}, {ref.max():.3f}]\n")
    print("| model | test acc | max abs logit diff vs qlora | predictions equal to qlora's |")
    print("|---|---:|---:|---:|")
    for name, (logits, _) in results.items():
        acc = (logits.argmax(-1) == labels).float().mean().item()
        same = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"| {name} | {acc:.4f} | {(logits - ref).abs().max().item():.3g} | {same:.2%} |")


if __name__ == "__main__":
    main()
