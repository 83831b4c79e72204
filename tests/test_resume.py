"""Exact resume: kill -9 a 2-rank run after its first checkpoint, start it again, and every per-step
loss equals the uninterrupted run's (fp32, real synthetic shards, real loader with a worker).

Both runs are real ``torchrun --standalone --nproc_per_node 2 -m powerclip train`` launches; the
killed one is taken down with SIGKILL on its whole process tree (launcher, ranks, data workers), so
nothing gets a chance to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import tiny_model_config

STEPS = 16
EVERY = 4


def _write_config(tmp: Path, synthetic_root: Path) -> Path:
    cfg = {
        "data": {"sources": [{"shards": str(synthetic_root / "train" / "{00000..00002}.tar")}],
                 "batch_size": 8, "workers": 1, "shuffle_buffer": 32},
        "model": {"config": tiny_model_config()},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": STEPS, "zero_stage": 2, "precision": "fp32", "log_every": EVERY},
        "checkpoint": {"every_steps": EVERY, "keep_last": 2},
    }
    path = tmp / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _command(config: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--log-dir", str(run_dir.parent / "torchrun-logs"),  # (its default is a new /tmp folder per launch)
            "-m", "powerclip", "train", "-c", str(config), f"train.run_dir={run_dir}"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=600).returncode
    assert rc == 0, f"{' '.join(cmd)} failed (rc {rc}):\n{log.read_text()[-4000:]}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in their own sessions, so killing the
    launcher's process group alone would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL the launcher and every process it started (no clean-up anywhere). The tree is frozen
    with SIGSTOP first so that no process can start a new child between the listing and the kill."""
    frozen: set[int] = set()
    while True:
        tree = {pid, *_descendants(pid)} - frozen
        if not tree:
            break
        for p in tree:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        frozen |= tree
    for p in frozen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs]


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_same_losses(tmp_path, synthetic_root):
    config = _write_config(tmp_path, synthetic_root)

    straight = tmp_path / "straight"
    _run(_command(config, straight), tmp_path / "straight.log")
    reference = _losses(straight)
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))

    # kill -9 (both ranks) in the middle of the second checkpoint save: its folder exists, unsealed
    # (run.json, the save's first file, is there: the weights are being written)
    killed = tmp_path / "killed"
    latest = killed / "checkpoints" / "latest"
    saving = killed / "checkpoints" / f"step_{2 * EVERY:08d}"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_command(config, killed), stdout=log, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)
        deadline = time.time() + 600
        while not (saving / "run.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        still_running = proc.poll() is None
        _kill_tree(proc.pid)
        proc.wait()
        time.sleep(1.0)  # let the kernel reap the ranks before anything else looks at the run
    assert still_running, f"the run ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    tag_at_kill = latest.read_text()
    in_save = not (saving / "checksums.json").exists()  # else the save finished before the kill landed
    assert tag_at_kill != f"step_{STEPS:08d}", "killed too late: the run had already finished"

    _run(_command(config, killed), tmp_path / "resumed.log")
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert f"resumed from {killed / 'checkpoints' / tag_at_kill}" in resumed_log
    assert _losses(killed) == reference  # exact float equality, every step
    if in_save:  # the interrupted save was moved aside, not reused, and deleted after the next good save
        assert tag_at_kill == f"step_{EVERY:08d}"
        assert f"step_{2 * EVERY:08d}.aside-" in resumed_log.split("removed half-written checkpoint folders")[1]

    # what the resumed run left behind: the run's last K checkpoints (keep_last spans the restart:
    # the killed process's checkpoints are the same run's), latest on the final one, nothing aside
    ckpts = killed / "checkpoints"
    assert latest.read_text() == f"step_{STEPS:08d}"
    kept = {f"step_{STEPS - EVERY:08d}", f"step_{STEPS:08d}"}
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == sorted(kept)
    assert (killed / "config.yaml").is_file()
