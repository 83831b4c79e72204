#!/usr/bin/env python
"""Add powerclip's annotation (parse-tree phrase spans, concepts) to existing webdataset shards,
copying every other member byte for byte (powerclip.data.annotate_shards).

For shard sets someone else built - PowerCLIP's CC12M shards with their SAM patch regions
(samlens.npy/samcat.npy), img2dataset output - without re-sharding them. Output: the same shard
names in --out, sizes.json, manifest.json (samples left unannotated, and why; they are copied as
they are), _annotate/ (resume records: rerunning the same command redoes only unfinished shards).

Example: python tools/annotate_shards.py --input 'cc12m/cc12m-train-{0000..2175}.tar' --out cc12m_pc --workers 16
On Slurm, as a job array (each task a disjoint range of shards, requeued tasks resume, one summary):
  python tools/annotate_shards.py --input 'cc12m/cc12m-train-{0000..2175}.tar' --out cc12m_pc \
      --slurm-tasks 64 --workers 8 --slurm-partition cpu --slurm-time 240
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.data.annotate_shards import annotate_shards  # noqa: E402
from powerclip.errors import describe  # noqa: E402
from powerclip.launch.shard_array import add_slurm_args, run_array_cli  # noqa: E402
from powerclip.negatives.shards import list_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder of .tar shards or a brace pattern")
    p.add_argument("--out", required=True, help="output folder (not the input folder)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (one shard each)")
    p.add_argument("--parser", choices=["spacy", "rule"], default="spacy")
    p.add_argument("--spacy-model", default="en_core_web_sm")
    p.add_argument("--no-progress", action="store_true")
    add_slurm_args(p)
    a = p.parse_args(argv)
    try:
        shards = list_shards(a.input)
        if a.slurm_tasks > 0:
            return _submit(a, shards)
        m = annotate_shards(shards, a.out, a.workers, a.parser, a.spacy_model, progress=not a.no_progress)
    except (ValueError, OSError) as e:  # a bad option, input or output folder, or disk: one line (OSError: path + fix)
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    print(f"{m['num_annotated']} of {m['num_samples']} samples annotated in {m['num_shards']} shards "
          f"({m['resumed_shards']} already done); left unannotated {m['num_skipped']}: {m['skipped_by_reason']}")
    return 0


def _submit(a: argparse.Namespace, shards: list[Path]) -> int:
    from powerclip.data.annotate_shards import RECORDS, prepare_output

    out = prepare_output(shards, a.out, a.parser, a.spacy_model)
    m = run_array_cli(a, "annotate", [str(s) for s in shards], out,
                      {"workers": a.workers, "parser": a.parser, "model": a.spacy_model},
                      lambda: len(list((out / RECORDS).glob("*.tar.json"))))
    if m is None:
        return 0
    print(f"{m['num_annotated']} of {m['num_samples']} samples annotated in {m['num_shards']} shards by "
          f"{m['array_tasks']} tasks ({m['resumed_shards']} already done); left unannotated "
          f"{m['num_skipped']}: {m['skipped_by_reason']}; missing shards: {len(m['missing_shards'])}")
    return 0 if not m["missing_shards"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
