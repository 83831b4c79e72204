"""Submit a training run to Slurm through submitit's AutoExecutor.

Tasks: one per GPU (``slurm.gpus_per_node`` tasks on each node, each task picks
``cuda:(LOCAL_RANK mod visible GPUs)``); with ``gpus_per_node == 0`` it is ``slurm.tasks_per_node``
CPU tasks per node on gloo, which is how CI runs it on a two-node cluster. The sbatch options come from the
``slurm`` config section; ``--requeue`` is always requested (sites may default it off) and USR2 is
sent ``slurm.signal_delay_s`` before the time limit so submitit can call ``TrainJob.checkpoint``.

Everything lands in the run folder: ``RUN/config.yaml`` (the resolved config, written before
submission so it exists even if the job never starts), ``RUN/slurm/`` (submitit's sbatch script,
pickles and per-task logs ``JOBID_TASK_log.{out,err}``, requeues.json, starts.jsonl).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from powerclip.config import Config, ConfigError, save_config
from powerclip.launch.job import DEFAULT_ENTRY, TrainJob, slurm_dir


def check_slurm_config(cfg: Config) -> None:
    """Range checks for the slurm section (the generic validate() does not know them)."""
    s = cfg.slurm
    for key in ("nodes", "tasks_per_node", "time_minutes"):
        if getattr(s, key) < 1:
            raise ConfigError(f"slurm.{key} must be >= 1, got {getattr(s, key)}")
    for key in ("gpus_per_node", "cpus_per_task", "max_requeues", "signal_delay_s", "master_port"):
        if getattr(s, key) < 0:
            raise ConfigError(f"slurm.{key} must be >= 0, got {getattr(s, key)}")
    if s.signal_delay_s >= 60 * s.time_minutes:
        raise ConfigError(f"slurm.signal_delay_s={s.signal_delay_s} must be below the time limit "
                          f"({60 * s.time_minutes} s)")


def tasks_per_node(cfg: Config) -> int:
    return cfg.slurm.gpus_per_node if cfg.slurm.gpus_per_node > 0 else cfg.slurm.tasks_per_node


def cpus_per_task(cfg: Config) -> int:
    """``slurm.cpus_per_task``, or when 0: one core per loader worker plus the trainer on GPU tasks.

    Why derived: a GPU task decodes images in ``data.workers`` processes; with Slurm's default of one
    core per task they all share it and the GPU waits on the loader. CPU tasks (gloo, CI) keep one
    core, since there the trainer itself is the bottleneck and cores are what the tasks compete for.
    """
    if cfg.slurm.cpus_per_task > 0:
        return cfg.slurm.cpus_per_task
    return cfg.data.workers + 1 if cfg.slurm.gpus_per_node > 0 else 1


def executor_parameters(cfg: Config) -> dict[str, Any]:
    """AutoExecutor ``slurm_*`` parameters for this config (pure; tested without a cluster)."""
    s = cfg.slurm
    params: dict[str, Any] = {
        "name": s.job_name,
        "nodes": s.nodes,
        "tasks_per_node": tasks_per_node(cfg),
        "cpus_per_task": cpus_per_task(cfg),
        "timeout_min": s.time_minutes,
        "slurm_signal_delay_s": s.signal_delay_s,
        "slurm_additional_parameters": {"requeue": True, **s.extra},
    }
    if s.gpus_per_node > 0:
        params["gpus_per_node"] = s.gpus_per_node
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.mem_gb is not None:
        params["mem_gb"] = s.mem_gb
    for key in ("account", "qos", "constraint", "exclude"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    if s.setup:
        params["slurm_setup"] = list(s.setup)
    return params


def make_executor(cfg: Config, cluster: str | None = "slurm"):
    """submitit AutoExecutor writing into ``RUN/slurm``; ``cluster=None`` lets submitit choose."""
    import submitit

    folder = slurm_dir(cfg.train.run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # slurm_max_num_timeout: submitit's own cap on timeout requeues; ours (RequeueLedger, in the run
    # folder) also covers preemption and survives resubmission. Both use slurm.max_requeues.
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**executor_parameters(cfg))
    return executor


def submit(cfg: Config, entry: str = DEFAULT_ENTRY, cluster: str | None = "slurm"):
    """Save the resolved config in the run folder and submit; returns the submitit Job."""
    check_slurm_config(cfg)
    # absolute: the job (and any later resubmission from another directory) finds the same folder
    run_dir = Path(cfg.train.run_dir).absolute()
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run_dir)))
    save_config(cfg, run_dir)
    executor = make_executor(cfg, cluster)
    return executor.submit(TrainJob(cfg, entry))


TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE")


def scontrol_state(job_id: str) -> str | None:
    """The job's state from ``scontrol show job`` (works without accounting); None if unknown."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for tok in out.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


def wait_for_result(job, poll_s: float = 2.0, timeout_s: float | None = None, grace_s: float = 20.0) -> list[Any]:
    """Every task's result, or the first task error (re-raised as submitit raises it).

    Done means every task's result file exists. submitit's own ``job.done()`` falls back on
    ``sacct``, which clusters without accounting do not answer, so a job that died without writing
    results would be waited on forever; here ``scontrol`` is asked instead: a terminal state with
    results still missing after ``grace_s`` (shared file systems are slow to show files) raises
    with the state and the log location.
    """
    import submitit

    deadline = None if timeout_s is None else time.monotonic() + timeout_s  # a wall-clock step must not cut or stretch it
    terminal_since: float | None = None
    on_slurm = isinstance(job, submitit.SlurmJob)  # local jobs' ids are process ids, not Slurm's
    pickles = [job.task(i).paths.result_pickle for i in range(job.num_tasks)]
    while not all(p.exists() for p in pickles):
        now = time.monotonic()
        state = scontrol_state(job.job_id) if on_slurm else None
        if deadline is not None and now > deadline:
            raise TimeoutError(f"job {job.job_id} not done after {timeout_s:.0f} s (Slurm state {state})")
        if state in TERMINAL_STATES:
            terminal_since = terminal_since or now
            if now - terminal_since > grace_s:
                missing = [i for i, p in enumerate(pickles) if not p.exists()]
                raise RuntimeError(f"job {job.job_id} ended {state} without results from tasks {missing}; "
                                   f"see the logs in {job.paths.folder}")
        else:
            terminal_since = None
        time.sleep(poll_s)
    return job.results()
