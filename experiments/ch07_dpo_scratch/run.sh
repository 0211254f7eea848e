#!/usr/bin/env bash
# Preference tuning end to end on a CPU (book chapter 7 + its DPO bonus + chapter 8.7):
#   1. SFT from scratch (experiment=ch07_instruct_scratch) -> checkpoint + responses.json (110 test answers)
#   2. DPO from that checkpoint (experiment=ch07_dpo_scratch) -> responses.json for the same 110 prompts
#   3. a reward model from the same checkpoint (experiment=ch08_reward_model_scratch)
#   4. SFT vs DPO answers: reward-model scores side by side (gptlab-reward), and the pairwise
#      LLM judge in both orders (gptlab-judge ... baseline=...) when an Ollama server is running
#
#   bash experiments/ch07_dpo_scratch/run.sh                 # everything into outputs/preference_scratch/<time>/
#   bash experiments/ch07_dpo_scratch/run.sh outputs/my_run  # or into this folder (steps already done are skipped)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-outputs/preference_scratch/$(date +%Y-%m-%d_%H-%M-%S)}"
mkdir -p "$out"

best() { ls "$1"/checkpoints/best-*.ckpt | head -n 1; }   # the checkpoint test=true evaluated

if [ ! -f "$out/sft/responses.json" ]; then
  time gptlab-train experiment=ch07_instruct_scratch hydra.run.dir="$out/sft"
fi
sft="$(best "$out/sft")"
if [ ! -f "$out/dpo/responses.json" ]; then
  time gptlab-train experiment=ch07_dpo_scratch sft_checkpoint="$sft" hydra.run.dir="$out/dpo"
fi
if [ ! -d "$out/rm/checkpoints" ]; then
  time gptlab-train experiment=ch08_reward_model_scratch sft_checkpoint="$sft" hydra.run.dir="$out/rm"
fi
gptlab-reward ckpt_path="$(best "$out/rm")" responses="$out/dpo/responses.json" baseline="$out/sft/responses.json"
if curl -sf http://localhost:11434/api/tags > /dev/null 2>&1; then
  gptlab-judge responses="$out/dpo/responses.json" baseline="$out/sft/responses.json" judge.model=llama3
else
  echo "no Ollama server on localhost:11434: skipping the pairwise judge (ollama serve && ollama pull llama3)"
fi
