#!/usr/bin/env python
"""Print one sample of a shard decoded: its members, caption, phrases (powerclip's json spans and the
published ``.njson`` ones, decoded to text), regions (with the index base their indices suggest),
concepts and negatives, and the phrase positions the training loader would use.

For checking by eye that a shard set is read as intended (PowerCLIP's published shards in particular:
``powerclip.data.published`` states what is assumed about their ``.njson`` and region indices).

Example: python tools/show_sample.py /data/cc12m/cc12m-train-0000.tar --index 3 --region-grid 14
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shard", help="a .tar shard")
    p.add_argument("--index", type=int, default=0, help="which sample (0 = the first)")
    p.add_argument("--key", default=None, help="the sample with this key instead of --index")
    p.add_argument("--region-grid", type=int, default=14, help="grid of the stored patch indices (data.region_grid)")
    p.add_argument("--context-length", type=int, default=77, help="tokenizer context (data.context_length)")
    a = p.parse_args(argv)

    from powerclip.data.published import (
        IndexEvidence,
        NjsonError,
        PatchRegionError,
        decode_ids,
        find_run,
        read_njson,
        read_patch_sets,
    )
    from powerclip.data.stream import ERROR_KEY, read_shard
    from powerclip.data.text import build_tokenizer

    if not Path(a.shard).is_file():
        print(f"show_sample: error: {a.shard} does not exist", file=sys.stderr)
        return 2
    sample = None
    for i, s in enumerate(read_shard(a.shard)):
        if ERROR_KEY in s and s[ERROR_KEY] != "empty_shard":
            print(f"show_sample: error: {a.shard}: {s[ERROR_KEY]} ({s.get('__detail__', '')})", file=sys.stderr)
            return 2
        if (a.key is not None and s.get("__key__") == a.key) or (a.key is None and i == a.index):
            sample = s
            break
    if sample is None or ERROR_KEY in sample:
        print(f"show_sample: error: {a.shard} has no sample {a.key or a.index}", file=sys.stderr)
        return 2
    out = print
    out(f"key      {sample['__key__']}   ({a.shard})")
    out("members  " + ", ".join(f"{k} ({len(v)} B)" for k, v in sample.items()
                                if not k.startswith("__") and isinstance(v, bytes)))
    ann = {}
    if "json" in sample:
        try:
            ann = json.loads(sample["json"])
        except ValueError as e:
            out(f"json     unreadable: {e}")
    caption = ann.get("caption") if isinstance(ann, dict) else None
    if not caption and "txt" in sample:
        caption = sample["txt"].decode("utf-8", "replace")
    out(f"caption  {caption!r}")
    tok = build_tokenizer("clip", a.context_length)
    enc = tok.encode(caption or "")
    out(f"tokens   {len(enc.ids)} (SOT..EOT)")
    for ph in (ann.get("phrases") or []) if isinstance(ann, dict) else []:
        text = (caption or "")[int(ph["start"]):int(ph["end"])]
        out(f"phrase   json  {ph.get('label', '?'):4} [{ph['start']}:{ph['end']}] {text!r}")
    if "njson" in sample:
        try:
            phrases = read_njson(sample["njson"])
        except NjsonError as e:
            out(f"njson    unreadable as CSR lens + ids: {e}; raw start: {sample['njson'][:200]!r}")
            phrases = []
        ids = enc.ids[:-1]
        for ph in phrases:
            pos = find_run(ids, ph)
            where = f"token positions {pos[0]}..{pos[-1]}" if pos else "NOT found in the caption's tokens"
            out(f"phrase   njson {len(ph):3} ids {decode_ids(ph)!r}: {where}")
    for c in (ann.get("concepts") or []) if isinstance(ann, dict) else []:
        out(f"concept  {c.get('text')!r}")
    for n in (ann.get("negatives") or []) if isinstance(ann, dict) else []:
        out(f"negative {n.get('text')!r}")
    for b in (ann.get("boxes") or []) if isinstance(ann, dict) else []:
        out(f"box      {b}")
    if "samlens.npy" in sample and "samcat.npy" in sample:
        try:
            lens, cat = read_patch_sets(sample["samlens.npy"], sample["samcat.npy"])
        except PatchRegionError as e:
            out(f"regions  unreadable: {e}")
        else:
            ev = IndexEvidence()
            ev.add(cat, a.region_grid)
            base = ev.base(a.region_grid)
            said = "fits no base" if base is None else f"suggests {base}-based"
            out(f"regions  {lens.size} regions, sizes {lens.tolist()[:12]}{' ...' if lens.size > 12 else ''}; "
                f"indices {int(cat.min()) if cat.size else '-'}..{int(cat.max()) if cat.size else '-'} on a "
                f"{a.region_grid}x{a.region_grid} grid: {said} ({ev.describe(a.region_grid)}; one sample: "
                "powerclip check reads 64)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
