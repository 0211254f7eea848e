"""One GRPO step (generation + scoring + update) of gptlab's ``task=grpo`` against TRL's ``GRPOTrainer``
on the same model shape, group size, prompt and completion lengths.

    python experiments/grpo_speed/run.py --smoke                                   # CPU, tiny shapes, seconds
    python experiments/grpo_speed/run.py --device cpu --model gpt2-mini --prompts 4 --G 8 --prompt-len 32 --new-tokens 32
    python experiments/grpo_speed/run.py --device cuda --model gpt2-small --prompts 8 --G 8 --new-tokens 128

Both sides: random weights (speed does not depend on them), the same prompts of ``--prompt-len`` tokens,
``--G`` completions each of exactly ``--new-tokens`` tokens (gptlab: no stop token; TRL: ``eos_token_id``
dropped from generation so no completion ends early), a cheap rule reward (completion length), β = 0
(no reference model, both defaults), one optimizer step per batch (``num_iterations`` 1), AdamW, no
gradient accumulation, no activation checkpointing (TRL 1.16 turns it on by default; off here so both
sides do the same work), logits at temperature 1. The sides run interleaved (A, B, A, B, ...) after
``--warmup`` steps each; the table gives min / median / max step time and the split.

gptlab's phases are the task's own ``time/*`` metrics (one device sync each); TRL's are measured by
wrapping its model's ``generate`` (generation) and ``_generate_and_score_completions`` (generation +
rewards + the old/ref log-prob passes: the rest of it is "scoring"), the remainder of the step being
the update. TRL needs ``pip install trl`` (not a gptlab dependency); without it the gptlab side runs
and the TRL column says why not.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptlab.data.prompt_styles import left_pad
from gptlab.model.config import GPTConfig
from gptlab.tasks.grpo import GRPOTask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import cpu_name  # noqa: E402  (experiments/machine.py, shared by the benchmark scripts)
from ppo_speed.run import IterationTimes  # noqa: E402  (the task's own time/* metrics per training batch)

PROMPT_TOKEN = 257  # " a": a prompt of n of them is n GPT-2 tokens on both sides (no merges across them)


def length_reward(*, completion_ids: list[list[int]], **kwargs) -> list[float]:
    """A rule as cheap as TRL's examples: the completion's length / 100."""
    return [len(c) / 100 for c in completion_ids]


# ----------------------------------------------------------------------------- gptlab
class GptlabSide:
    name = "gptlab"

    def __init__(self, args: argparse.Namespace):
        L.seed_everything(0, verbose=False)
        config = GPTConfig.from_name(args.model, drop_rate=0.0)
        self.args = args
        self.task = GRPOTask(model=config.to_dict(), rewards={"length": length_reward}, num_generations=args.G,
                             max_new_tokens=args.new_tokens, temperature=1.0, stop_token_id=None, beta=0.0,
                             loss_type="dapo", lr=1e-6, lr_schedule="constant", weight_decay=0.0, grad_clip=1.0,
                             log_samples_every_n=0)
        self.timer = IterationTimes()
        steps = args.warmup + args.steps
        self.trainer = L.Trainer(accelerator=args.device, devices=1, precision=args.precision, max_epochs=1,
                                 limit_train_batches=steps, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                                 callbacks=[self.timer])
        rows = [[PROMPT_TOKEN] * args.prompt_len for _ in range(steps * args.prompts)]

        def collate(items):
            ids, mask = left_pad([rows[i] for i in items], 0)
            return {"prompt_ids": ids, "prompt_attention_mask": mask, "index": torch.tensor(items)}

        self.loader = DataLoader(list(range(len(rows))), batch_size=args.prompts, collate_fn=collate)
        self.done = 0

    def run_all(self) -> list[dict[str, float]]:
        self.trainer.fit(self.task, train_dataloaders=self.loader)
        return [{"generation": r["generation_s"], "scoring": r["scoring_s"], "update": r["update_s"],
                 "step": r["iteration_s"]} for r in self.timer.rows]


# ----------------------------------------------------------------------------- TRL
def trl_missing() -> str | None:
    missing = [m for m in ("trl", "transformers", "datasets") if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)} (pip install trl)" if missing else None


class TrlSide:
    name = "TRL"

    def __init__(self, args: argparse.Namespace):
        import datasets
        import transformers
        import trl
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        c = GPTConfig.from_name(args.model)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.emb_dim,
                                           n_layer=c.n_layers, n_head=c.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0, tie_word_embeddings=c.tie_weights,
                                           attn_implementation="sdpa"))
        assets = Path(__file__).resolve().parents[2] / "gptlab" / "assets"
        # GPT-2's BPE from the files gptlab ships (offline), as a Hugging Face tokenizer
        bpe = Tokenizer(models.BPE.from_file(str(assets / "encoder.json"), str(assets / "vocab.bpe")))
        bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        prompt = tok.decode([PROMPT_TOKEN] * args.prompt_len)
        steps = args.warmup + args.steps
        data = datasets.Dataset.from_dict({"prompt": [prompt] * (steps * args.prompts)})
        bf16 = args.device == "cuda" and "bf16" in args.precision
        config = trl.GRPOConfig(
            output_dir=str(Path(args.tmp) / "trl"), per_device_train_batch_size=args.prompts * args.G,
            num_generations=args.G, max_completion_length=args.new_tokens, temperature=1.0, beta=0.0,
            loss_type="dapo", learning_rate=1e-6, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            num_iterations=1, gradient_accumulation_steps=1, max_steps=steps, logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=args.device == "cpu", bf16=bf16, seed=0, dataloader_num_workers=0,
            disable_tqdm=True, shuffle_dataset=False,
            gradient_checkpointing=False)  # TRL 1.16 turns it on by default: recomputation gptlab does not do
        self.trainer = trl.GRPOTrainer(model=model, reward_funcs=[length_reward_trl], args=config, train_dataset=data,
                                       processing_class=tok)
        model.generation_config.eos_token_id = None  # every completion runs to max_completion_length, as gptlab's
        self.rows: list[dict[str, float]] = []
        self._wrap()

    def _wrap(self) -> None:
        import transformers

        trainer, rows = self.trainer, self.rows
        current: dict[str, float] = {}
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def timed(fn, key: str, drop_eos: bool = False):
            def wrapper(*a, **kw):
                if drop_eos:
                    kw.pop("eos_token_id", None)
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                sync()
                current[key] = current.get(key, 0.0) + time.perf_counter() - t0
                return out
            return wrapper

        trainer.model.generate = timed(trainer.model.generate, "generation", drop_eos=True)
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "prepare")

        class Steps(transformers.TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                current.clear()
                current["t0"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                sync()
                step = time.perf_counter() - current["t0"]
                gen = current.get("generation", 0.0)
                rows.append({"generation": gen, "scoring": current.get("prepare", 0.0) - gen,
                             "update": step - current.get("prepare", 0.0), "step": step})

        trainer.add_callback(Steps())

    def run_all(self) -> list[dict[str, float]]:
        self.trainer.train()
        return self.rows


def length_reward_trl(completions, **kwargs) -> list[float]:
    return [len(c) / 100 for c in completions]


# ----------------------------------------------------------------------------- table
def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    steps = [r["step"] for r in rows]
    out = {k: statistics.median(r[k] for r in rows) for k in ("generation", "scoring", "update")}
    out.update(min=min(steps), median=statistics.median(steps), max=max(steps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--G", type=int, default=8, help="completions per prompt (num_generations)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per side (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="A/B rounds (each builds both sides afresh)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on CUDA, 32-true on CPU")
    ap.add_argument("--no-trl", action="store_true", help="the gptlab side only")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides (default: torch's)")
    ap.add_argument("--tmp", default="/tmp/grpo_speed")
    ap.add_argument("--smoke", action="store_true", help="CPU, gpt2-tiny, 2 prompts x 2 completions x 4 tokens")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.model, args.prompts, args.G, args.prompt_len, args.new_tokens = "cpu", "gpt2-tiny", 2, 2, 4, 4
        args.steps, args.warmup = 1, 1
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    if args.threads:
        torch.set_num_threads(args.threads)
    why_not = "--no-trl" if args.no_trl else trl_missing()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()} ({torch.get_num_threads()} threads)"
    print(f"\n{args.model}, {device}, precision {args.precision}, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{args.prompts} prompts x {args.G} completions, "
          f"{args.prompt_len} prompt tokens, {args.new_tokens} new tokens each; {args.rounds} round(s) of "
          f"{args.warmup} warm-up + {args.steps} timed steps per side, interleaved:\n")
    timed: dict[str, list[dict[str, float]]] = {"gptlab": [], "TRL": []}
    sides = [GptlabSide] + ([] if why_not else [TrlSide])
    for _ in range(args.rounds):
        for side in sides:
            rows = side(args).run_all()
            timed[side.name] += rows[args.warmup:]
    print("| side | generation (s) | scoring (s) | update (s) | step min / median / max (s) | completions/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in timed.items():
        if not rows:
            print(f"| {name} | - | - | - | {why_not} | - |")
            continue
        s = summary(rows)
        print(f"| {name} | {s['generation']:.3f} | {s['scoring']:.3f} | {s['update']:.3f} | "
              f"{s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f} | {args.prompts * args.G / s['median']:.1f} |")
    if timed["TRL"]:
        ratio = summary(timed["TRL"])["median"] / summary(timed["gptlab"])["median"]
        print(f"\ngptlab speed / TRL speed (median step time ratio, same run): {ratio:.2f}x; "
              f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
