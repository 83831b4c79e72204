#!/usr/bin/env bash
# With/without the C2LIP concept terms (METHODS 3) at EQUAL steps on the procedural synthetic data:
# held-out accuracy per hard-negative kind (image -> true caption vs its hard negative), zero-shot
# top-1 and retrieval R@1, for a tiny ViT CLIP trained twice from the same seed and data order.
#
#   tools/compare_concept.sh [OUT]            # OUT default runs/compare_concept
#   STEPS=300 GLOBAL=siglip tools/compare_concept.sh runs/cc_siglip
#
# Env: STEPS (200), BATCH (32 per rank), GLOBAL (clip | siglip; siglip adds the -10 bias and makes
# the concept form sigmoid, as the paper), NPC (1.0), XAC (0.01), LAMBDA (1.0), SIZE (32 px),
# NPROC (1; >1 runs torchrun with gloo ranks), SEED (0). The synthetic shards are built once in OUT/synth.
set -euo pipefail
OUT=${1:-runs/compare_concept}
STEPS=${STEPS:-200}; BATCH=${BATCH:-32}; GLOBAL=${GLOBAL:-clip}; NPC=${NPC:-1.0}; XAC=${XAC:-0.01}
LAMBDA=${LAMBDA:-1.0}; SIZE=${SIZE:-32}; NPROC=${NPROC:-1}; SEED=${SEED:-0}
PY=${PYTHON:-python}
mkdir -p "$OUT"

if [ ! -f "$OUT/synth/manifest.json" ]; then
  $PY tools/make_synthetic.py --out "$OUT/synth" --train-shards 8 --val-shards 1 --heldout-shards 2 \
    --per-shard 512 --image-size "$SIZE" --seed "$SEED"
fi

BIAS=()
if [ "$GLOBAL" = siglip ]; then BIAS=("model.init_logit_bias=-10"); fi
MODEL="{embed_dim: 64, vision_cfg: {image_size: $SIZE, layers: 2, width: 64, patch_size: 8, head_width: 32, mlp_ratio: 2.0}, text_cfg: {context_length: 32, vocab_size: 49408, width: 64, heads: 2, layers: 2, mlp_ratio: 2.0}}"

train() {  # name, extra overrides...  (an arm whose evaluation exists is reused, not retrained)
  local name=$1; shift
  if [ -f "$OUT/eval_$name.synthetic.json" ]; then echo "reusing $OUT/eval_$name.*"; return; fi
  local launch=("$PY" -m powerclip)
  if [ "$NPROC" -gt 1 ]; then launch=(torchrun --standalone --nproc_per_node "$NPROC" -m powerclip); fi
  "${launch[@]}" train -c configs/tiny_cpu.yaml \
    "data.sources=[{shards: '$OUT/synth/train/{00000..00007}.tar'}]" \
    "model.config=$MODEL" "${BIAS[@]}" \
    data.batch_size="$BATCH" data.workers=1 data.shuffle_buffer=512 \
    loss.global_loss="$GLOBAL" optim.warmup_steps=20 \
    train.steps="$STEPS" train.seed="$SEED" train.log_every=20 train.run_dir="$OUT/$name" \
    checkpoint.every_steps=0 checkpoint.resume=none "$@"
  $PY -m powerclip eval --model "$OUT/$name" --task synthetic --data "$OUT/synth" --split heldout \
    --out "$OUT/eval_$name.json"
}

train baseline data.concepts=false
train concept data.concepts=true loss.concept.npc_weight="$NPC" loss.concept.xac_weight="$XAC" \
  loss.concept.xac_lambda="$LAMBDA"

$PY - "$OUT" "$STEPS" "$GLOBAL" <<'EOF'
import json, sys
from pathlib import Path
out, steps, glob = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
kinds = ["swap-att", "swap-obj", "replace-att", "replace-obj", "replace-rel", "add-obj"]
rows = {}
for arm in ("baseline", "concept"):
    r = {}
    for k in kinds:
        f = out / f"eval_{arm}.synthetic_{k}.json"
        if f.exists():
            m = json.loads(f.read_text())["metrics"]
            r[k] = (m["acc"], int(m["n"]))
    r["zero-shot top1"] = (json.loads((out / f"eval_{arm}.synthetic.json").read_text())["metrics"]["acc1"], None)
    ret = json.loads((out / f"eval_{arm}.synthetic_retrieval.json").read_text())["metrics"]
    r["retrieval i->t R@1"] = (ret["text_retrieval_recall@1"], None)
    rows[arm] = r
lines = [f"held-out synthetic, {steps} steps each, global loss {glob}", "",
         f"| metric | n | without concepts | with NPC+XAC | delta |", "|---|---|---|---|---|"]
for k in rows["baseline"]:
    a, n = rows["baseline"][k]
    b, _ = rows["concept"][k]
    lines.append(f"| {k} | {n or ''} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
text = "\n".join(lines)
print(text)
(out / "comparison.md").write_text(text + "\n")
EOF
