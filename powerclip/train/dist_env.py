"""Where this process sits in the job: rank, world size, local rank and device.

One function reads the environment of every launcher we support, so the engine never cares how it
was started:

* ``torchrun`` and ``deepspeed`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``;
* Slurm ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list; the
  master is the first node of the job and the port is derived from the job id, so every task agrees
  without talking to each other;
* nothing at all: a single process (world size 1) on a free local port.

The process group is created by ``deepspeed.init_distributed`` (NCCL on GPUs, gloo on CPU), unless a
caller (a test harness, a notebook) already created one.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _slurm_master_addr() -> str:
    """First host of the job's node list (``scontrol`` expands the compressed form)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
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


def export_env_from_launcher() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from Slurm or for a single process.

    Variables a launcher already set are never overwritten.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", os.environ.get("LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        job = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ.setdefault("MASTER_PORT", str(20000 + job % 20000))
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed() -> DistEnv:
    """Create (or adopt) the process group and pick this rank's device."""
    import deepspeed  # heavy import; only when a run really starts

    if not (dist.is_available() and dist.is_initialized()):
        export_env_from_launcher()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        # adopted group (e.g. tests/dist_helpers.run_on_ranks): DeepSpeed's comm layer must know it
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device,
                   backend=dist.get_backend())
