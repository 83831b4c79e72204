"""One training process group per run folder: a second run on the same folder is refused.

Two runs writing one folder overwrite each other's checkpoints and logs. The lock is an exclusive
``flock`` on ``RUN/.powerclip.lock``, taken by rank 0 before anything is written: the kernel drops it
when the holder dies, even by ``kill -9``, so a crashed run never blocks its own restart. The file
also records the holder (host, pid, Slurm job, start time) so the refusal can name it.

A lock can outlive its holder where the lock state lives elsewhere (NFS servers keep a dead client's
locks until lease recovery; a forked helper process can inherit the descriptor). So when the lock
is busy and the recorded holder is provably dead (same host and the pid is gone, or ``squeue``
says its Slurm job has ended), the lock file is replaced by a fresh one (a new inode carries no old
lock) and the takeover is logged.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from powerclip.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".powerclip.lock"


class RunLockError(UserError, RuntimeError):
    """The run folder is held by another live run; the message names it."""


def _holder_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(h: dict[str, Any]) -> str:
    job = f", Slurm job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return f"pid {h.get('pid')} on {h.get('host')}{job}, since {h.get('started')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job_alive(job_id: str) -> bool | None:
    """True/False from ``squeue``; None when it cannot tell (no Slurm client here)."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = out.stdout.split()
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    return any(s in ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                     "RESIZING", "SIGNALING", "STAGE_OUT") for s in states)


def holder_is_dead(h: dict[str, Any]) -> str | None:
    """Why the recorded holder is certainly dead, or None if it may be alive."""
    if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) and not _pid_alive(h["pid"]):
        return f"pid {h['pid']} no longer exists on {h['host']}"
    if h.get("slurm_job_id") and _slurm_job_alive(str(h["slurm_job_id"])) is False:
        return f"Slurm job {h['slurm_job_id']} is no longer running"
    return None


class RunLock:
    """Exclusive lock on a run folder for this process's lifetime (or until ``release``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def _read_holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _open(self) -> int:
        """The lock file, opened for writing; a folder that cannot be written is refused here, in one
        line, before anything else runs (a run there could not save a checkpoint)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR):
                why = "is on a read-only file system" if e.errno == errno.EROFS else f"cannot be written ({e.strerror})"
                raise RunLockError(f"run folder {self.path.parent} {why}: a run must write its checkpoints and "
                                   f"lock file ({self.path}) there; make it writable or use another "
                                   "train.run_dir") from None
            raise

    def _try(self) -> bool:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: the file system does not support locks (%s); two runs on this folder "
                            "will not be detected", self.path, e.strerror)
            else:
                os.close(fd)
                raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(_holder_info()).encode())
            os.fsync(fd)
        except OSError as e:  # a full disk: the lock holds without the record (the run's own space check follows)
            log.warning("%s: could not record the lock holder (%s)", self.path, e.strerror)
        self._fd = fd
        return True

    def acquire(self) -> RunLock:
        if self._try():
            return self
        holder = self._read_holder()
        dead = holder_is_dead(holder)
        if dead is None:
            raise RunLockError(f"run folder {self.path.parent} is in use by another run ({_describe(holder)}; "
                               f"lock file {self.path}); refusing to start a second run on it")
        log.warning("run folder %s: taking over a stale lock (%s: %s)", self.path.parent, _describe(holder), dead)
        stale = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        os.replace(self.path, stale)  # a fresh inode: the dead holder's lock stays on the old one
        stale.unlink(missing_ok=True)
        if not self._try():
            raise RunLockError(f"run folder {self.path.parent}: lost the race for the lock to "
                               f"{_describe(self._read_holder())}")
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
