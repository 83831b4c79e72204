"""data.jpeg_draft: JPEGs decoded at a reduced DCT scale. The scale never makes the transform upsample,
the pixels are deterministic (exact resume), and the transformed image is close to the full decode's."""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip import image_transform

from powerclip.data.decode import decode_image
from powerclip.data.transforms import apply_transform, crop_params, draft_size
from tests.tiny import tiny_config
from tools.bench_shards import make_photo_shards, photo

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pil_scale(size: tuple[int, int], want: int) -> int:
    """The scale PIL's JpegImageFile.draft picks for a requested (want, want)."""
    scale = min(size[0] // want, size[1] // want)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def test_draft_size_keeps_every_training_crop_at_least_the_output_size():
    train = image_transform(224, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": (0.9, 1.0)})
    t = draft_size(train)
    rrc = train.transforms[0]
    assert t == math.ceil(224 / math.sqrt(0.9 * 0.75)) + 1
    rng = random.Random(0)
    reduced = 0
    for _ in range(300):
        w, h = rng.randint(300, 2400), rng.randint(300, 2400)
        s = _pil_scale((w, h), t)
        reduced += s > 1
        dw, dh = -(-w // s), -(-h // s)  # libjpeg rounds the scaled size up
        _, _, ch, cw = crop_params(rng, dw, dh, rrc.scale, rrc.ratio)
        assert ch >= 224 and cw >= 224, (w, h, s, ch, cw)
    assert reduced > 100  # the check covered reduced decodes, not only full ones
    assert draft_size(image_transform(224, is_train=False, mean=MEAN, std=STD)) == 224
    assert draft_size(lambda img: img) is None  # unknown geometry: full decode


def test_draft_decode_is_deterministic_smaller_and_close_after_the_transform():
    evaluate = image_transform(224, is_train=False, mean=MEAN, std=STD)
    rng = random.Random(1)
    for _ in range(3):
        data = _jpeg(photo(rng, (900, 1024)))
        full = decode_image(data, "x")
        a, b = decode_image(data, "x", draft=224), decode_image(data, "x", draft=224)
        assert np.array_equal(np.asarray(a), np.asarray(b))  # same bytes, same pixels
        assert a.size[0] < full.size[0] and min(a.size) >= 224 and a.mode == "RGB"
        x, wx = apply_transform(evaluate, full, uint8=True)
        y, wy = apply_transform(evaluate, a, uint8=True)
        assert x.shape == y.shape == (3, 224, 224)
        assert wx == pytest.approx(wy, abs=0.01)  # the same part of the picture
        diff = (x.float() - y.float()).abs()
        assert diff.mean() < 3.0 and torch.quantile(diff.flatten(), 0.99) < 16.0
    png = io.BytesIO()
    photo(rng, (600, 600)).save(png, format="PNG")
    assert decode_image(png.getvalue(), "x", draft=224).size == decode_image(png.getvalue(), "x").size


def _loader(shards: str, draft: bool, train: bool = True):
    from powerclip.data import build_loader

    cfg = tiny_config([f"data.sources=[{{shards: '{shards}'}}]", "data.workers=0", "data.batch_size=4",
                       "data.shuffle_buffer=8", f"data.jpeg_draft={str(draft).lower()}"],
                      image_size=224, patch_size=16)  # the presets' image size: what the draft is for
    return build_loader(cfg, 0, 1, shards=None if train else shards, train=train)


def test_loader_with_draft_repeats_exactly_and_matches_the_full_decode(tmp_path: Path):
    shards = make_photo_shards(tmp_path / "photo", shards=1, per_shard=8, sides=(500, 700))
    runs = []
    for _ in range(2):
        it = iter(_loader(shards, draft=True))
        runs.append([next(it) for _ in range(2)])
    for x, y in zip(*runs):  # the same stream twice: what an exact resume relies on
        assert x.keys == y.keys and torch.equal(x.images, y.images)
    full = next(iter(_loader(shards, draft=False, train=False)))
    drafted = next(iter(_loader(shards, draft=True, train=False)))
    assert full.keys == drafted.keys and full.images.shape == drafted.images.shape
    assert (full.images.float() - drafted.images.float()).abs().mean() < 3.0
    assert not torch.equal(full.images, drafted.images)  # the draft really decoded at a reduced scale
