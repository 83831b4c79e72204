"""Regions as sets of patch cells (``samlens.npy``/``samcat.npy``, the CSR layout of PowerCLIP's
published shards): mapped through the crop onto the model grid like boxes, vanished ones dropped
and counted, filled up to M; a grid mismatch stops with the shard and sample named; a tiny
training run reads such shards."""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from powerclip.data.loader import DataError, SampleProcessor, build_loader
from powerclip.data.regions import (
    PatchRegionError,
    box_to_cells,
    cells_to_masks,
    map_box,
    patch_region_masks,
    patch_sets_in_view,
    read_patch_sets,
)
from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _rect_indices(g: int, c0: int, c1: int, r0: int, r1: int) -> np.ndarray:
    return np.array([r * g + c for r in range(r0, r1) for c in range(c0, c1)], dtype=np.int64)


def _brute_force(sets: list[np.ndarray], g: int, window, grid: int) -> np.ndarray:
    """Model cell in region iff its rectangle in stored 0..1 coords overlaps a region cell's with
    positive area: a double loop over cells."""
    wx0, wy0, wx1, wy1 = window
    out = np.zeros((len(sets), grid * grid), dtype=bool)
    for k, idx in enumerate(sets):
        for t in range(grid * grid):
            tr, tc = divmod(t, grid)
            x0, x1 = wx0 + tc / grid * (wx1 - wx0), wx0 + (tc + 1) / grid * (wx1 - wx0)
            y0, y1 = wy0 + tr / grid * (wy1 - wy0), wy0 + (tr + 1) / grid * (wy1 - wy0)
            for i in idx:
                sr, sc = divmod(int(i), g)
                if min(x1, (sc + 1) / g) - max(x0, sc / g) > 1e-9 and min(y1, (sr + 1) / g) - max(y0, sr / g) > 1e-9:
                    out[k, t] = True
                    break
    return out


def _random_window(rng: random.Random) -> tuple[float, float, float, float]:
    w, h = rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0)
    x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
    return x0, y0, x0 + w, y0 + h


def test_rectangular_sets_map_like_the_equivalent_boxes():
    """A rectangle of stored cells lands on the same model cells as the box it covers does through
    map_box + box_to_cells (today's box path), for random crop windows and grids both ways."""
    rng = random.Random(0)
    for g, grid in ((14, 4), (14, 7), (14, 14), (7, 14), (14, 20)):
        for _ in range(40):
            rects = []
            for _ in range(5):
                c0, r0 = rng.randrange(g), rng.randrange(g)
                rects.append((c0, rng.randint(c0 + 1, g), r0, rng.randint(r0 + 1, g)))
            sets = [_rect_indices(g, *r) for r in rects]
            lens = np.array([s.size for s in sets])
            window = _random_window(rng)
            got = patch_sets_in_view(lens, np.concatenate(sets), g, window, grid)
            for k, (c0, c1, r0, r1) in enumerate(rects):
                mb = map_box((c0 / g, r0 / g, c1 / g, r1 / g), window)
                if mb is None:
                    assert not got[k].any()
                else:
                    want = cells_to_masks([[box_to_cells(mb, grid)]], grid)[0, 0].numpy()
                    assert np.array_equal(got[k], want), (g, grid, window, rects[k])


def test_arbitrary_sets_match_brute_force_overlap():
    rng = np.random.default_rng(1)
    prng = random.Random(1)
    g = 14
    for _ in range(15):
        sets = [rng.choice(g * g, size=int(rng.integers(1, 12)), replace=False) for _ in range(4)]
        lens, cat = np.array([s.size for s in sets]), np.concatenate(sets)
        for grid in (4, 16):
            window = _random_window(prng)
            assert np.array_equal(patch_sets_in_view(lens, cat, g, window, grid),
                                  _brute_force(sets, g, window, grid))


def test_vanished_regions_dropped_counted_then_filled_to_m():
    g = 14
    left = _rect_indices(g, 0, 3, 0, 14)  # the left 3 columns
    right = _rect_indices(g, 10, 14, 0, 14)
    empty = np.zeros(0, dtype=np.int64)
    lens = np.array([left.size, empty.size, right.size])
    cat = np.concatenate([left, empty, right])
    window = (0.5, 0.0, 1.0, 1.0)  # the right half of the stored image
    masks, dropped = patch_region_masks(lens, cat, g, window, 4, 5, random.Random(0))
    assert dropped == 2  # the left region left the view, the empty one never had a cell
    assert masks.shape == (5, 16) and masks.dtype == bool and masks.any(1).all()
    # the right region (stored x 10/14..1) in the view (x 0.5..1): view x 0.43..1 -> columns 1..3
    want = np.zeros((4, 4), dtype=bool)
    want[:, 1:] = True
    assert np.array_equal(masks[0].reshape(4, 4), want)
    # more regions than M: the first M in stored order
    many = [_rect_indices(g, c, c + 1, 0, 1) for c in range(8)]
    m3, d3 = patch_region_masks(np.array([1] * 8), np.concatenate(many), g, (0, 0, 1, 1), 14, 3, random.Random(0))
    assert d3 == 0 and [int(np.flatnonzero(r)[0]) for r in m3] == [0, 1, 2]


def test_read_patch_sets_rejects_inconsistent_pairs():
    lens, cat = read_patch_sets(_npy(np.array([2, 1], np.int32)), _npy(np.array([0, 5, 7], np.int16)))
    assert lens.tolist() == [2, 1] and cat.tolist() == [0, 5, 7] and cat.dtype == np.int64
    with pytest.raises(PatchRegionError, match="sums to 3 but samcat holds 2"):
        read_patch_sets(_npy(np.array([2, 1])), _npy(np.array([0, 5])))
    with pytest.raises(PatchRegionError, match="1-D integer"):
        read_patch_sets(_npy(np.array([[2]])), _npy(np.array([0, 5])))
    with pytest.raises(PatchRegionError, match="1-D integer"):
        read_patch_sets(_npy(np.array([1])), _npy(np.array([0.5])))
    with pytest.raises(PatchRegionError, match="unreadable"):
        read_patch_sets(b"not npy", _npy(np.array([0])))
    with pytest.raises(PatchRegionError):  # object arrays would need pickle: never loaded
        read_patch_sets(_npy(np.array([1])), _npy(np.array([[0]], dtype=object)))


# ---------------------------------------------------------------------- shards in PowerCLIP's layout
def _jpg(rng: np.random.Generator, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_powerclip_shard(path: Path, n: int, seed: int, g: int = 14, drop_npy: set[int] = frozenset()) -> list[list[np.ndarray]]:
    """A tar as PowerCLIP publishes them: {key}.jpg, .txt, .json (CC12M fields), .samlens.npy,
    .samcat.npy; returns each sample's regions (index arrays)."""
    rng = np.random.default_rng(seed)
    words = ["red", "dog", "blue", "car", "small", "house", "green", "tree"]
    regions = []
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            key = f"{seed:04d}{i:05d}"
            caption = f"a {words[i % 8]} {words[(i + 3) % 8]} near a {words[(i + 5) % 8]} {words[(i + 1) % 8]}"
            sets = [rng.choice(g * g, size=int(rng.integers(1, 30)), replace=False) for _ in range(int(rng.integers(0, 7)))]
            regions.append(sets)
            members = {"jpg": _jpg(rng), "txt": caption.encode(),
                       "json": json.dumps({"caption": caption, "url": f"http://x/{key}.jpg", "key": key,
                                           "status": "success", "width": 32, "height": 32}).encode()}
            if i not in drop_npy:
                members["samlens.npy"] = _npy(np.array([s.size for s in sets], dtype=np.int64))
                members["samcat.npy"] = _npy(np.concatenate(sets).astype(np.int64) if sets else np.zeros(0, np.int64))
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return regions


def _cfg(shards: str, *extra: str):
    return tiny_config([f"data.sources=[{{shards: '{shards}'}}]", "data.batch_size=4", "data.workers=0",
                        "data.num_regions=4", "data.region_source=patches", *extra])


def test_loader_reads_patch_regions_from_powerclip_layout(tmp_path: Path):
    regions = write_powerclip_shard(tmp_path / "00000.tar", 8, seed=0, drop_npy={5})
    cfg = _cfg(str(tmp_path / "00000.tar"))
    batches = list(build_loader(cfg, 0, 1, shards=str(tmp_path / "00000.tar"), train=False))
    loader_keys = [k for b in batches for k in b.keys]
    masks = torch.cat([b.region_masks for b in batches])
    assert masks.shape == (7, 4, 16) and masks.any(2).all()  # 8 samples, one without regions skipped
    # eval transform of a square 32 px image: the whole image, stored 14x14 -> model 4x4
    by_key = {f"0000{i:05d}": r for i, r in enumerate(regions)}
    for b, key in enumerate(loader_keys):
        sets = by_key[key]
        if not sets:
            continue
        want = _brute_force(sets[:4], 14, (0.0, 0.0, 1.0, 1.0), 4)
        assert np.array_equal(masks[b, : len(want)].numpy(), want), key
    loader = build_loader(cfg, 0, 1, shards=str(tmp_path / "00000.tar"), train=False)
    list(loader)
    assert loader.counters() == {"missing_regions": 1}


def test_training_crops_drop_and_count_regions(tmp_path: Path):
    write_powerclip_shard(tmp_path / "00000.tar", 24, seed=1)
    # one DataLoader worker: the masks and the dropped count cross the process boundary
    cfg = _cfg(str(tmp_path / "00000.tar"), "data.augment_scale=[0.08,0.2]", "data.workers=1")
    loader = build_loader(cfg, 0, 1)
    it = iter(loader)
    for _ in range(6):
        b = next(it)
        assert b.region_masks.shape == (4, 4, 16) and b.region_masks.any(2).all()
    assert loader.counters().get("regions_dropped", 0) > 0  # small crops leave regions out


def test_grid_mismatch_names_shard_sample_and_key(tmp_path: Path):
    write_powerclip_shard(tmp_path / "00000.tar", 4, seed=2)
    proc = SampleProcessor(_cfg(str(tmp_path / "00000.tar"), "data.region_grid=4"), train=False)
    from powerclip.data.stream import read_shard

    with pytest.raises(DataError, match=r"00000\.tar.*sample '0002.*data\.region_grid=4"):
        for sample in read_shard(str(tmp_path / "00000.tar")):
            proc(sample, 0)
    # null: the model's own grid (4 for the tiny model), the same mismatch
    proc = SampleProcessor(_cfg(str(tmp_path / "00000.tar"), "data.region_grid=null"), train=False)
    assert proc.region_grid == 4


def _train_job(rank: int, world: int, run_dir: str, shards: str) -> list[float]:
    from powerclip.train.loop import train

    cfg = _cfg(shards, "data.augment_scale=[0.08,0.2]", "loss.powerset.weight=0.2", "loss.powerset.tau=0.01", f"train.run_dir={run_dir}",
               "train.steps=2", "train.log_every=1", "optim.warmup_steps=1", "checkpoint.every_steps=0")
    return train(cfg)["losses"]


def test_tiny_training_on_powerclip_layout_shards(tmp_path: Path):
    for s in range(2):
        write_powerclip_shard(tmp_path / f"{s:05d}.tar", 12, seed=10 + s)
    (losses,) = run_on_ranks(_train_job, 1, str(tmp_path / "run"), str(tmp_path / "{00000..00001}.tar"))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/powerset"] > 0 for r in recs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    # regions that left the crop are counted, and not as skipped samples
    assert acc.Scalars("data/regions_dropped")[-1].value > 0
    assert acc.Scalars("data/skipped_samples")[-1].value == 0
