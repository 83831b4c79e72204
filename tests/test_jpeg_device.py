"""Batched JPEG decode on a device (data.jpeg_device.decode_crops) against the CPU path it replaces:
PIL decode + open_clip's bicubic antialiased resized crop. Same shapes, pixels within rounding."""

from __future__ import annotations

import io
import random

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from powerclip.data.decode import decode_image
from powerclip.data.jpeg_device import decode_crops
from powerclip.data.transforms import crop_params, pixels_into
from tools.bench_shards import photo


def _batch(n: int, seed: int = 0):
    """n photo-like JPEGs with a RandomResizedCrop window each, and the CPU path's pixels for them."""
    rng = random.Random(seed)
    jpegs, crops, want = [], [], []
    for _ in range(n):
        buf = io.BytesIO()
        photo(rng, (400, 1024)).save(buf, format="JPEG", quality=90)
        img = decode_image(buf.getvalue(), "x")
        crop = crop_params(rng, img.size[0], img.size[1], (0.5, 1.0), (3 / 4, 4 / 3))
        jpegs.append(buf.getvalue())
        crops.append(crop)
        want.append(pixels_into(TF.resized_crop(img, *crop, [224, 224], InterpolationMode.BICUBIC, antialias=True)))
    return jpegs, crops, torch.stack(want)


def test_cpu_fallback_matches_the_pil_path():
    jpegs, crops, want = _batch(4)
    got = decode_crops(jpegs, crops, 224, "cpu")
    assert got.shape == want.shape == (4, 3, 224, 224) and got.dtype == torch.uint8
    diff = (got.float() - want.float()).abs()
    assert diff.mean() < 1.0 and diff.max() <= 8  # IDCT and fixed-point bicubic rounding only


def test_bad_input_names_the_problem():
    jpegs, crops, _ = _batch(1)
    with pytest.raises(ValueError, match="1 images but 2 crop windows"):
        decode_crops(jpegs, crops * 2, 224)
    with pytest.raises(ValueError, match="crop .* of image 0 lies outside"):
        decode_crops(jpegs, [(0, 0, 5000, 10)], 224)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_decode_matches_the_cpu_fallback():
    jpegs, crops, want = _batch(8, seed=1)
    got = decode_crops(jpegs, crops, 224, "cuda").cpu()
    cpu = decode_crops(jpegs, crops, 224, "cpu")
    assert got.shape == cpu.shape == want.shape
    assert (got.float() - cpu.float()).abs().mean() < 1.0
    assert (got.float() - want.float()).abs().mean() < 1.0
