#!/usr/bin/env bash
# DeGLA on the procedural synthetic data (METHODS 4, issue 6 item 5): pretrain a tiny CLIP, export it,
# then fine-tune it three ways at equal steps, seed and data order, and evaluate every model on the
# held-out split (scenes with colour-shape pairs never seen in training): accuracy per hard-negative
# kind (swap-att, swap-obj, replace-att, replace-obj, replace-rel, add-obj), zero-shot and retrieval.
#
#   pretrained   the exported starting point, not fine-tuned
#   clip_ft      fine-tuned with the plain CLIP loss (control: more training, no negatives)
#   negclip      fine-tuned with NegCLIP alone (loss.degla base term only, no teacher)
#   degla        fine-tuned with DeGLA (NegCLIP + 0.1 IGC + 0.1 TGC + distillation to the EMA teacher)
#
#   tools/compare_degla.sh                               # defaults below
#   OUT=runs/cmp PRE_STEPS=600 FT_STEPS=200 tools/compare_degla.sh optim.lr=5e-5   # extra FT overrides
#
# NEGATIVES=rules (default) rewrites the training split's negatives with tools/make_negatives.py
# (rule backend over spaCy tags, corpus vocabulary); NEGATIVES=grammar keeps the generator's exact ones.
# NPROC=2 trains on 2 CPU ranks through torchrun (default: one process). CONTROL=0 skips clip_ft.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/compare_degla}
PRE_STEPS=${PRE_STEPS:-400}
FT_STEPS=${FT_STEPS:-150}
BATCH=${BATCH:-64}
NPROC=${NPROC:-1}
NEGATIVES=${NEGATIVES:-rules}
SYNTH=${SYNTH:-$OUT/synth}
PY=${PYTHON:-python}
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
quiet() { grep --line-buffered -v -e "Warning" -e "warn(" -e "return func" -e "return torch.cat" -e "^W1" \
  -e "real_accelerator" -e "cpp_extension" -e "built successfully" || true; }

if [ ! -f "$SYNTH/manifest.json" ]; then
  "$PY" tools/make_synthetic.py --out "$SYNTH" --train-shards "${TRAIN_SHARDS:-4}" --per-shard 512 --image-size 64
fi
ntrain=$(ls "$SYNTH"/train/*.tar | wc -l)
last=$(printf %05d $((ntrain - 1)))
shards="$SYNTH/train/{00000..$last}.tar"
ft_shards=$shards
if [ "$NEGATIVES" = rules ]; then
  if [ ! -f "$OUT/neg_train/negatives_report.json" ]; then
    "$PY" tools/make_negatives.py --input "$SYNTH/train" --output "$OUT/neg_train" -k 4 --seed 0
  fi
  ft_shards="$OUT/neg_train/{00000..$last}.tar"
fi

launch=("$PY" -m powerclip)
if [ "$NPROC" -gt 1 ]; then launch=(torchrun --standalone --nproc_per_node "$NPROC" -m powerclip); fi

if [ ! -f "$OUT/pretrained/open_clip_config.json" ]; then
  "${launch[@]}" train -c configs/tiny_cpu.yaml "data.sources=[{shards: '$shards'}]" "data.batch_size=$BATCH" \
    "train.steps=$PRE_STEPS" "train.run_dir=$OUT/pre" "checkpoint.every_steps=$PRE_STEPS" \
    "checkpoint.resume=none" 2>&1 | quiet
  "$PY" -m powerclip export "$OUT/pre" --out "$OUT/pretrained"
fi

finetune() {  # finetune NAME [overrides...]
  local name=$1; shift
  "${launch[@]}" train -c configs/degla_tiny_cpu.yaml "model.pretrained=$OUT/pretrained" \
    "data.sources=[{shards: '$ft_shards'}]" "data.batch_size=$BATCH" "train.steps=$FT_STEPS" \
    "train.run_dir=$OUT/$name" "checkpoint.every_steps=$FT_STEPS" "checkpoint.resume=none" "$@" 2>&1 | quiet
}
[ -f "$OUT/degla/metrics.jsonl" ] || finetune degla "$@"
[ -f "$OUT/negclip/metrics.jsonl" ] || finetune negclip loss.degla.igc_weight=0 loss.degla.tgc_weight=0 \
  loss.degla.distill_weight=0 "$@"
names="pretrained negclip degla"
if [ "${CONTROL:-1}" = 1 ]; then
  [ -f "$OUT/clip_ft/metrics.jsonl" ] || finetune clip_ft loss.degla.enabled=false data.num_negatives=0 "$@"
  names="pretrained clip_ft negclip degla"
fi

for name in $names; do
  src="$OUT/$name"
  "$PY" -m powerclip eval --model "$src" --task synthetic --data "$SYNTH" --out "$OUT/eval/$name" 2>&1 | quiet >/dev/null
done

"$PY" - "$OUT" $names <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
names = sys.argv[2:]
def metrics(name):
    flat = {}
    for f in sorted((out / "eval" / name).glob("*.json")):
        r = json.loads(f.read_text())
        for k, v in (r.get("metrics") or {}).items():
            if k != "n" and isinstance(v, (int, float)):
                flat[f"{r['dataset']}/{k}"] = v
    return flat
m = {n: metrics(n) for n in names}
keys = sorted(set().union(*m.values()))
print(f"\n{'metric (heldout split)':44s}" + "".join(f"{n:>11s}" for n in names))
for k in keys:
    print(f"{k:44s}" + "".join(f"{m[n].get(k, float('nan')):11.4f}" for n in names))
for name in names[1:]:
    last = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])
    terms = ", ".join(f"{k[5:]} {v:.4f}" for k, v in sorted(last.items()) if k.startswith("loss/"))
    print(f"{name}: final step {last['step']}, loss {last['loss']:.4f} ({terms})")
(out / "summary.json").write_text(json.dumps(m, indent=1))
PYEOF
