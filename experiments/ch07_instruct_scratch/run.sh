#!/usr/bin/env bash
# Chapter 7 from scratch on a CPU: train, generate the 110 test responses, then (optional) judge them.
#   bash experiments/ch07_instruct_scratch/run.sh
# (test=true and task_name= are also set by the preset; they are repeated here so the command works
#  while conf/train.yaml still lists _self_ last, which lets its defaults win over experiment presets)
set -euo pipefail
cd "$(dirname "$0")/../.."
run_dir="outputs/ch07_instruct_scratch/runs/$(date +%Y-%m-%d_%H-%M-%S)"
time gptlab-train experiment=ch07_instruct_scratch test=true task_name=ch07_instruct_scratch \
  hydra.run.dir="$run_dir" "$@"
echo "responses: $run_dir/responses.json"
if curl -sf http://localhost:11434/api/tags > /dev/null 2>&1; then
  gptlab-judge responses="$run_dir/responses.json" judge.model=llama3
else
  echo "no Ollama server on localhost:11434: skipping the judge (ollama serve && ollama pull llama3)"
fi
