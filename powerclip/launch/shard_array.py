"""Run a shard tool as a Slurm job array through submitit: each array task takes a disjoint,
contiguous range of the shard list, and one dependent job writes the summary of all of them.

Why this shape: at dataset scale (thousands of shards, tens of millions of captions) one machine
takes days; the tools already work shard by shard with a finished record per shard, so tasks
need no coordination beyond disjoint ranges. A task that hits its time limit or is preempted is
requeued by submitit (``Checkpointable``) with the same range and, since finished shards are
skipped, continues where it stopped. The summary job runs after every task has ended (``afterany``,
so a failed task still gets its finished shards summarised) and lists shards no task finished.

A tool whose shards depend on the whole corpus runs in phases: ``make_negatives`` with the rules
backend first counts a partial vocabulary per shard (one array), then writes the shards with the
merged vocabulary (a second array over the same ranges, started after the first has ended). The
second phase refuses to start while any shard is uncounted, so the summary then names the shards
missing instead of the run writing negatives from part of the corpus.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

TOOLS = ("annotate", "build", "negatives")


def split_ranges(n: int, tasks: int) -> list[tuple[int, int]]:
    """``tasks`` disjoint contiguous [lo, hi) ranges covering 0..n, sizes differing by at most one
    (empty tasks are not made: at most n ranges)."""
    if n < 1 or tasks < 1:
        raise ValueError(f"need at least one shard and one task, got {n} shards, {tasks} tasks")
    tasks = min(tasks, n)
    base, extra = divmod(n, tasks)
    out, lo = [], 0
    for t in range(tasks):
        hi = lo + base + (1 if t < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _run_range(tool: str, shards: list, out: str, options: dict[str, Any]) -> dict:
    """``shards``: input shard paths (annotate) or the [lo, hi) output shard numbers of the plan (build)."""
    if tool == "annotate":
        from powerclip.data.annotate_shards import annotate_shards

        return annotate_shards([Path(s) for s in shards], out, options.get("workers", 1),
                               options.get("parser", "spacy"), options.get("model", "en_core_web_sm"),
                               progress=False, write_manifest=False)
    if tool == "build":
        from powerclip.data.build import build_shards

        opts = dict(options)
        return build_shards(opts.pop("inputs"), out, progress=False, only=(shards[0], shards[-1] + 1),
                            write_manifest=False, **opts)
    if tool == "negatives":
        return _negatives_range([Path(s) for s in shards], Path(out), options)
    raise ValueError(f"unknown shard tool {tool!r}; one of {TOOLS}")


def _negatives_range(shards: list[Path], out: Path, options: dict[str, Any]) -> dict:
    """One phase of make_negatives over this task's shards. The LLM answers cache goes to a file
    of this task's own (named by its first shard, so a requeued task finds it again) unless one
    was named: sqlite shared by many nodes needs file locks that network filesystems often lack."""
    from dataclasses import replace

    from powerclip.negatives.shards import check_settings, run_phase

    job = options["job"]
    check_settings(out, job, shards)
    if job.backend == "llm" and "cache" not in job.llm:
        job = replace(job, llm={**job.llm, "cache": str(out / "_negatives" / "llm_cache" / f"{shards[0].name}.sqlite")})
    resumed = run_phase(options["phase"], shards, out, job, options.get("workers", 1), progress=False)
    return {"resumed_shards": resumed if options["phase"] == "write" else 0}


class ShardRangeTask(submitit.helpers.Checkpointable):
    """One array task. ``Checkpointable``: on timeout or preemption submitit requeues this same
    call; the tool skips the shards already finished, so the requeued task resumes."""

    def __call__(self, tool: str, shards: list, out: str, options: dict[str, Any]) -> dict:
        m = _run_range(tool, shards, out, options)
        return {"shards": len(shards), "resumed_shards": m.get("resumed_shards", 0)}


def summarize_task(tool: str, out: str, expected: list[str]) -> dict:
    """The summary job: the manifest of every finished shard, plus the shards still missing."""
    if tool == "build":
        from powerclip.data.build import build_manifest, write_build_manifest

        manifest = build_manifest(out)  # knows the missing shards from the plan
        write_build_manifest(out, manifest)
        return manifest
    if tool == "negatives":
        from powerclip.negatives.shards import summarize, write_report

        report = summarize(Path(out))
        write_report(Path(out), report)
        return report
    if tool != "annotate":
        raise ValueError(f"unknown shard tool {tool!r}; one of {TOOLS}")
    from powerclip.data.annotate_shards import summarize, write_summary

    manifest = summarize(Path(out))
    done = set(manifest["sizes"])
    manifest["missing_shards"] = [s for s in expected if s not in done]
    write_summary(Path(out), manifest)
    return manifest


def submit_array(tool: str, shards: list, out: str | Path, options: dict[str, Any], tasks: int, *,
                 partition: str | None = None, time_min: int = 240, cpus_per_task: int = 1,
                 mem_gb: float | None = None, setup: list[str] | None = None, max_requeues: int = 3,
                 phases: list[dict[str, Any]] | None = None):
    """Submit the array and its summary job; returns (array jobs of the last phase, summary job).
    ``shards``: the input shard paths (annotate, negatives) or the output shard numbers 0..n-1 of
    the plan (build); each task gets a contiguous slice. ``phases``: one array per entry, each
    with ``options`` updated by it and started after the previous one has ended (default: one).
    Logs and submitit's files go to ``out/_slurm``."""
    out = Path(out).resolve()
    folder = out / "_slurm"
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=max_requeues)
    params: dict[str, Any] = {"name": f"powerclip-{tool}", "nodes": 1, "tasks_per_node": 1,
                              "cpus_per_task": cpus_per_task, "timeout_min": time_min,
                              "slurm_additional_parameters": {"requeue": True}}
    if partition:
        params["slurm_partition"] = partition
    if mem_gb is not None:
        params["mem_gb"] = mem_gb
    if setup:
        params["slurm_setup"] = list(setup)
    ranges = split_ranges(len(shards), tasks)
    ex.update_parameters(**params, slurm_array_parallelism=len(ranges))
    n = len(ranges)
    array_id = None
    for phase in phases or [{}]:
        if array_id is not None:
            ex.update_parameters(slurm_additional_parameters={"requeue": True, "dependency": f"afterany:{array_id}"})
        jobs = ex.map_array(ShardRangeTask(), [tool] * n, [shards[lo:hi] for lo, hi in ranges], [str(out)] * n,
                            [{**options, **phase}] * n)
        array_id = str(jobs[0].job_id).split("_")[0]
    ex.update_parameters(**{**params, "cpus_per_task": 1, "name": f"powerclip-{tool}-summary",
                            "slurm_additional_parameters": {"dependency": f"afterany:{array_id}"}})
    summary = ex.submit(summarize_task, tool, str(out), [Path(str(s)).name for s in shards])
    return jobs, summary


def wait_array(jobs: list, summary, total: int, finished: Callable[[], int], progress: bool = True,
               timeout_s: float | None = None) -> dict:
    """Wait for every task and the summary job, with a progress bar over ``total`` shards
    (``finished()`` counts the shards done so far, from their records); returns the summary
    manifest with ``resumed_shards`` (shards the tasks found already finished) and
    ``array_tasks``. A failed task re-raises its error, after the summary is written."""
    from powerclip.launch.submit import TERMINAL_STATES, scontrol_state, wait_for_result
    from powerclip.progress import progress_bar

    bar = progress_bar(total, "shards (array)", unit="shard", enabled=progress)
    while not summary.paths.result_pickle.exists():
        bar.update(min(total, finished()) - bar.n)  # update, not refresh: a log gets a line per interval
        if scontrol_state(str(summary.job_id)) in TERMINAL_STATES:  # ended: wait_for_result says how
            break
        time.sleep(1)
    bar.update(min(total, finished()) - bar.n)
    bar.close()
    manifest = wait_for_result(summary, poll_s=1.0, timeout_s=timeout_s)[0]
    results = [wait_for_result(j, poll_s=1.0, timeout_s=60)[0] for j in jobs]
    manifest["resumed_shards"] = sum(r["resumed_shards"] for r in results)
    manifest["array_tasks"] = len(jobs)
    return manifest


def add_slurm_args(p: argparse.ArgumentParser) -> None:
    """The job-array options every shard tool offers."""
    g = p.add_argument_group("Slurm job array (submitit)")
    g.add_argument("--slurm-tasks", type=int, default=0, help="array tasks (0: run here)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-time", type=int, default=240, help="minutes per task (then requeued)")
    g.add_argument("--slurm-mem-gb", type=float, default=None)
    g.add_argument("--slurm-setup", action="append", default=[], help="shell line run before each task")
    g.add_argument("--no-wait", action="store_true", help="submit and return (the summary job still runs)")


def run_array_cli(a: argparse.Namespace, tool: str, shards: list, out: Path, options: dict[str, Any],
                  finished: Callable[[], int], phases: list[dict[str, Any]] | None = None,
                  total: int | None = None) -> dict | None:
    """Submit from parsed ``add_slurm_args`` options; wait (unless --no-wait) and return the summary.
    ``finished()`` counts the work units done over ``total`` (default: one per shard)."""
    jobs, summary = submit_array(tool, shards, out, options, a.slurm_tasks, partition=a.slurm_partition,
                                 time_min=a.slurm_time, cpus_per_task=max(1, options.get("workers", 1)),
                                 mem_gb=a.slurm_mem_gb, setup=a.slurm_setup, phases=phases)
    array_id = str(jobs[0].job_id).split("_")[0]
    print(f"submitted array job {array_id} ({len(jobs)} tasks) and summary job {summary.job_id}; "
          f"logs in {out / '_slurm'}", flush=True)
    if a.no_wait:
        return None
    return wait_array(jobs, summary, total or len(shards), finished, progress=not a.no_progress)
