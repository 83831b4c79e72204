"""Bad input is skipped and counted by reason, also from DataLoader worker processes.

The test writes real tar files: one with a bad sample of every kind, one truncated mid-stream."""

from __future__ import annotations

import json
import shutil
from itertools import islice
from pathlib import Path

import pytest
import webdataset as wds

from powerclip.config import load_config
from powerclip.data import build_loader
from powerclip.data.stream import read_shard

TINY = ("model.config={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1}, "
        "text_cfg: {context_length: 32, width: 32, heads: 2, layers: 1}}")
BAD = {"bad_image": 2, "missing_json": 1, "bad_json": 2, "empty_caption": 2, "missing_image": 1,
       "unsupported_schema": 1, "bad_annotation": 2}


@pytest.fixture(scope="module")
def bad_shards(synthetic_root: Path, tmp_path_factory) -> tuple[Path, int]:
    """00000.tar: 20 good samples with the BAD ones interleaved; 00001.tar: a truncated shard."""
    out = tmp_path_factory.mktemp("bad")
    good = list(read_shard(str(synthetic_root / "train" / "00000.tar")))[:20]
    bad = []
    png, js = good[0]["png"], json.loads(good[0]["json"])
    bad.append({"png": png[:60] + b"\x00" * 200, "json": good[0]["json"]})  # corrupt pixels
    bad.append({"png": b"not an image at all", "json": good[0]["json"]})
    bad.append({"png": png, "txt": b"a red circle"})  # no json
    bad.append({"png": png, "json": b"{not json"})
    bad.append({"png": png, "json": b"[1, 2]"})  # json, but not an object
    bad.append({"png": png, "json": json.dumps({**js, "caption": ""}).encode(), "txt": b""})
    bad.append({"png": png, "json": json.dumps({**js, "caption": "   "}).encode(), "txt": b"  "})
    bad.append({"json": good[0]["json"], "txt": b"x"})  # no image
    bad.append({"png": png, "json": json.dumps({**js, "schema": 99}).encode()})
    bad.append({"png": png, "json": json.dumps({**js, "phrases": [{"label": "NP", "start": "x"}]}).encode()})
    bad.append({"png": png, "json": json.dumps({**js, "phrases": [5]}).encode()})
    with wds.TarWriter(str(out / "00000.tar")) as w:
        for i, s in enumerate(good):
            w.write({"__key__": f"good_{i:03d}", **{k: v for k, v in s.items() if not k.startswith("__")}})
            if i < len(bad):
                w.write({"__key__": f"bad_{i:03d}", **bad[i]})
    data = (synthetic_root / "train" / "00001.tar").read_bytes()
    (out / "00001.tar").write_bytes(data[: len(data) // 3])
    n_trunc = sum(1 for s in read_shard(str(out / "00001.tar")) if "__error__" not in s)
    assert 0 < n_trunc < 64
    return out, n_trunc


def _cfg(root: Path, *extra: str):
    return load_config(None, [f"data.sources=[{{shards: '{root}/{{00000..00001}}.tar'}}]", TINY,
                              "data.context_length=32", "data.batch_size=4", "data.workers=2",
                              "data.shuffle_buffer=8", *extra])


def test_every_reason_counted_across_workers(bad_shards):
    root, n_trunc = bad_shards
    loader = build_loader(_cfg(root), 0, 1, train=False)  # one pass, 2 worker processes
    keys = [k for b in loader for k in b.keys]
    assert sorted(keys) == sorted([f"good_{i:03d}" for i in range(20)] + [
        f"train_{i:08d}" for i in range(64, 64 + n_trunc)])
    assert loader.counters() == {**BAD, "truncated_tar": 1}


def test_counts_in_training_stream_and_resume(bad_shards):
    root, _ = bad_shards
    cfg = _cfg(root, "data.resampled=false")
    loader = build_loader(cfg, 0, 1)
    batches = list(islice(iter(loader), 30))  # more than one epoch on each worker
    assert not any(k.startswith("bad_") for b in batches for k in b.keys)
    counts = loader.counters()
    assert counts["truncated_tar"] >= 1 and all(counts[r] >= n for r, n in BAD.items())
    # counts continue from the checkpointed state, not from zero and not double counted
    state = loader.state_dict()
    straight = build_loader(cfg, 0, 1)
    list(islice(iter(straight), 40))
    resumed = build_loader(cfg, 0, 1, state=state)
    list(islice(iter(resumed), 10))
    assert resumed.counters() == straight.counters()


def test_shard_vanishing_after_preflight(bad_shards, tmp_path: Path):
    root, _ = bad_shards
    shutil.copy(root / "00000.tar", tmp_path / "00000.tar")
    shutil.copy(root / "00000.tar", tmp_path / "00001.tar")
    loader = build_loader(_cfg(tmp_path, "data.workers=0"), 0, 1, train=False)
    (tmp_path / "00001.tar").unlink()
    assert sum(b.size for b in loader) == 20
    assert loader.counters()["unreadable_shard"] == 1


def test_duplicate_keys_are_counted_and_never_merged(synthetic_root: Path, tmp_path: Path, caplog):
    from powerclip.data.stream import shard_len

    src = list(read_shard(str(synthetic_root / "train" / "00000.tar")))[:18]
    keys = [f"s_{i:03d}" for i in range(18)]
    keys[5] = keys[4]  # the key written again right after itself (merged into one sample before)
    keys[12] = keys[2]  # and again further on in the shard
    tar = tmp_path / "00000.tar"
    with wds.TarWriter(str(tar)) as w:
        for key, s in zip(keys, src):
            w.write({"__key__": key, **{k: v for k, v in s.items() if not k.startswith("__")}})
    assert shard_len(str(tar)) == len(list(read_shard(str(tar)))) == 18  # header count = stream count
    cfg = load_config(None, [f"data.sources=[{{shards: '{tar}'}}]", TINY, "data.context_length=32",
                             "data.batch_size=4", "data.workers=0"])
    loader = build_loader(cfg, 0, 1, train=False)
    with caplog.at_level("WARNING", logger="powerclip.data.loader"):
        batches = list(loader)
    assert loader.counters() == {"duplicate_key": 2}
    got = {k: m["caption"] for b in batches for k, m in zip(b.keys, b.meta)}
    assert sum(len(b.keys) for b in batches) == len(got) == 16  # 18 in: 16 samples, 2 skipped, none merged
    first = {}
    for key, s in zip(keys, src):
        first.setdefault(key, json.loads(s["json"])["caption"])
    assert got == first  # each key keeps its first sample, whole
    logged = [r.getMessage() for r in caplog.records if "duplicate_key" in r.getMessage()]
    assert len(logged) == 2 and f"skipped sample {keys[4]} of {tar}: duplicate_key" in logged[0]
