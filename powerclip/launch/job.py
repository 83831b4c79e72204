"""The callable that submitit runs on every Slurm task, and its requeue bookkeeping.

Life of a submission (every task runs ``TrainJob.__call__``):

1. export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from submitit's job environment;
2. rank 0 appends a line to ``RUN/slurm/starts.jsonl`` (job id, Slurm restart count, resume target);
3. call the entry point (``powerclip.train.loop:train``) with the config. A restart of the job
   (``SLURM_RESTART_COUNT`` > 0) resumes from the run's ``latest`` checkpoint, whatever
   ``checkpoint.resume`` said at submission (a restart must continue this run, not re-load the
   fine-tuning source or start over).

Requeue: Slurm sends USR2 ``slurm.signal_delay_s`` before the time limit (and at preemption where the
cluster sets ``PreemptParameters=send_user_signal``); submitit's handler calls ``checkpoint()`` on
rank 0 only, INSIDE a signal handler, while the other ranks may be in the middle of a collective.
So ``checkpoint()`` saves nothing: it only counts the requeue in ``RUN/slurm/requeues.json`` and
returns a DelayedSubmission of the same job; the restart resumes from the last periodic checkpoint
(``checkpoint.every_steps`` / ``every_minutes`` bound the lost work). Past ``slurm.max_requeues``
it returns None and the job ends. A requeue that Slurm does by itself (``scontrol requeue``,
preemption with PreemptMode=REQUEUE, node failure) re-runs the same pickled job and resumes the same
way; it is recorded in starts.jsonl (``SLURM_RESTART_COUNT``) but not counted against the cap, since
no code of ours decides it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from powerclip.atomic import write_json_atomic
from powerclip.config import Config
from powerclip.errors import UserError
from powerclip.launch.dist import export_dist_env

log = logging.getLogger(__name__)

DEFAULT_ENTRY = "powerclip.train.loop:train"
# A rank whose collective fails or times out aborts the process group, so srun ends the job instead of
# the other ranks hanging until the time limit; NCCL reports warnings and errors only (set
# NCCL_DEBUG=INFO in the job's environment to debug a hang or the network it picked).
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN"}


def slurm_dir(run_dir: str | Path) -> Path:
    """Where submitit's logs/pickles and our requeue bookkeeping live: ``RUN/slurm``."""
    return Path(run_dir) / "slurm"


def resolve_entry(entry: str) -> Callable[[Config], Any]:
    """``"package.module:function"`` → the function (called with the Config on every task)."""
    module, sep, name = entry.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"entry point {entry!r} is not of the form 'package.module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"entry point {entry!r}: {module} has no callable {name!r}")
    return fn


class LedgerError(UserError, ValueError):
    """``requeues.json`` is damaged or of another shape; the message names it."""


class RequeueLedger:
    """``RUN/slurm/requeues.json``: how many times ``checkpoint()`` resubmitted this run, and when.

    Written only by rank 0's signal handler (one writer), atomically (a reader never sees half).
    It lives in the run folder, so the cap holds across Slurm job ids and across ``powerclip
    submit`` calls for the same run folder.
    """

    def __init__(self, run_dir: str | Path):
        self.path = slurm_dir(run_dir) / "requeues.json"

    def read(self) -> dict[str, Any]:
        """``{"count": int >= 0, "events": [object, ...]}``; ``LedgerError`` naming the file when it
        holds anything else (the cap cannot be trusted then)."""
        if not self.path.exists():
            return {"count": 0, "events": []}
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise LedgerError(f"{self.path}: unreadable ({e}); fix or delete it") from None
        count = data.get("count") if isinstance(data, dict) else None
        events = data.get("events") if isinstance(data, dict) else None
        if (not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(events, list)
                or not all(isinstance(e, dict) for e in events)):
            raise LedgerError(f"{self.path}: malformed (expected {{count: int >= 0, events: [...]}}, found "
                              f"{json.dumps(data)[:80]}); fix or delete it")
        return data

    @property
    def count(self) -> int:
        return int(self.read()["count"])

    def record(self, job_id: str, reason: str) -> int:
        data = self.read()
        data["count"] = int(data["count"]) + 1
        data["events"].append({"time": time.time(), "job_id": job_id, "reason": reason})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, data)
        return data["count"]


def read_starts(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every start of every submission of this run (``RUN/slurm/starts.jsonl``), oldest first."""
    path = slurm_dir(run_dir) / "starts.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:  # a line cut by a kill, or damaged: not a start record
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class TrainJob:
    """Picklable callable: ``submitit`` runs ``TrainJob(cfg)()`` on every task of the job.

    ``entry`` names the function that does the work (default: the trainer); it receives the Config
    and its return value is the task's submitit result.
    """

    def __init__(self, cfg: Config, entry: str = DEFAULT_ENTRY, submission_id: str | None = None):
        self.cfg = cfg
        self.entry = entry
        self.submission_id = submission_id or uuid.uuid4().hex[:12]

    # ------------------------------------------------------------------------------ each start
    def __call__(self) -> Any:
        import submitit

        from powerclip.train.cli import mute_deepspeed, setup_logging

        dist_vars = export_dist_env(self.cfg.slurm.master_port)
        for key, value in NCCL_ENV.items():  # what slurm/*.sbatch exports; a site's own values win
            os.environ.setdefault(key, value)
        setup_logging(int(dist_vars["RANK"]))  # as `powerclip train` does: INFO on rank 0
        mute_deepspeed()  # submit ran the checks before queueing
        _ignore_user_signal_in_children(submitit.JobEnvironment._usr_sig())
        job_env = submitit.JobEnvironment()
        cfg = self._cfg_for_this_start()
        if job_env.global_rank == 0:
            self._record_start(job_env.job_id, cfg, dist_vars)
        result = resolve_entry(self.entry)(cfg)
        _teardown_process_group()
        return result

    def _cfg_for_this_start(self) -> Config:
        """A restart of this job resumes from ``latest``, whatever ``checkpoint.resume`` said.

        Every requeue (ours through ``checkpoint()``, or Slurm's own) keeps the job id and raises
        ``SLURM_RESTART_COUNT``, which every task sees alike, so all ranks decide the same way
        (reading starts.jsonl instead would race with rank 0 appending to it).
        """
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        # (no own checkpoint yet: keep the submitted source, or the restart would start from scratch;
        # nothing writes it while the job starts, so every rank sees the same answer)
        own = (Path(self.cfg.train.run_dir) / "checkpoints" / "latest").is_file()
        if restart and own and self.cfg.checkpoint.resume != "latest":
            return replace(self.cfg, checkpoint=replace(self.cfg.checkpoint, resume="latest"))
        return self.cfg

    def _record_start(self, job_id: str, cfg: Config, dist_vars: dict[str, str]) -> None:
        folder = slurm_dir(cfg.train.run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        latest = Path(cfg.train.run_dir) / "checkpoints" / "latest"
        entry = {"time": time.time(), "submission": self.submission_id, "job_id": job_id,
                 "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                 "host": socket.gethostname(), "world_size": int(dist_vars["WORLD_SIZE"]),
                 "master": f"{dist_vars['MASTER_ADDR']}:{dist_vars['MASTER_PORT']}",
                 "resume": cfg.checkpoint.resume,
                 "latest_at_start": latest_text(latest)}
        with open(folder / "starts.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        log.info("start %s of job %s (%s)", len(read_starts(cfg.train.run_dir)), job_id, entry)

    # ----------------------------------------------------------- USR2: rank 0, signal handler
    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Resubmit only (see module doc): no collective and no save can run in a signal handler."""
        import submitit

        ledger = RequeueLedger(self.cfg.train.run_dir)
        job_id = os.environ.get("SLURM_JOB_ID", "?")
        try:
            done = ledger.count
        except LedgerError as e:  # an untrustworthy cap: no requeue (a signal handler must not raise)
            log.warning("not requeuing job %s: %s", job_id, e)
            return None
        if done >= self.cfg.slurm.max_requeues:
            log.warning("not requeuing job %s: %d requeues already (slurm.max_requeues=%d)", job_id, done,
                        self.cfg.slurm.max_requeues)
            return None
        n = ledger.record(job_id, "usr-signal")
        log.warning("requeuing job %s (%d/%d); the restart resumes from the latest checkpoint", job_id, n,
                    self.cfg.slurm.max_requeues)
        return submitit.helpers.DelayedSubmission(self)


def latest_text(latest: Path) -> str | None:
    """What ``latest`` names, for the start record (a damaged pointer is recorded, not fatal: the
    trainer decides what to resume from)."""
    from powerclip.checkpoints.layout import PointerError, read_latest

    try:
        return read_latest(latest.parent)
    except PointerError as e:
        return f"damaged: {e}"


def _ignore_user_signal_in_children(signum: int) -> None:
    """Forked helpers (DataLoader workers) inherit submitit's USR2 handler and Slurm signals every
    process of the step: without this, a worker of rank 0 would run checkpoint() and requeue too.
    """
    installed = signal.getsignal(signum)
    if not callable(installed):
        return
    main_pid = os.getpid()

    def handler(sig: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            installed(sig, frame)

    signal.signal(signum, handler)


def _teardown_process_group() -> None:
    """Leave no process group behind: submitit pickles the result after we return, and gloo may abort
    in its destructors at interpreter exit; a barrier then an explicit destroy avoids both."""
    from powerclip import distributed as pdist

    pdist.destroy()
