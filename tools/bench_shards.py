"""Photo-like JPEG shards with CC12M's spread of source sizes, for the loader and end-to-end benches.

Why not the synthetic dataset: its images are small flat drawings (64-224 px), which decode in a
fraction of the time a real web image does, so a loader that keeps up with them says nothing about
CC12M. Here every image has its longer side drawn uniformly from 400-1,024 px and an aspect ratio
from 1 to 1.5 (portrait or landscape), smooth colour fields with edges and grain (so the JPEG
entropy decoding costs about what a photo's does), encoded at quality 90. Each sample carries the
caption both as ``txt`` (open_clip_train's reader) and inside the ``json`` powerclip reads, so both
trainers' loaders read the same shards.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WORDS = ("a red car parked next to an old brick building on a quiet street in the morning light with "
         "two dogs running across green grass near the lake while children watch from a wooden bench "
         "under tall trees").split()


def photo(rng: random.Random, sides: tuple[int, int]) -> Image.Image:
    """One photo-like RGB image whose longer side is uniform in ``sides`` (inclusive)."""
    long = rng.randint(*sides)
    short = max(1, round(long / rng.uniform(1.0, 1.5)))
    w, h = (long, short) if rng.random() < 0.6 else (short, long)
    nrng = np.random.default_rng(rng.getrandbits(32))
    base = Image.fromarray(nrng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(rng.randint(3, 8)):  # objects: edges the encoder must spend bits on
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = (x0, y0, x0 + rng.randint(w // 10, w // 3), y0 + rng.randint(h // 10, h // 3))
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    base = base.filter(ImageFilter.GaussianBlur(1.5))
    grain = nrng.normal(0.0, 6.0, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def _write_shard(args: tuple[str, int, int, tuple[int, int], int]) -> int:
    path, index, per_shard, sides, seed = args
    rng = random.Random(seed * 1_000_003 + index)
    with tarfile.open(path, "w") as tf:
        for i in range(per_shard):
            key = f"{index:05d}{i:04d}"
            buf = io.BytesIO()
            photo(rng, sides).save(buf, format="JPEG", quality=90)
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                              ("json", json.dumps({"schema": 1, "caption": caption}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return per_shard


def make_photo_shards(root: str | Path, shards: int, per_shard: int, sides: tuple[int, int] = (400, 1024),
                      seed: int = 0, processes: int = 1) -> str:
    """Write ``shards`` tar files of ``per_shard`` samples under ``root`` (kept if already complete);
    returns their brace pattern. ``processes`` > 1 encodes shards in parallel."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    done = root / f"complete_{shards}x{per_shard}_{sides[0]}-{sides[1]}_{seed}"
    pattern = str(root / f"{{00000..{shards - 1:05d}}}.tar")
    if done.exists():
        return pattern
    jobs = [(str(root / f"{i:05d}.tar"), i, per_shard, tuple(sides), seed) for i in range(shards)]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_write_shard, jobs))
    else:
        for job in jobs:
            _write_shard(job)
    done.write_text("")
    return pattern
