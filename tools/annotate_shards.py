#!/usr/bin/env python
"""Add powerclip's annotation (parse-tree phrase spans, concepts) to existing webdataset shards,
copying every other member byte for byte (powerclip.data.annotate_shards).

For shard sets someone else built - PowerCLIP's CC12M shards with their SAM patch regions
(samlens.npy/samcat.npy), img2dataset output - without re-sharding them. Output: the same shard
names in --out, sizes.json, manifest.json (samples left unannotated, and why; they are copied as
they are), _annotate/ (resume records: rerunning the same command redoes only unfinished shards).

Example: python tools/annotate_shards.py --input 'cc12m/{00000..02175}.tar' --out cc12m_pc --workers 16
On Slurm, as a job array (each task a disjoint range of shards, requeued tasks resume, one summary):
  python tools/annotate_shards.py --input 'cc12m/{00000..02175}.tar' --out cc12m_pc \
      --slurm-tasks 64 --workers 8 --slurm-partition cpu --slurm-time 240
"""

from __future__ import annotations

import argparse
import sys
import time
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
    g = p.add_argument_group("Slurm job array (submitit)")
    g.add_argument("--slurm-tasks", type=int, default=0, help="array tasks (0: run here)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-time", type=int, default=240, help="minutes per task (then requeued)")
    g.add_argument("--slurm-mem-gb", type=float, default=None)
    g.add_argument("--slurm-setup", action="append", default=[], help="shell line run before each task")
    g.add_argument("--no-wait", action="store_true", help="submit and return (the summary job still runs)")
    a = p.parse_args(argv)
    try:
        shards = list_shards(a.input)
        if a.slurm_tasks > 0:
            return _submit(a, shards)
        m = annotate_shards(shards, a.out, a.workers, a.parser, a.spacy_model, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{m['num_annotated']} of {m['num_samples']} samples annotated in {m['num_shards']} shards "
          f"({m['resumed_shards']} already done); left unannotated {m['num_skipped']}: {m['skipped_by_reason']}")
    return 0


def _submit(a: argparse.Namespace, shards: list[Path]) -> int:
    from tqdm import tqdm

    from powerclip.data.annotate_shards import prepare_output
    from powerclip.data.shard_array import submit_array, wait_array
    from powerclip.launch.submit import TERMINAL_STATES, scontrol_state

    out = prepare_output(shards, a.out, a.parser, a.spacy_model)
    jobs, summary = submit_array("annotate", [str(s) for s in shards], out,
                                 {"workers": a.workers, "parser": a.parser, "model": a.spacy_model},
                                 a.slurm_tasks, partition=a.slurm_partition, time_min=a.slurm_time,
                                 cpus_per_task=max(1, a.workers), mem_gb=a.slurm_mem_gb, setup=a.slurm_setup)
    array_id = str(jobs[0].job_id).split("_")[0]
    print(f"submitted array job {array_id} ({len(jobs)} tasks) and summary job {summary.job_id}; "
          f"logs in {out / '_slurm'}", flush=True)
    if a.no_wait:
        return 0
    bar = tqdm(total=len(shards), desc="annotate (array)", unit="shard", disable=a.no_progress)
    records = out / "_annotate"
    while not summary.paths.result_pickle.exists():  # progress from the finished-shard records
        bar.n = min(len(shards), len(list(records.glob("*.tar.json"))))
        bar.refresh()
        if scontrol_state(str(summary.job_id)) in TERMINAL_STATES:  # ended without a result
            break
        time.sleep(2)
    bar.close()
    m = wait_array(jobs, summary)
    print(f"{m['num_annotated']} of {m['num_samples']} samples annotated in {m['num_shards']} shards by "
          f"{m['array_tasks']} tasks ({m['resumed_shards']} already done); left unannotated "
          f"{m['num_skipped']}: {m['skipped_by_reason']}; missing shards: {len(m['missing_shards'])}")
    return 0 if not m["missing_shards"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
