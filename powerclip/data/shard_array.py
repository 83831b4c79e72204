"""Run a shard tool as a Slurm job array through submitit: each array task takes a disjoint,
contiguous range of the shard list, and one dependent job writes the summary of all of them.

Why this shape: at dataset scale (thousands of shards, tens of millions of captions) one machine
takes days; the tools already work shard by shard with a finished record per shard, so tasks
need no coordination beyond disjoint ranges. A task that hits its time limit or is preempted is
requeued by submitit (``Checkpointable``) with the same range and, since finished shards are
skipped, continues where it stopped. The summary job runs after every task has ended (``afterany``,
so a failed task still gets its finished shards summarised) and lists shards no task finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit

TOOLS = ("annotate",)


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


def _run_range(tool: str, shards: list[str], out: str, options: dict[str, Any]) -> dict:
    if tool == "annotate":
        from .annotate_shards import annotate_shards

        return annotate_shards([Path(s) for s in shards], out, options.get("workers", 1),
                               options.get("parser", "spacy"), options.get("model", "en_core_web_sm"),
                               progress=False, write_manifest=False)
    raise ValueError(f"unknown shard tool {tool!r}; one of {TOOLS}")


class ShardRangeTask(submitit.helpers.Checkpointable):
    """One array task. ``Checkpointable``: on timeout or preemption submitit requeues this same
    call; the tool skips the shards already finished, so the requeued task resumes."""

    def __call__(self, tool: str, shards: list[str], out: str, options: dict[str, Any]) -> dict:
        m = _run_range(tool, shards, out, options)
        return {"shards": len(shards), "resumed_shards": m.get("resumed_shards", 0)}


def summarize_task(tool: str, out: str, expected: list[str]) -> dict:
    """The summary job: the manifest of every finished shard, plus the shards still missing."""
    if tool != "annotate":
        raise ValueError(f"unknown shard tool {tool!r}; one of {TOOLS}")
    from .annotate_shards import summarize, write_summary

    manifest = summarize(Path(out))
    done = set(manifest["sizes"])
    manifest["missing_shards"] = [s for s in expected if s not in done]
    write_summary(Path(out), manifest)
    return manifest


def submit_array(tool: str, shards: list[str], out: str | Path, options: dict[str, Any], tasks: int, *,
                 partition: str | None = None, time_min: int = 240, cpus_per_task: int = 1,
                 mem_gb: float | None = None, setup: list[str] | None = None, max_requeues: int = 3):
    """Submit the array and its summary job; returns (array jobs, summary job). Logs and submitit's
    files go to ``out/_slurm``."""
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
    jobs = ex.map_array(ShardRangeTask(), [tool] * n, [shards[lo:hi] for lo, hi in ranges], [str(out)] * n,
                        [options] * n)
    array_id = str(jobs[0].job_id).split("_")[0]
    ex.update_parameters(**{**params, "cpus_per_task": 1, "name": f"powerclip-{tool}-summary",
                            "slurm_additional_parameters": {"dependency": f"afterany:{array_id}"}})
    summary = ex.submit(summarize_task, tool, str(out), [Path(s).name for s in shards])
    return jobs, summary


def wait_array(jobs: list, summary, timeout_s: float | None = None) -> dict:
    """Wait for every task and the summary job; returns the summary manifest with
    ``resumed_shards`` (shards the tasks found already finished). A failed task re-raises its
    error after the summary is written."""
    from ..launch.submit import wait_for_result

    manifest = wait_for_result(summary, poll_s=1.0, timeout_s=timeout_s)[0]
    results = [wait_for_result(j, poll_s=1.0, timeout_s=60)[0] for j in jobs]
    manifest["resumed_shards"] = sum(r["resumed_shards"] for r in results)
    manifest["array_tasks"] = len(jobs)
    return manifest
