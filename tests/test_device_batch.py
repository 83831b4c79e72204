"""uint8 images from the loader, normalised on the device: the same pixels as the fp32 CPU path."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from powerclip.config import load_config
from powerclip.data import build_loader
from powerclip.data.batch import Batch
from powerclip.data.device import normalize_images, to_device
from powerclip.data.geometry import model_geometry
from powerclip.data.transforms import apply_transform

TINY = ("model.config={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1}, "
        "text_cfg: {context_length: 32, width: 32, heads: 2, layers: 1}}")
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _cfg(root: Path, *extra: str):
    return load_config(None, [f"data.sources=[{{shards: '{root}/val/00000.tar'}}]", TINY,
                              "data.context_length=32", "data.batch_size=8", "data.shuffle_buffer=16", *extra])


def _stored_images(shard: Path) -> dict[str, Image.Image]:
    out = {}
    with tarfile.open(shard) as tf:
        for m in tf:
            if m.name.endswith(".png"):
                out[m.name.rsplit(".", 1)[0]] = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_ships_uint8_and_device_normalises_like_open_clip(synthetic_root: Path, workers: int):
    """Eval pass (deterministic transform): every image, uint8 across the worker boundary, normalised
    by ``to_device``, equals open_clip's stock fp32 transform of the stored image."""
    from open_clip import image_transform

    cfg = _cfg(synthetic_root, f"data.workers={workers}")
    geo = model_geometry(cfg)
    stock = image_transform(geo.image_size, is_train=False, mean=geo.mean, std=geo.std)
    stored = _stored_images(synthetic_root / "val" / "00000.tar")
    n = 0
    for b in build_loader(cfg, 0, 1, train=False):
        assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (3, 32, 32)
        dev = to_device(b, "cpu", None, geo.mean, geo.std)
        assert dev.images.dtype == torch.float32
        want = torch.stack([stock(stored[k]) for k in b.keys])
        torch.testing.assert_close(dev.images, want, atol=1e-5, rtol=0)
        n += b.size
    assert n == 64


def test_train_transform_uint8_path_matches_fp32_path():
    """The augmented (random crop) path: uint8 + device normalisation == the fused fp32 CPU path,
    crop drawn from the same rng; bf16 is the fp32 result rounded once."""
    from open_clip import image_transform

    t = image_transform(48, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": (0.5, 1.0)})
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray(torch.randint(0, 256, (61, 77, 3), generator=g, dtype=torch.uint8).numpy())
    ref, win_ref = apply_transform(t, img, rng=random.Random(3))
    raw, win = apply_transform(t, img, rng=random.Random(3), uint8=True)
    assert raw.dtype == torch.uint8 and win == win_ref
    out = normalize_images(raw[None], MEAN, STD)
    torch.testing.assert_close(out[0], ref, atol=1e-6, rtol=0)
    assert torch.equal(normalize_images(raw[None], MEAN, STD, torch.bfloat16), out.to(torch.bfloat16))
    with pytest.raises(TypeError, match="uint8"):
        normalize_images(out, MEAN, STD)


def test_float_batches_pass_through_unchanged():
    """Hand-made batches with float images (tests, custom loaders) are only moved and cast."""
    x = torch.randn(2, 3, 4, 4)
    b = to_device(Batch(keys=["a", "b"], images=x, text=torch.zeros(2, 3, dtype=torch.long)), "cpu",
                  torch.bfloat16, MEAN, STD)
    assert torch.equal(b.images, x.to(torch.bfloat16)) and b.text.dtype == torch.long


def test_non_rgb_or_extra_tensor_step_is_an_error():
    from torchvision import transforms as T

    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="nothing after it but Normalize"):
        apply_transform(T.Compose([T.ToTensor(), T.Normalize(MEAN, STD), T.RandomErasing()]), img, uint8=True)
    with pytest.raises(ValueError, match="RGB"):
        apply_transform(T.Compose([T.ToTensor()]), img.convert("L"), uint8=True)
