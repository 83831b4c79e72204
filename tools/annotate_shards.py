#!/usr/bin/env python
"""Add powerclip's annotation (parse-tree phrase spans, concepts) to existing webdataset shards,
copying every other member byte for byte (powerclip.data.annotate_shards).

For shard sets someone else built - PowerCLIP's CC12M shards with their SAM patch regions
(samlens.npy/samcat.npy), img2dataset output - without re-sharding them. Output: the same shard
names in --out, sizes.json, manifest.json (samples left unannotated, and why; they are copied as
they are), _annotate/ (resume records: rerunning the same command redoes only unfinished shards).

Example: python tools/annotate_shards.py --input 'cc12m/{00000..02175}.tar' --out cc12m_pc --workers 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.data.annotate_shards import annotate_shards  # noqa: E402
from powerclip.negatives.shards import list_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of .tar shards or a brace pattern")
    p.add_argument("--out", required=True, help="output folder (not the input folder)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one shard each)")
    p.add_argument("--parser", choices=["spacy", "rule"], default="spacy")
    p.add_argument("--spacy-model", default="en_core_web_sm")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        m = annotate_shards(list_shards(a.input), a.out, a.workers, a.parser, a.spacy_model,
                            progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{m['num_annotated']} of {m['num_samples']} samples annotated in {m['num_shards']} shards "
          f"({m['resumed_shards']} already done); left unannotated {m['num_skipped']}: {m['skipped_by_reason']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
