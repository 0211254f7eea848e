"""Where a PPO iteration spends its time: rollout generation vs scoring vs the PPO update.

    python experiments/ppo_speed/run.py --smoke                                    # CPU, tiny shapes, seconds
    python experiments/ppo_speed/run.py --device cuda --model gpt2-small --precision bf16-mixed
    python experiments/ppo_speed/run.py --device cpu --model gpt2-mini --caches dynamic,static

Each PPO iteration of ``task=ppo`` (``gptlab.tasks.ppo.PPOTask``, run by a Lightning Trainer as
``gptlab-train`` runs it) is timed by the task itself (``time/*`` metrics, one device sync each):

  generation  batched, left-padded KV-cache sampling of ``--new-tokens`` per prompt
  scoring     the reward model's forward + the policy's and the reference's forward passes
              (log-probs and values of every response token)
  update      ``ppo_epochs`` x ``num_mini_batches`` optimizer steps (forward + backward + AdamW)

for each rollout KV cache (``task.generation_cache``): ``dynamic`` (grows with the sequence),
``static`` (preallocated, fixed shapes) and ``compiled`` (static + ``torch.compile``: a CUDA graph
per decode step on a GPU). Random weights (speed does not depend on them); the reward model is a
second random backbone of the same shape with a scalar head, as a trained one would be; responses
never stop early (``stop_token_id`` null), so every iteration generates the same number of tokens.
The first ``--warmup`` iterations (allocator, autotuning, compilation) are left out of the means.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from torch.utils.data import DataLoader

from gptlab.data.prompt_styles import left_pad
from gptlab.model.config import GPTConfig
from gptlab.model.gpt import GPT
from gptlab.tasks.ppo import PPOTask
from gptlab.tasks.reward import add_reward_head, reward_scores
from gptlab.alignment.rollout import GENERATION_CACHES

PHASES = ("generation_s", "scoring_s", "update_s")


class RandomRewardModel:
    """A reward model's cost without its training: a random backbone with a scalar head, scoring
    prompt + response at the last token (what :class:`gptlab.rewards.RewardModel` does)."""

    def __init__(self, config: GPTConfig):
        self.model = add_reward_head(GPT(config)).eval().requires_grad_(False)

    def to(self, device: torch.device) -> "RandomRewardModel":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, *, prompt_ids: list[list[int]], completion_ids: list[list[int]], **kwargs) -> torch.Tensor:
        device = next(self.model.parameters()).device
        rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
        ids = torch.tensor(rows, device=device)  # equal lengths: prompts and responses never stop early
        return reward_scores(self.model, ids).float()


class IterationTimes(L.Callback):
    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        row = {k[len("time/"):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/")}
        row["iteration_s"] = time.perf_counter() - self._t0
        self.rows.append(row)


def prompts(n: int, batch: int, length: int, vocab: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (n, length), generator=g).tolist()

    def collate(items):
        ids, mask = left_pad([rows[i] for i in items], 0)
        return {"prompt_ids": ids, "prompt_attention_mask": mask, "index": torch.tensor(items)}

    return DataLoader(list(range(n)), batch_size=batch, shuffle=False, collate_fn=collate, drop_last=True)


def run(args: argparse.Namespace, cache: str) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    config = GPTConfig.from_name(args.model, drop_rate=0.0)
    task = PPOTask(model=config.to_dict(), reward=RandomRewardModel(config), generation_cache=cache,
                   max_new_tokens=args.new_tokens, temperature=0.7, stop_token_id=None, ppo_epochs=args.ppo_epochs,
                   num_mini_batches=args.mini_batches, lr=1e-6, lr_schedule="constant", log_samples_every_n=0,
                   adapter=dict(name="lora", rank=16, alpha=16) if args.lora else None)
    timer = IterationTimes()
    iterations = args.warmup + args.iters
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=args.precision, max_epochs=1,
                        limit_train_batches=iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        callbacks=[timer])
    trainer.fit(task, train_dataloaders=prompts(iterations * args.batch, args.batch, args.prompt_len,
                                                config.vocab_size))
    timed = timer.rows[args.warmup:]
    return {k: statistics.mean(r[k] for r in timed) for k in (*PHASES, "iteration_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--batch", type=int, default=16, help="prompts per iteration")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--caches", default=",".join(GENERATION_CACHES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default=None, help="Lightning precision (default: bf16-mixed on CUDA, 32 on CPU)")
    ap.add_argument("--lora", action="store_true", help="LoRA rank 16 (reference = the policy with adapters off)")
    ap.add_argument("--smoke", action="store_true", help="CPU, gpt2-tiny, 2 prompts x 4 tokens: checks the code path")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.model, args.batch, args.prompt_len, args.new_tokens = "cpu", "gpt2-tiny", 2, 4, 4
        args.iters, args.warmup, args.ppo_epochs, args.mini_batches = 1, 1, 1, 1
        args.caches = "dynamic,static"
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    caches = args.caches.split(",")
    unknown = sorted(set(caches) - set(GENERATION_CACHES))
    if unknown:
        ap.error(f"unknown --caches {unknown}; valid choices: {list(GENERATION_CACHES)}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.model}{' + LoRA r16' if args.lora else ''}, {device}, precision {args.precision}; "
          f"{args.batch} prompts x {args.prompt_len} tokens, {args.new_tokens} new tokens each; "
          f"{args.ppo_epochs} PPO epochs x {args.mini_batches} minibatches; mean of {args.iters} iterations after "
          f"{args.warmup} warm-up:\n")
    print("| rollout cache | generation (s) | scoring (s) | update (s) | iteration (s) | generation share | "
          "generated tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for cache in caches:  # one row at a time: a time cap that cuts the run short keeps the rows done
        r = run(args, cache)
        share = r["generation_s"] / r["iteration_s"]
        tps = args.batch * args.new_tokens / r["generation_s"]
        print(f"| {cache} | {r['generation_s']:.3f} | {r['scoring_s']:.3f} | {r['update_s']:.3f} | "
              f"{r['iteration_s']:.3f} | {share:.0%} | {tps:,.0f} |", flush=True)

if __name__ == "__main__":
    main()
