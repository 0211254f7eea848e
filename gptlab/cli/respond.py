"""``gptlab-respond``: a model's answers to the instructions of a data split, written as
``responses.json`` (the file the test stage of ``gptlab-train ... test=true`` writes), so any two
models can be compared with ``gptlab-judge ... baseline=`` or ``gptlab-reward ... baseline=``.

    gptlab-respond ckpt_path=<sft run>/checkpoints/last.ckpt data=preference output=sft.json max_new_tokens=48
    gptlab-respond ckpt_path=<dpo run>/checkpoints/last.ckpt data=preference output=dpo.json max_new_tokens=48
    gptlab-respond init_from=gpt2-medium adapter_path=<lora run>/checkpoints/adapter.safetensors data=instruct split=val output=...

The entries come from ``data`` (``data=instruct`` or ``data=preference``, split as in training);
generation is batched and greedy by default, with the settings of the training test stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.cli import entry_point

if TYPE_CHECKING:
    from omegaconf import DictConfig

SPLITS = ("train", "val", "test")


def run(cfg: DictConfig) -> Path:
    """Answer every entry of ``cfg.split`` of ``cfg.data`` with the model; returns the file written."""
    from hydra.utils import instantiate  # the heavy imports wait until a model is wanted
    from omegaconf import OmegaConf

    from gptlab.cli.validation import validate_respond_config
    from gptlab.inference import answer_entries, load_model

    validate_respond_config(cfg)
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r}; valid choices: {list(SPLITS)}")
    lm = load_model(cfg.ckpt_path, cfg.init_from, cfg.adapter_path, expect="lm", device=cfg.device,
                    precision=cfg.precision, tokenizer=cfg.get("tokenizer"))
    style = cfg.prompt_style or lm.prompt_style or cfg.data.get("prompt_style") or "alpaca"
    dm = instantiate(OmegaConf.to_container(cfg.data, resolve=True), tokenizer=lm.tokenizer, _convert_="all")
    dm.setup()
    entries = getattr(dm, f"{cfg.split}_set").entries
    print(f"answering {len(entries)} {cfg.split} instructions of {cfg.data._target_} with {lm.source} "
          f"(prompt style {style!r}, {cfg.max_new_tokens} new tokens)", file=sys.stderr)
    with lm.autocast():
        answers = answer_entries(lm.model, entries, style, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                 cfg.batch_size, cfg.max_prompt_length, progress=cfg.progress, tokenizer=lm.tokenizer)
    path = Path(cfg.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**e, "model_response": a} for e, a in zip(entries, answers)]
    path.write_text(json.dumps(rows, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(rows)} responses written to {path}", file=sys.stderr)
    return path


main = entry_point("respond", run, groups=["data"])

if __name__ == "__main__":
    main()
