"""A rank killed without a launcher to report it (as under ``srun``: every rank started on its own with
RANK/WORLD_SIZE/MASTER_ADDR) is named, rank and host, in one line on the survivor, which exits
non-zero within the collective timeout.

Real processes: two ``python -m powerclip train`` ranks on gloo over the synthetic shards; one is
killed with SIGKILL once training runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from powerclip.train.dist_env import free_port
from powerclip.train.peers import STALE_S
from tests.tiny import tiny_model_config

DIST_TIMEOUT_S = 60
START_S = 300  # a loaded 2-core machine can take minutes to import DeepSpeed and build two ranks
SLACK_S = 30  # the survivor's store connection attempt (peers.CONNECT_S) and its exit, on a busy machine


def _config(tmp: Path, synthetic_root: Path) -> Path:
    cfg = {
        "data": {"sources": [{"shards": str(synthetic_root / "train" / "{00000..00002}.tar")}],
                 "batch_size": 4, "workers": 0, "shuffle_buffer": 16},
        "model": {"config": tiny_model_config()},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 100_000, "zero_stage": 2, "precision": "fp32", "log_every": 1,
                  "dist_timeout_s": DIST_TIMEOUT_S},
        "checkpoint": {"every_steps": 0},
    }
    path = tmp / "peer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(rank: int, world: int, config: Path, run_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "powerclip", "train", "-c", str(config), f"train.run_dir={run_dir}"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(("world", "victim"), [(3, 1), (2, 0)], ids=["rank1_of_3_killed", "store_host_rank0_killed"])
def test_survivors_name_the_killed_rank_in_one_line(tmp_path, synthetic_root, world, victim):
    """Every survivor names the killed rank alone: with 3 ranks, rank 2 may learn of the failure only
    when rank 0 gives up, and must still name rank 1, not rank 0."""
    config = _config(tmp_path, synthetic_root)
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = [_start(r, world, config, tmp_path / "run", port, logs[r]) for r in range(world)]
    limit = DIST_TIMEOUT_S + STALE_S + SLACK_S
    try:
        deadline = time.monotonic() + START_S
        while "step 3/" not in logs[0].read_text() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a rank ended early:\n" + "".join(
                x.read_text()[-2000:] for x in logs)
            time.sleep(0.2)
        assert "step 3/" in logs[0].read_text(), logs[0].read_text()[-3000:]
        victim_pid = procs[victim].pid
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        survivors = [r for r in range(world) if r != victim]
        rcs, took = {}, {}
        for r in survivors:
            rcs[r] = procs[r].wait(timeout=max(1.0, limit - (time.monotonic() - killed_at)))
            took[r] = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for r in survivors:
        out = logs[r].read_text()
        assert rcs[r] != 0 and took[r] < limit, (r, rcs[r], took[r], out[-3000:])
        named = [x for x in out.splitlines() if "peer rank" in x]
        assert len(named) == 1, out[-3000:]
        line = named[0]
        print(f"\nrank {r} exited rc {rcs[r]} {took[r]:.1f} s after the kill: {line}")
        assert line.startswith(f"powerclip train: error (rank {r}): peer rank {victim} "), line
        assert f"({socket.gethostname()}, pid {victim_pid}) is gone" in line, line
        assert ("rendezvous store" in line) == (victim == 0), line  # rank 0 hosts the store: it went with it
        after_kill = out.split("step 3/", 1)[-1]
        assert "Traceback" not in after_kill, after_kill[-3000:]
