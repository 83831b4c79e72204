#!/usr/bin/env bash
# README command 1: the whole powerclip pipeline on a laptop CPU, from nothing, in a few minutes.
#   1. set up ./.venv (tools/setup_env.sh; a no-op when already installed)
#   2. build procedural synthetic shards (64 px; train / val / heldout splits)
#   3. train configs/tiny_cpu.yaml on 2 CPU ranks (gloo) with DeepSpeed ZeRO-2, TensorBoard in demo/run/tb
#   4. export the run to an open_clip folder (powerclip export)
#   5. reload it with open_clip alone and print zero-shot accuracy on the held-out split's one-object scenes
# Extra arguments are config overrides for the training run (e.g. `bash tools/demo.sh train.steps=100`).
set -euo pipefail
cd "$(dirname "$0")/.."
t_start=$(date +%s)
phase() { echo; echo "=== [$(( $(date +%s) - t_start ))s] $*"; }

phase "environment (tools/setup_env.sh)"
bash tools/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

phase "synthetic shards -> demo/synth"
if [ ! -f demo/synth/manifest.json ]; then
  python tools/make_synthetic.py --out demo/synth --train-shards 8 --per-shard 512 --val-shards 1 \
    --heldout-shards 1 --image-size 64
else
  echo "demo/synth exists; reusing it"
fi

phase "training on 2 CPU ranks, ZeRO-2 (configs/tiny_cpu.yaml) -> demo/run"
rm -rf demo/run demo/export
t_train=$(date +%s)
python -m torch.distributed.run --standalone --nproc_per_node 2 --log-dir demo/torchrun-logs -m powerclip train \
  -c configs/tiny_cpu.yaml train.run_dir=demo/run "$@" 2>&1 \
  | grep --line-buffered -v -e "Warning" -e "warnings.warn" -e "return func" -e "return torch.cat" -e "^W1" -e "^\*\*\*\*" \
             -e "OMP_NUM_THREADS" -e "real_accelerator" -e "cpp_extension" -e "built successfully"
train_s=$(( $(date +%s) - t_train ))

phase "export -> demo/export (open_clip folder)"
python -m powerclip export demo/run --out demo/export

phase "zero-shot with open_clip only (tools/demo_zeroshot.py)"
python tools/demo_zeroshot.py --model demo/export --data demo/synth --split heldout

total_s=$(( $(date +%s) - t_start ))
echo
echo "demo done in ${total_s}s (training ${train_s}s). TensorBoard: tensorboard --logdir demo/run/tb"
