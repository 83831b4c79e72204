"""Where this process sits in the job: rank, world size, local rank and device.

One function reads the environment of every launcher we support, so the engine never cares how it
was started:

* ``torchrun`` and ``deepspeed`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``;
* Slurm ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list; the
  master is the first node of the job and the port is derived from the job id, so every task agrees
  without talking to each other;
* launchers in between (an sbatch script or MPI wrapper that exports ``RANK``/``WORLD_SIZE`` only):
  what is missing comes from the Slurm variables when there are any, since guessing ``LOCAL_RANK=0``
  puts every rank on one GPU and ``MASTER_ADDR=127.0.0.1`` makes every node its own master (a hang);
* nothing at all: a single process (world size 1) on a free local port.

The GPU is ``LOCAL_RANK`` modulo the number of GPUs this process sees: sites that give each task
its own GPU (``--gpus-per-task=1``, one ``CUDA_VISIBLE_DEVICES`` per task) show every task a single
device 0, whatever its local rank.

The process group is created by ``deepspeed.init_distributed`` (NCCL on GPUs, gloo on CPU), with the
timeout of ``train.dist_timeout_s``, unless a caller (a test harness, a notebook) already created one.
With several ranks, each then starts its heartbeat (``peers``), so that a rank that dies is named.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from powerclip import distributed as pdist
from powerclip.train import peers


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no process listens on at the moment of the call.

    The OS picks it (bind to port 0); the socket is closed before returning, so another process could
    take the port before the caller binds it: good enough for single-host rendezvous and tests.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list (``scontrol`` expands the compressed form when present)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # no scontrol on this node: "node[01-04],other" -> "node01"; a plain "host" stays "host"
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return first


def _slurm_master_addr(environ: Mapping[str, str] | None = None) -> str:
    """First host of the step's (else the job's) node list; 127.0.0.1 outside Slurm."""
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    return first_host(nodelist) if nodelist else "127.0.0.1"


def _slurm_port(environ: Mapping[str, str]) -> str:
    return str(20000 + int(environ.get("SLURM_JOB_ID", "0").split("_")[0] or 0) % 20000)


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT values ``environ`` lacks (pure).

    Values already in ``environ`` are never replaced; only the missing ones are returned.
    """
    in_slurm = "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ
    out: dict[str, str] = {}
    if "RANK" in environ and "WORLD_SIZE" in environ:
        pass
    elif in_slurm:
        out["RANK"], out["WORLD_SIZE"] = environ["SLURM_PROCID"], environ["SLURM_NTASKS"]
    else:  # a single process
        out.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        out["MASTER_PORT"] = environ.get("MASTER_PORT") or str(free_port())
        return {k: v for k, v in out.items() if k not in environ}
    has_nodes = bool(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST"))
    if "LOCAL_RANK" not in environ:
        # SLURM_LOCALID is right whatever the task layout; without it the global rank is the best
        # guess (modulo the visible GPUs it is right for nodes filled in rank order)
        out["LOCAL_RANK"] = environ.get("SLURM_LOCALID", out.get("RANK", environ.get("RANK", "0")))
    if "MASTER_ADDR" not in environ:
        out["MASTER_ADDR"] = _slurm_master_addr(environ) if has_nodes else "127.0.0.1"
    if "MASTER_PORT" not in environ:
        out["MASTER_PORT"] = _slurm_port(environ) if "SLURM_JOB_ID" in environ else "29500"
    return out


def export_env_from_launcher() -> dict[str, str]:
    """Fill the missing rendezvous variables into ``os.environ`` (see ``launcher_env``); returns them."""
    values = launcher_env(os.environ)
    os.environ.update(values)
    return values


def cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a process with ``local_rank`` that sees ``visible`` devices."""
    if visible < 1:
        raise RuntimeError("CUDA is available but this process sees no GPU (check CUDA_VISIBLE_DEVICES)")
    return local_rank % visible


def init_distributed(timeout_s: float | None = None) -> DistEnv:
    """Create (or adopt) the process group and pick this rank's device.

    ``timeout_s`` bounds every collective, the rendezvous included: a rank that cannot reach
    MASTER_ADDR:MASTER_PORT fails with a message naming them instead of waiting forever.
    """
    import deepspeed  # heavy import; only when a run really starts

    if not pdist.is_initialized():
        export_env_from_launcher()
        local_rank = int(os.environ["LOCAL_RANK"])
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(cuda_index(local_rank, torch.cuda.device_count()))
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        try:
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **kwargs)
        except Exception as e:  # DistNetworkError, DistStoreError, TimeoutError, RuntimeError...
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise RuntimeError(
                f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} could not join the process "
                f"group at MASTER_ADDR:MASTER_PORT={where} within {timeout_s or 'the default'} s "
                f"(train.dist_timeout_s): is the port the same on every node, open between nodes, and "
                f"did rank 0 start? ({type(e).__name__}: {e})") from e
    else:
        # adopted group (e.g. tests/dist_helpers.run_on_ranks): DeepSpeed's comm layer must know it
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    rank, world = pdist.rank(), pdist.world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # one line per rank (the logging of ranks > 0 shows warnings only): where each rank landed is
    # the first thing to check when a multi-node job hangs or two ranks share a GPU
    print(f"powerclip: rank {rank}/{world} on {socket.gethostname()} (local rank {local_rank}, {device}, "
          f"{pdist.backend()}, master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})",
          file=sys.stderr, flush=True)
    peers.start_watch(rank, world)  # names a rank that dies later (powerclip.train.peers)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device,
                   backend=str(pdist.backend()))
