#!/usr/bin/env bash
# Train the tiny model with and without the powerset term (METHODS 2) at equal steps on the
# procedural synthetic data, then evaluate both on the held-out split: accuracy per hard-negative
# kind (swap-att, swap-obj, replace-att, replace-obj, replace-rel, add-obj), zero-shot and retrieval.
#
#   tools/compare_powerset.sh                       # defaults below
#   OUT=runs/cmp STEPS=600 WEIGHT=0.2 tools/compare_powerset.sh optim.lr=2e-3   # extra overrides
#
# Both runs use the same config, seed, data order and steps; only loss.powerset.weight differs.
# NPROC=2 trains on 2 CPU ranks through torchrun (default: one process); PARALLEL=1 trains both
# models at the same time. Logs: OUT/{clip,powerset}.log; results: OUT/{clip,powerset}/eval/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/compare_powerset}
STEPS=${STEPS:-300}
WEIGHT=${WEIGHT:-0.2}
BATCH=${BATCH:-64}
CONFIG=${CONFIG:-configs/tiny_cpu.yaml}
NPROC=${NPROC:-1}
SYNTH=${SYNTH:-$OUT/synth}
PY=${PYTHON:-python}

if [ ! -f "$SYNTH/manifest.json" ]; then
  "$PY" tools/make_synthetic.py --out "$SYNTH" --train-shards "${TRAIN_SHARDS:-4}" --per-shard 512 --image-size 64
fi
ntrain=$(ls "$SYNTH"/train/*.tar | wc -l)
shards="$SYNTH/train/{00000..$(printf %05d $((ntrain - 1)))}.tar"

run() {  # run NAME WEIGHT [overrides...]
  local name=$1 w=$2; shift 2
  local launch=("$PY" -m powerclip)
  if [ "$NPROC" -gt 1 ]; then
    launch=(torchrun --nproc_per_node "$NPROC" --master_port "$((29500 + RANDOM % 1000))" -m powerclip)
  fi
  "${launch[@]}" train -c "$CONFIG" "data.sources=[{shards: '$shards'}]" "data.batch_size=$BATCH" \
    "train.steps=$STEPS" "train.run_dir=$OUT/$name" "loss.powerset.weight=$w" "checkpoint.every_steps=$STEPS" \
    "checkpoint.resume=none" "$@" > "$OUT/$name.log" 2>&1
  "$PY" -m powerclip eval --model "$OUT/$name" --task synthetic --data "$SYNTH" --out "$OUT/$name/eval" \
    >> "$OUT/$name.log" 2>&1
  echo "$name done (log: $OUT/$name.log)"
}

mkdir -p "$OUT"
if [ "${PARALLEL:-0}" = 1 ]; then  # both runs at once (a shared machine gives two processes more CPU)
  run clip 0 "$@" &
  run powerset "$WEIGHT" "$@" &
  wait %1 && wait %2
else
  run clip 0 "$@"
  run powerset "$WEIGHT" "$@"
fi

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def metrics(name):
    flat = {}
    for f in sorted((out / name / "eval").glob("*.json")):
        r = json.loads(f.read_text())
        for k, v in (r.get("metrics") or {}).items():
            if k != "n":
                flat[f"{r['dataset']}/{k}"] = v
    return flat
a, b = metrics("clip"), metrics("powerset")
print(f"\n{'metric (heldout)':48s} {'CLIP':>8s} {'+powerset':>10s} {'diff':>8s}")
for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, float("nan")), b.get(k, float("nan"))
    print(f"{k:48s} {va:8.4f} {vb:10.4f} {vb - va:+8.4f}")
for name in ("clip", "powerset"):
    last = (out / name / "metrics.jsonl").read_text().splitlines()[-1]
    rec = json.loads(last)
    print(f"{name}: final step {rec['step']}, loss {rec['loss']:.4f}" +
          (f", powerset {rec['loss/powerset']:.4f}" if "loss/powerset" in rec else ""))
PYEOF
