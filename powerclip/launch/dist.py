"""Distributed environment of a submitit task, exported into the variables DeepSpeed and torch read.

WHY explicit: ``deepspeed.init_distributed`` (env:// rendezvous) reads RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. Under submitit every task is an ``srun`` task, and submitit's
``JobEnvironment`` already knows the global rank, local rank, task count and the expanded node list;
writing them out here, before the trainer starts, means the trainer's own launcher detection
(``powerclip.train.dist_env``) sees a fully specified torch-style environment and never guesses.
The port is derived from the job id exactly as ``dist_env`` derives it for plain ``srun``, so a
requeued job (same id) reuses it and two jobs sharing a node do not collide (unless their ids are
congruent mod 20000).
"""

from __future__ import annotations

import os
from typing import Any


def master_port_for(job_id: str | int, fixed: int = 0) -> int:
    """``fixed`` when set, else 20000 + (numeric job id) % 20000 (array ids use the main id)."""
    if fixed:
        return int(fixed)
    digits = str(job_id).split("_")[0]
    return 20000 + (int(digits) % 20000 if digits.isdigit() else 0)


def dist_env_from_job(job_env: Any, master_port: int = 0) -> dict[str, str]:
    """The torch/DeepSpeed variables for one task of a submitit job (``submitit.JobEnvironment()``)."""
    hostnames = list(job_env.hostnames)
    if not hostnames:
        raise RuntimeError(f"submitit reports no hostnames for job {job_env.job_id}; "
                           "is SLURM_JOB_NODELIST set in the task environment?")
    num_nodes = max(1, int(job_env.num_nodes))
    return {
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // num_nodes),
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": str(master_port_for(job_env.job_id, master_port)),
    }


def export_dist_env(master_port: int = 0) -> dict[str, str]:
    """Inside a submitit task: compute and export the variables; returns what was set."""
    import submitit

    values = dist_env_from_job(submitit.JobEnvironment(), master_port)
    os.environ.update(values)
    return values
