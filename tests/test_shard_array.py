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

from powerclip.launch.shard_array import split_ranges
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


# ------------------------------------------------------------------------------ make_negatives
def _negatives_cli(src: Path, out: Path, cluster, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(env or os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_negatives.py"), "--input", str(src),
                           "--output", str(out), "-k", "4", "--seed", "5", "--no-progress", "--slurm-tasks", "2",
                           "--slurm-partition", cluster.partition, "--slurm-time", "10", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)


NOUNS = ["dog", "car", "house", "tree", "cat", "boat", "chair", "bird"]
ADJS = ["red", "blue", "small", "green", "large", "wooden", "white", "old"]


def _caption_shards(src: Path, shards: int, per: int) -> None:
    """Shards whose words differ from shard to shard, so that a vocabulary counted over one task's
    shards only would draw other replacements than the corpus vocabulary."""
    import webdataset as wds

    src.mkdir()
    for s in range(shards):
        with wds.TarWriter(str(src / f"{s:05d}.tar"), encoder=False) as w:
            lo = 0 if s < shards // 2 else 3  # the first half of the shards has words 0..4, the rest 3..7
            for i in range(per):
                a, b = (2 * s + i) % 5, (3 * s + 2 * i + 1) % 5
                cap = f"a {ADJS[lo + a]} {NOUNS[lo + b]} next to a {ADJS[lo + (a + 2) % 5]} {NOUNS[lo + (b + 3) % 5]}"
                w.write({"__key__": f"{s:05d}{i:04d}", "jpg": bytes([s, i]) * 50, "txt": cap.encode(),
                         "json": json.dumps({"caption": cap, "url": f"http://x/{s}/{i}"}).encode()})


def _same_shards(a: Path, b: Path, names: list[str]) -> None:
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n  # whole tar, negatives and every member


@pytest.mark.slurm
@pytest.mark.slow
def test_make_negatives_job_array_on_slurm_matches_one_machine(cluster, tmp_path: Path):
    """Rules backend: a counting array, the merged vocabulary, a writing array; the shards are the
    bytes one process writes, and a task killed in the counting phase resumes."""
    from powerclip.negatives.shards import NegativesJob, list_shards, make_negatives

    src, out, single = tmp_path / "src", tmp_path / "out", tmp_path / "single"
    _caption_shards(src, 4, 4)
    names = [f"{s:05d}.tar" for s in range(4)]
    ref = make_negatives(list_shards(str(src)), single, NegativesJob(k=4, seed=5))
    assert ref["negatives_written"] > 0 and ref["missing_shards"] == []
    # the test means something: task 0's shards alone make other negatives than the whole corpus
    make_negatives(list_shards(str(src))[:2], tmp_path / "half", NegativesJob(k=4, seed=5))
    assert (tmp_path / "half" / "_negatives" / "vocabulary.json").read_bytes() != \
        (single / "_negatives" / "vocabulary.json").read_bytes()
    assert any((tmp_path / "half" / n).read_bytes() != (single / n).read_bytes() for n in names[:2])

    r = _negatives_cli(src, out, cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{ref['negatives_written']} negatives for 16 samples in 4 of 4 shards by 2 tasks (0 already done)" \
        in r.stdout, r.stdout
    _same_shards(out, single, names)
    state = out / "_negatives"
    tasks = {n: json.loads((state / "done" / f"{n}.json").read_text())["array_task"] for n in names}
    assert tasks == {"00000.tar": "0", "00001.tar": "0", "00002.tar": "1", "00003.tar": "1"}  # disjoint ranges
    assert (state / "vocabulary.json").read_bytes() == (single / "_negatives" / "vocabulary.json").read_bytes()
    report = json.loads((out / "negatives_report.json").read_text())
    for k in ("per_kind", "rejects", "negatives_per_sample", "vocabulary", "samples"):
        assert report[k] == ref[k], k
    assert json.loads((out / "sizes.json").read_text()) == {n: 4 for n in names}

    # resume: as if task 1 was killed while counting 00003 (no merged vocabulary yet, 00002 counted,
    # a half-written shard left behind)
    for p in (state / "vocabulary.json", state / "vocab" / "00003.tar.json", state / "tagged" / "00003.tar.json.gz",
              state / "done" / "00002.tar.json", state / "done" / "00003.tar.json", out / "00002.tar", out / "00003.tar"):
        p.unlink()
    (out / "00003.tar.tmp").write_bytes(b"half a shard")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "00000.tar", state / "tagged" / "00002.tar.json.gz")}
    time.sleep(0.01)
    r = _negatives_cli(src, out, cluster)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "in 4 of 4 shards by 2 tasks (2 already done)" in r.stdout, r.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished work is not redone
    _same_shards(out, single, names)
    assert not list(out.glob("*.tmp"))


@pytest.mark.slurm
@pytest.mark.slow
def test_make_negatives_llm_job_array_on_slurm(cluster, tmp_path: Path, monkeypatch):
    """LLM backend: one writing array (no vocabulary), the key only in the environment: the same
    shards as one process, and the key in no file the run leaves (submitit's pickles, logs, caches)."""
    from powerclip.negatives.shards import NegativesJob, list_shards, make_negatives
    from tests.slurm_cluster import CONTROLLER_ADDR
    from tests.test_negatives_llm import SECRET, FakeChatServer

    src, out, single = tmp_path / "src", tmp_path / "out", tmp_path / "single"
    src.mkdir()
    for s in range(3):
        write_powerclip_shard(src / f"{s:05d}.tar", 3, seed=50 + s)
    names = [f"{s:05d}.tar" for s in range(3)]
    env = dict(os.environ, PCLIP_TEST_KEY=SECRET)
    with FakeChatServer(host=CONTROLLER_ADDR) as server:  # the nodes reach the host on the bridge
        llm = ["--backend", "llm", "--llm-base-url", server.url, "--llm-model", "fake-model",
               "--llm-api-key-env", "PCLIP_TEST_KEY", "--llm-batch-size", "2"]
        r = _negatives_cli(src, out, cluster, *llm, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "for 9 samples in 3 of 3 shards by 2 tasks (0 already done)" in r.stdout, r.stdout
        asked = server.requests
        monkeypatch.setenv("PCLIP_TEST_KEY", SECRET)
        job = NegativesJob(k=4, seed=5, backend="llm",
                           llm={"base_url": server.url, "model": "fake-model", "api_key_env": "PCLIP_TEST_KEY",
                                "batch_size": 2})
        make_negatives(list_shards(str(src)), single, job)
    assert asked > 0 and set(server.auth) == {f"Bearer {SECRET}"}  # the tasks did send the key
    _same_shards(out, single, names)
    caches = sorted(p.name for p in (out / "_negatives" / "llm_cache").glob("*.sqlite"))
    assert caches == ["00000.tar.sqlite", "00002.tar.sqlite"]  # one cache per task, named by its first shard
    report = json.loads((out / "negatives_report.json").read_text())
    # the shards repeat their 3 captions: each task's cache holds them once
    assert report["llm"]["cache_entries"] == 6 and report["missing_shards"] == []
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == [] and SECRET not in r.stdout + r.stderr
