"""The shard annotator as a Slurm job array on the REAL two-node cluster (tests/slurm_cluster.py):
each task annotates a disjoint range of shards, one dependent job writes the summary, a rerun
resumes (finished shards are not redone). Ranges are also checked without a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from powerclip.data.shard_array import split_ranges
from tests.test_data_patch_regions import write_powerclip_shard

REPO = Path(__file__).resolve().parents[1]


def test_split_ranges_disjoint_and_covering():
    for n in (1, 2, 7, 10, 2176):
        for tasks in (1, 2, 3, 64, 5000):
            r = split_ranges(n, tasks)
            assert r[0][0] == 0 and r[-1][1] == n and len(r) == min(n, tasks)
            assert all(a[1] == b[0] for a, b in zip(r, r[1:]))  # contiguous, no overlap, no gap
            sizes = [hi - lo for lo, hi in r]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        split_ranges(0, 2)


@pytest.fixture(scope="module")
def cluster():
    from tests.slurm_cluster import SlurmUnavailable, ensure_cluster

    try:
        return ensure_cluster()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster on this machine: {e}")


def _cli(src: Path, out: Path, cluster) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(REPO / "tools" / "annotate_shards.py"), "--input", str(src),
                           "--out", str(out), "--parser", "rule", "--no-progress", "--slurm-tasks", "2",
                           "--slurm-partition", cluster.partition, "--slurm-time", "10"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slurm
@pytest.mark.slow
def test_annotator_job_array_on_slurm(cluster, tmp_path: Path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for s in range(4):
        write_powerclip_shard(src / f"{s:05d}.tar", 3, seed=30 + s)
    r = _cli(src, out, cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "12 of 12 samples annotated in 4 shards by 2 tasks (0 already done)" in r.stdout, r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_shards"] == 4 and manifest["missing_shards"] == []
    tasks = {p.name.split(".")[0]: json.loads(p.read_text())["array_task"] for p in (out / "_annotate").glob("*.tar.json")}
    assert tasks == {"00000": "0", "00001": "0", "00002": "1", "00003": "1"}  # disjoint ranges, one per task
    # resume: as if task 1 was killed before finishing 00003
    (out / "_annotate" / "00003.tar.json").unlink()
    stamp = (out / "00000.tar").stat().st_mtime_ns
    time.sleep(0.01)
    r = _cli(src, out, cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "in 4 shards by 2 tasks (3 already done)" in r.stdout, r.stdout
    assert (out / "00000.tar").stat().st_mtime_ns == stamp


@pytest.mark.slurm
@pytest.mark.slow
def test_build_shards_job_array_on_slurm(cluster, tmp_path: Path):
    from PIL import Image

    raw, out = tmp_path / "raw", tmp_path / "shards"
    raw.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(raw / f"im{i}.png")
        (raw / f"im{i}.txt").write_text(f"a red cube number {i}")
    (raw / "im9.png").write_bytes(b"not a png")  # skipped as bad_image, listed in the summary
    (raw / "im9.txt").write_text("broken")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "tools" / "build_shards.py"), str(raw), "--out", str(out),
                        "--shard-size", "2", "--parser", "rule", "--no-progress", "--slurm-tasks", "2",
                        "--slurm-partition", cluster.partition, "--slurm-time", "10"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "5 samples in 3 shards by 2 tasks (0 already done); skipped 1: {'bad_image': 1}" in r.stdout, r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["missing_shards"] == [] and manifest["num_inputs"] == 6
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
