"""Shards laid out as PowerCLIP's published CC12M ones (image, .txt caption, a json without powerclip's
annotation, ``.njson`` phrases as CSR lengths + CLIP token ids, SAM regions as ``samlens``/``samcat``
patch indices), in either index base, for the tests of reading them as published."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

GRID = 14
CAPTION = "a red car parked next to a small house"
PHRASES = ("a red car", "a small house", "parked next to a small house")
# regions as 0-based cells of the 14x14 grid: the top-left block (holds cell 0), a middle block, and
# the bottom-right block (holds the last cell, 195)
REGIONS0 = (
    [r * GRID + c for r in range(0, 4) for c in range(0, 5)],
    [r * GRID + c for r in range(5, 9) for c in range(6, 10)],
    [r * GRID + c for r in range(10, 14) for c in range(9, 14)],
)


def clip_ids(text: str) -> list[int]:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer().encode(text)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def njson(phrases=PHRASES, with_sot_eot: bool = False) -> bytes:
    ids = [clip_ids(p) for p in phrases]
    if with_sot_eot:
        ids = [[49406, *x, 49407] for x in ids]
    return json.dumps({"lens": [len(x) for x in ids], "ids": [i for x in ids for i in x]}).encode()


def png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample_members(i: int, base: int, with_njson: bool = True, with_regions: bool = True) -> dict[str, bytes]:
    members = {"png": png(i), "txt": CAPTION.encode(), "json": json.dumps({"key": f"{i:09d}", "status": "success"}).encode()}
    if with_njson:
        members["njson"] = njson()
    if with_regions:
        sets = [np.asarray(r, dtype=np.int64) + base for r in REGIONS0]
        members["samlens.npy"] = npy(np.array([len(s) for s in sets], dtype=np.int64))
        members["samcat.npy"] = npy(np.concatenate(sets))
    return members


def write_shard(path: Path, n: int = 8, base: int = 0, start: int = 0, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            for ext, data in sample_members(i, base, **kw).items():
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path
