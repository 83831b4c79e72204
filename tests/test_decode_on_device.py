"""data.decode_on_device: the loader workers ship JPEG bytes + crop window and the move to the device
decodes them (``data.jpeg_device.decode_crops``, on the CPU here). Against the worker-decode path on
real JPEG shards: same keys, order, shapes and crop windows; pixels within the decoders' rounding."""

from __future__ import annotations

import io
import json
from itertools import islice
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from powerclip.config import ConfigError, load_config
from powerclip.data import build_loader
from powerclip.data.batch import Batch
from powerclip.data.device import to_device
from powerclip.data.transforms import pixels_into
from powerclip.errors import UserError
from tools.bench_shards import make_photo_shards

SIZE = 64
TINY = ("model.config={embed_dim: 32, vision_cfg: {image_size: 64, patch_size: 16, width: 32, layers: 1}, "
        "text_cfg: {context_length: 32, width: 32, heads: 2, layers: 1}}")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# decode_crops (libjpeg IDCT, float bicubic with antialias) against PIL's decode and fixed-point
# bicubic: measured 0.15 grey levels on average and 1 at the worst pixel on these shards; a crop shifted
# by 2 px is 6 levels off on average
MEAN_TOL, MAX_TOL = 0.5, 6


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> str:
    """3 shards of 16 photo-like JPEGs, 96-200 px (larger than the 64 px crop, as web images are)."""
    return make_photo_shards(tmp_path_factory.mktemp("photos"), shards=3, per_shard=16, sides=(96, 200))


def _cfg(shards: str, *extra: str):
    return load_config(None, [f"data.sources=[{{shards: '{shards}'}}]", TINY, "data.context_length=32",
                              "data.batch_size=6", "data.workers=2", "data.shuffle_buffer=10", "data.seed=3",
                              *extra])


def _take(loader, n: int) -> list[Batch]:
    return list(islice(iter(loader), n))


def _on_device(batch: Batch) -> torch.Tensor:
    """The uint8 images the training device sees (decoded there when the batch carries JPEGs)."""
    images = batch.images.clone()
    moved = to_device(Batch(keys=batch.keys, images=images, text=batch.text, jpegs=batch.jpegs), "cpu", None,
                      MEAN, STD)
    assert moved.jpegs is None  # consumed by the move
    return images


def test_device_decode_matches_the_worker_decode(photo_shards: str):
    off = _take(build_loader(_cfg(photo_shards), 0, 1), 4)
    on = _take(build_loader(_cfg(photo_shards, "data.decode_on_device=true"), 0, 1), 4)
    assert [b.keys for b in on] == [b.keys for b in off]
    assert all(b.jpegs is None for b in off)
    for a, b in zip(on, off):
        assert all(j is not None for j in a.jpegs) and len(a.jpegs) == a.size
        assert not a.images.any()  # the workers decoded nothing: the slots wait for the device
        got = _on_device(a)
        assert got.shape == b.images.shape == (6, 3, SIZE, SIZE) and got.dtype == torch.uint8
        diff = (got.float() - b.images.float()).abs()
        assert diff.mean() < MEAN_TOL and diff.max() <= MAX_TOL, (float(diff.mean()), float(diff.max()))
        assert torch.equal(a.region_masks, b.region_masks)  # the sample rng is where the CPU path leaves it
    # the shipped crop is the worker path's crop: PIL's resized crop of it gives the worker's pixels exactly
    for k, (data, crop) in enumerate(on[0].jpegs):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        cpu = pixels_into(TF.resized_crop(img, *crop, [SIZE, SIZE], InterpolationMode.BICUBIC, antialias=True))
        assert torch.equal(cpu, off[0].images[k])


def test_exact_resume_with_decode_on_device(photo_shards: str):
    cfg = _cfg(photo_shards, "data.decode_on_device=true", "data.workers=3")
    N = 5
    straight = _take(build_loader(cfg, 0, 1), N)
    first = build_loader(cfg, 0, 1)
    head = _take(first, N // 2)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = head + _take(build_loader(cfg, 0, 1, state=state), N - N // 2)
    assert [b.keys for b in resumed] == [b.keys for b in straight]
    for a, b in zip(resumed, straight):
        assert [j[1] for j in a.jpegs] == [j[1] for j in b.jpegs]  # the same crop windows
        assert torch.equal(_on_device(a), _on_device(b)) and torch.equal(a.region_masks, b.region_masks)


def test_non_jpeg_samples_are_decoded_in_the_worker(synthetic_root: Path):
    shards = f"{synthetic_root}/train/{{00000..00002}}.tar"  # PNG images
    off = _take(build_loader(_cfg(shards), 0, 1), 3)
    on = _take(build_loader(_cfg(shards, "data.decode_on_device=true"), 0, 1), 3)
    for a, b in zip(on, off):
        assert a.keys == b.keys and a.jpegs == [None] * a.size
        assert torch.equal(a.images, b.images) and torch.equal(_on_device(a), b.images)


def test_mixed_batch_decodes_only_the_pending_slots(photo_shards: str):
    on = _take(build_loader(_cfg(photo_shards, "data.decode_on_device=true", "data.workers=0"), 0, 1), 1)[0]
    keep = torch.randint(0, 256, on.images[1].shape, dtype=torch.uint8)
    on.images[1] = keep
    want = _on_device(on)
    on.jpegs[1] = None  # as a PNG sample's slot: its pixels are already there
    got = _on_device(on)
    assert torch.equal(got[1], keep) and torch.equal(got[[0, 2, 3, 4, 5]], want[[0, 2, 3, 4, 5]])


def test_damaged_jpeg_stops_the_run_naming_the_keys(photo_shards: str):
    on = _take(build_loader(_cfg(photo_shards, "data.decode_on_device=true", "data.workers=0"), 0, 1), 1)[0]
    data, crop = on.jpegs[2]
    on.jpegs[2] = (data[:200] + bytes(range(256)) * 4, crop)
    with pytest.raises(UserError, match=rf"data.decode_on_device: a JPEG among samples .*{on.keys[2]}") as e:
        _on_device(on)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra, key", [
    (("aug.color_jitter_prob=0.8", "aug.color_jitter=[0.4, 0.4, 0.4, 0.1]"), "aug.color_jitter_prob"),
    (("aug.gray_scale_prob=0.2",), "aug.gray_scale_prob"),
    (("data.jpeg_draft=true",), "data.jpeg_draft"),
])
def test_unsupported_combinations_are_refused_at_load(photo_shards: str, extra: tuple[str, ...], key: str):
    with pytest.raises(ConfigError, match=rf"data.decode_on_device=true cannot run .*{key}") as e:
        _cfg(photo_shards, "data.decode_on_device=true", *extra)
    assert "\n" not in str(e.value)
    _cfg(photo_shards, *extra)  # each is fine without the option
