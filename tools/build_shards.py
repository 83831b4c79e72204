#!/usr/bin/env python
"""Build annotated webdataset shards from images + captions (powerclip.data.build).

Inputs (any number, mixed): a folder of images with sidecar .txt captions, a .csv/.tsv/.parquet
table of local image paths and captions, or an img2dataset webdataset output folder (re-annotated
and re-sharded). Output folder: NNNNN.tar, sizes.json, manifest.json (every skipped input and
why), _build/ (resume records: rerunning the same command redoes only unfinished shards).

Example: python tools/build_shards.py data/raw_folder captions.parquet --out data/shards --workers 8
On Slurm, as a job array (each task a disjoint range of output shards, requeued tasks resume, one summary):
  python tools/build_shards.py captions.parquet --out data/shards --workers 8 --slurm-tasks 32 --slurm-time 240
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.data.build import DEFAULT_MAX_PIXELS, build_shards, plan_build  # noqa: E402
from powerclip.errors import describe  # noqa: E402
from powerclip.launch.shard_array import add_slurm_args, run_array_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="folders, tables (.csv/.tsv/.parquet) or img2dataset folders")
    p.add_argument("--out", required=True, help="output folder (nothing is written outside it)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (before skips)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    p.add_argument("--parser", choices=["spacy", "rule"], default="spacy")
    p.add_argument("--spacy-model", default="en_core_web_sm")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    p.add_argument("--image-col", default=None, help="table column of image paths (auto-detected)")
    p.add_argument("--caption-col", default=None, help="table column of captions (auto-detected)")
    p.add_argument("--boxes-col", default=None, help="table column: JSON [[x0,y0,x1,y1] in 0..1, ...]")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--follow-links", action="store_true",
                   help="follow symlinks that lead out of an input folder (refused and listed in the "
                        "manifest by default)")
    add_slurm_args(p)
    a = p.parse_args(argv)
    try:
        if a.slurm_tasks > 0:
            return _submit(a)
        m = build_shards(a.inputs, a.out, a.shard_size, a.workers, a.parser, a.spacy_model, a.max_pixels,
                         a.image_col, a.caption_col, a.boxes_col, progress=not a.no_progress,
                         follow_links=a.follow_links)
    except (ValueError, OSError) as e:  # a bad option, input or output folder, or disk: one line (OSError: path + fix)
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    print(f"{m['num_samples']} samples in {m['num_shards']} shards ({m['resumed_shards']} already done); "
          f"skipped {m['num_skipped']}: {m['skipped_by_reason']}"
          + (f"; refused {len(m['refused_links'])} links leaving the input folder (see manifest.json)"
             if m["refused_links"] else ""))
    return 0


def _submit(a: argparse.Namespace) -> int:
    # the plan is made here, once; every task re-derives the same plan and checks its hash (absolute
    # paths: tasks may start in another directory)
    a.inputs = [str(Path(i).resolve()) for i in a.inputs]
    out, chunks = plan_build(a.inputs, a.out, a.shard_size, a.parser, a.spacy_model, a.image_col,
                             a.caption_col, a.boxes_col, a.follow_links)
    options = {"follow_links": a.follow_links, "inputs": a.inputs, "shard_size": a.shard_size, "workers": a.workers, "parser": a.parser,
               "model": a.spacy_model, "max_pixels": a.max_pixels, "image_col": a.image_col,
               "caption_col": a.caption_col, "boxes_col": a.boxes_col}
    m = run_array_cli(a, "build", list(range(len(chunks))), out, options,
                      lambda: sum(1 for s in range(len(chunks)) if (out / "_build" / f"{s:05d}.json").is_file()))
    if m is None:
        return 0
    print(f"{m['num_samples']} samples in {m['num_shards']} shards by {m['array_tasks']} tasks "
          f"({m['resumed_shards']} already done); skipped {m['num_skipped']}: {m['skipped_by_reason']}; "
          f"missing shards: {len(m['missing_shards'])}")
    return 0 if not m["missing_shards"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
