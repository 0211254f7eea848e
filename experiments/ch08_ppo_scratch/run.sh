#!/usr/bin/env bash
# RLHF with PPO end to end on a CPU (book chapter 8.5, CPU-sized):
#   1. SFT from scratch (experiment=ch07_instruct_scratch)               -> the policy's start and the reference
#   2. a reward model from it (experiment=ch08_reward_model_scratch)     -> polite vs impolite answers
#   3. PPO against that reward model (experiment=ch08_ppo_scratch)       -> curves in TensorBoard / csv, responses.json
#   4. the SFT model's answers to the same 110 test prompts (gptlab-respond), and both scored side by side
#      by the reward model (gptlab-reward ... baseline=...)
#
#   bash experiments/ch08_ppo_scratch/run.sh                 # everything into outputs/ppo_scratch/<time>/
#   bash experiments/ch08_ppo_scratch/run.sh outputs/my_run  # or into this folder (steps already done are skipped)
#   SFT_CKPT=<ckpt> bash experiments/ch08_ppo_scratch/run.sh # start from an SFT checkpoint you already have
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-outputs/ppo_scratch/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$out"

best() { ls "$1"/checkpoints/best-*.ckpt | head -n 1; }

sft="${SFT_CKPT:-}"
if [ -z "$sft" ]; then
  if [ ! -d "$out/sft/checkpoints" ]; then
    time gptlab-train experiment=ch07_instruct_scratch test=false hydra.run.dir="$out/sft"
  fi
  sft="$(best "$out/sft")"
fi
if [ ! -d "$out/rm/checkpoints" ]; then
  time gptlab-train experiment=ch08_reward_model_scratch sft_checkpoint="$sft" hydra.run.dir="$out/rm"
fi
rm_ckpt="$(best "$out/rm")"
if [ ! -f "$out/ppo/responses.json" ]; then
  time gptlab-train experiment=ch08_ppo_scratch sft_checkpoint="$sft" reward_checkpoint="$rm_ckpt" \
    hydra.run.dir="$out/ppo"
fi
if [ ! -f "$out/sft_responses.json" ]; then
  gptlab-respond ckpt_path="$sft" data=instruct output="$out/sft_responses.json" max_new_tokens=32 batch_size=16
fi
gptlab-reward ckpt_path="$rm_ckpt" responses="$out/ppo/responses.json" baseline="$out/sft_responses.json"
echo "curves: tensorboard --logdir $out/ppo/tensorboard   (or $out/ppo/csv/metrics.csv)"
