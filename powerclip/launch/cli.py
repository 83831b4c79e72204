"""``powerclip submit -c CONFIG [key=value ...] [--nodes N --gpus-per-node G --partition P --time T]``.

Submits the training run to Slurm through submitit and prints the job id. Flags override the
config's ``slurm`` section (so the saved ``RUN/config.yaml`` says what was really asked for); dotted
overrides patch anything, exactly as for ``powerclip train``::

    powerclip submit -c configs/clip_vitb16_cc12m.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 train.run_dir=/scratch/$USER/runs/clip_b16

Submitting again with the same ``train.run_dir`` continues the run from its latest checkpoint.
``--wait`` blocks until the job ends and prints rank 0's result (tests, short jobs).
"""

from __future__ import annotations

import argparse
import json
import sys

ACCEPTS_EXTRA = True


def parse_time(text: str) -> int:
    """Slurm time → whole minutes: ``90``, ``1:30:00``, ``1-12:00:00``, ``30:00`` (MM:SS)."""
    try:
        days = 0
        if "-" in text:
            d, text = text.split("-", 1)
            days = int(d)
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            minutes, seconds, hours = parts[0], 0, 0
        elif len(parts) == 2:
            hours, minutes, seconds = (parts[0], parts[1], 0) if days else (0, parts[0], parts[1])
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--time {text!r}: expected minutes, H:MM:SS or D-HH:MM:SS") from None
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total < 1:
        raise argparse.ArgumentTypeError(f"--time {text!r} is shorter than a minute")
    return total


# flag -> slurm config field
_FLAGS: dict[str, str] = {
    "nodes": "nodes", "gpus_per_node": "gpus_per_node", "tasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task", "partition": "partition", "time": "time_minutes",
    "mem_gb": "mem_gb", "account": "account", "qos": "qos", "constraint": "constraint",
    "exclude": "exclude", "max_requeues": "max_requeues", "signal_delay": "signal_delay_s",
    "job_name": "job_name",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=1000")
    g = parser.add_argument_group("Slurm resources (default: the config's slurm section)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int, help="one task per GPU; 0 runs CPU tasks on gloo")
    g.add_argument("--tasks-per-node", type=int, help="CPU tasks per node when --gpus-per-node 0")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--partition")
    g.add_argument("--time", type=parse_time, help="time limit: minutes, H:MM:SS or D-HH:MM:SS")
    g.add_argument("--mem-gb", type=float, help="memory per node")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--exclude")
    g.add_argument("--job-name")
    g.add_argument("--max-requeues", type=int, help="resubmissions after timeout/preemption signals")
    g.add_argument("--signal-delay", type=int, help="seconds before the time limit to send USR2")
    g.add_argument("--setup", action="append", default=None,
                   help="shell line run before srun, e.g. 'module load cuda/12.1' (repeatable)")
    parser.add_argument("--cluster", default="slurm", choices=["slurm", "local", "debug"],
                        help="submitit backend (local/debug: run on this machine without Slurm)")
    parser.add_argument("--entry", default=None,
                        help="advanced: 'module:function' called with the Config on every task "
                             "(default: powerclip.train.loop:train)")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's result")
    parser.add_argument("--no-check", action="store_true",
                        help="queue without running `powerclip check` first (e.g. data visible only on the nodes); "
                             "with another --entry only the Slurm part of the check runs")


def slurm_overrides(args: argparse.Namespace) -> list[str]:
    """Flags as dotted ``slurm.*`` overrides, applied after the user's (flags win)."""
    out = []
    for flag, key in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"slurm.{key}={json.dumps(value)}")
    if args.setup is not None:
        out.append(f"slurm.setup={json.dumps(args.setup)}")
    return out


def main(args: argparse.Namespace) -> int:
    from powerclip.config import ConfigError, load_config
    from powerclip.launch.check import check_slurm
    from powerclip.launch.job import DEFAULT_ENTRY
    from powerclip.launch.submit import submit, wait_for_result
    from powerclip.train.preflight import preflight

    try:
        cfg = load_config(args.config, [*args.overrides, *getattr(args, "extra", []), *slurm_overrides(args)])
        if not args.no_check:  # nothing is queued (or written) for a run that would fail at start
            if args.entry in (None, DEFAULT_ENTRY):  # the trainer's data, eval sets and run folder
                preflight(cfg)
            if args.cluster == "slurm":
                check_slurm(cfg)
        job = submit(cfg, entry=args.entry or DEFAULT_ENTRY, cluster=args.cluster)
    except (ConfigError, ValueError) as e:  # CheckError and SlurmCheckError are ValueErrors
        print(f"powerclip submit: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job.job_id}: run folder {job.paths.folder.parent}, logs {job.paths.folder}",
          flush=True)
    if not args.wait:
        return 0
    results = wait_for_result(job)
    print(f"job {job.job_id} finished; rank 0 result: {_summary(results[0])}", flush=True)
    return 0


def _summary(result: object) -> str:
    if isinstance(result, dict):
        return json.dumps({k: v for k, v in result.items() if k != "losses"}, default=str)
    return repr(result)
