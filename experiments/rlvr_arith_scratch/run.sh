#!/usr/bin/env bash
# RL with verifiable rewards end to end on a CPU:
#   1. the problems (make_data.py): worked SFT examples, training, validation and held-out problems (never shared)
#   2. a tokenizer trained on the worked examples (gptlab-tokenizer train: a byte-level BPE, 280 ids)
#   3. SFT from scratch on the worked examples (experiment=rlvr_arith_sft_scratch)    -> the GRPO start
#   4. GRPO from it (experiment=rlvr_arith_scratch)                                   -> curves, test/rewards/answer/mean
#   5. gptlab-solve, greedy, on the same held-out problems: the SFT model and the GRPO model side by side
#
#   bash experiments/rlvr_arith_scratch/run.sh                                  # into outputs/rlvr_arith_scratch/<time>/
#   bash experiments/rlvr_arith_scratch/run.sh outputs/my_run                   # or this folder (done steps are skipped)
#   SEED=7 bash experiments/rlvr_arith_scratch/run.sh outputs/seed7             # another training seed (same problems)
#   bash experiments/rlvr_arith_scratch/run.sh outputs/dr task.loss_type=dr_grpo task.scale_rewards=none  # GRPO overrides
#   SFT_CKPT=<ckpt> TOKENIZER=<folder> bash experiments/rlvr_arith_scratch/run.sh outputs/x   # reuse an SFT model (and its tokenizer)
#   python experiments/rlvr_arith_scratch/report.py dapo=outputs/a,outputs/b --plot curves.png  # the page's table and curves
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-outputs/rlvr_arith_scratch/$(date +%Y-%m-%d_%H-%M-%S)}"
shift || true
seed="${SEED:-123}"
mkdir -p "$out"

best() { ls "$1"/checkpoints/best-*.ckpt | head -n 1; }

if [ ! -f "$out/data/sft.json" ]; then
  python experiments/rlvr_arith_scratch/make_data.py --out "$out/data" --extra-test 1000
fi
tok="${TOKENIZER:-$out/tokenizer}"
if [ ! -f "$tok/manifest.json" ]; then
  gptlab-tokenizer train data.path="$out/data/corpus.txt" vocab_size=320 out="$tok" progress=false
fi
sft="${SFT_CKPT:-}"
if [ -z "$sft" ]; then
  if [ ! -d "$out/sft/checkpoints" ]; then
    time gptlab-train experiment=rlvr_arith_sft_scratch data.path="$out/data/sft.json" tokenizer="$tok" seed="$seed" \
      trainer.enable_progress_bar=false hydra.run.dir="$out/sft"
  fi
  sft="$(best "$out/sft")"
fi
if [ ! -f "$out/grpo/responses.json" ]; then
  time gptlab-train experiment=rlvr_arith_scratch sft_checkpoint="$sft" tokenizer="$tok" seed="$seed" \
    trainer.enable_progress_bar=false hydra.run.dir="$out/grpo" "$@"
fi
for name in sft grpo; do
  ckpt="$sft"; [ "$name" = grpo ] && ckpt="$out/grpo/checkpoints/last.ckpt"
  if [ ! -f "$out/solve_$name.jsonl.summary.json" ]; then
    gptlab-solve ckpt_path="$ckpt" method=greedy max_new_tokens=24 output="$out/solve_$name.jsonl" progress=false
  fi
  # 999 more held-out problems (test_extra.jsonl: none in the training, validation or test set)
  if [ -f "$out/data/test_extra.jsonl" ] && [ ! -f "$out/solve_${name}_extra.jsonl.summary.json" ]; then
    gptlab-solve ckpt_path="$ckpt" data.path="$out/data/test_extra.jsonl" data.train_ratio=0.001 data.test_ratio=0.999 \
      method=greedy max_new_tokens=24 batch_size=50 output="$out/solve_${name}_extra.jsonl" progress=false
  fi
done
python - "$out" <<'PY'
import json, sys
out = sys.argv[1]
acc = {n: json.load(open(f"{out}/solve_{n}.jsonl.summary.json"))["accuracy"] for n in ("sft", "grpo")}
print(f"held-out greedy accuracy: SFT {acc['sft']:.3f} -> GRPO {acc['grpo']:.3f} ({100 * (acc['grpo'] - acc['sft']):+.1f} points)")
PY
echo "curves: tensorboard --logdir $out/grpo/tensorboard   (or $out/grpo/csv/metrics.csv)"
