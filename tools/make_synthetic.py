#!/usr/bin/env python
"""Write the procedural compositional dataset (powerclip.data.synthetic) as webdataset shards.

Example: python tools/make_synthetic.py --out data/synth --train-shards 8 --per-shard 256 --image-size 64
Output: OUT/{train,val,heldout}/NNNNN.tar + sizes.json, OUT/manifest.json, OUT/classes.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.data.synthetic import make_synthetic  # noqa: E402
from powerclip.errors import describe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-shards", type=int, default=4)
    p.add_argument("--val-shards", type=int, default=1)
    p.add_argument("--heldout-shards", type=int, default=1)
    p.add_argument("--per-shard", type=int, default=256, help="samples per shard")
    p.add_argument("--image-size", type=int, default=64, help="pixels per side (64 default; 224 works)")
    p.add_argument("--format", choices=["png", "jpg"], default="png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--relation-prob", type=float, default=1.0,
                   help="share of multi-object captions said with a relation (the rest: 'X and Y', random order)")
    p.add_argument("--colours", type=int, default=7,
                   help="colour vocabulary size (7: the default data; up to the palette's 27: binding twins rare)")
    p.add_argument("--binding-pairs", type=int, default=2000,
                   help="binding pairs per split (powerclip.data.synthetic_pairs; drawn at evaluation, not stored)")
    p.add_argument("--single-objects", type=int, default=2000,
                   help="single-object zero-shot cases per split (drawn at evaluation, not stored)")
    a = p.parse_args(argv)
    try:
        m = make_synthetic(a.out, a.train_shards, a.val_shards, a.heldout_shards, a.per_shard, a.image_size,
                           a.seed, a.format, a.relation_prob, a.colours, a.binding_pairs,
                           a.single_objects)
    except (ValueError, OSError) as e:  # a bad option, input or output folder, or disk: one line (OSError: path + fix)
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    for split, info in m["splits"].items():
        print(f"{split}: {info['num_samples']} samples in {info['shards']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
