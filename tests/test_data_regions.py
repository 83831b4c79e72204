"""Regions: open_clip's transform run step by step reports the crop window, stored boxes follow
the crop onto the patch grid, random boxes are never empty."""

from __future__ import annotations

import random

import pytest
import torch
from open_clip import image_transform
from PIL import Image, ImageDraw

from powerclip.data.regions import box_to_cells, map_box, random_cells, region_masks
from powerclip.data.transforms import apply_transform


def _scene() -> tuple[Image.Image, list[float]]:
    img = Image.new("RGB", (120, 90), (0, 0, 0))
    box = [0.4, 0.3, 0.7, 0.8]
    ImageDraw.Draw(img).rectangle([box[0] * 120, box[1] * 90, box[2] * 120 - 1, box[3] * 90 - 1],
                                  fill=(255, 255, 255))
    return img, box


def test_same_pixels_as_open_clip_transform():
    img, _ = _scene()
    for train in (True, False):
        t = image_transform(64, is_train=train, aug_cfg={"scale": (0.3, 0.6)} if train else None)
        torch.manual_seed(3)
        ref = t(img)
        torch.manual_seed(3)
        out, _ = apply_transform(t, img, torch.empty(3, 64, 64))
        assert torch.allclose(out, ref, atol=1e-6)


def test_window_maps_stored_box_into_the_crop():
    img, box = _scene()
    t = image_transform(64, is_train=True, aug_cfg={"scale": (0.3, 0.6)})
    for seed in range(20):
        torch.manual_seed(seed)
        out, window = apply_transform(t, img)
        mb = map_box(box, window)
        bright = out.mean(0) > 0  # normalised white > 0 > normalised black
        if mb is None:
            assert bright.float().mean() < 0.02
            continue
        x0, y0, x1, y1 = (round(v * 64) for v in mb)
        inside = bright[y0 + 2:y1 - 2, x0 + 2:x1 - 2]
        assert inside.float().mean() > 0.98, (seed, mb)
        outside = bright.clone()
        outside[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
        assert outside.float().mean() < 0.02, (seed, mb)
    # eval transform of a non-square image: resize shortest side, centre crop
    te = image_transform(64, is_train=False)
    _, window = apply_transform(te, img)
    assert window == pytest.approx((0.125, 0.0, 0.875, 1.0), abs=0.01)  # 120x90 → 85x64 → crop 10..74


def test_region_masks_precomputed_then_random():
    rng = random.Random(0)
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.9, 1.0]]
    m = region_masks(boxes, (0.0, 0.0, 1.0, 1.0), 4, 6, "precomputed", rng)
    assert m.shape == (6, 16) and m.any(1).all()
    grid = m.view(6, 4, 4)
    assert grid[0, :2, :2].all() and grid[0].sum() == 4
    c0, c1, r0, r1 = box_to_cells(boxes[1], 4)
    assert (c0, c1, r0, r1) == (2, 4, 2, 4) and grid[1].sum() == 4
    rnd = region_masks(boxes, (0.0, 0.0, 1.0, 1.0), 4, 6, "random", random.Random(0))
    assert not torch.equal(rnd[:2], m[:2])  # random source ignores stored boxes
    sizes = set()
    for _ in range(2000):
        c0, c1, r0, r1 = random_cells(rng, 4)
        assert 0 <= c0 < c1 <= 4 and 0 <= r0 < r1 <= 4
        sizes.add((c1 - c0, r1 - r0))
    assert sizes == {(w, h) for w in range(1, 5) for h in range(1, 5)}


def test_fused_normalisation_equals_torchvision():
    """ToTensor + Normalize fused into two passes from the uint8 pixels (transforms.normalized_into)."""
    import numpy as np
    import torchvision.transforms.functional as TF

    from powerclip.data.transforms import normalized_into

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    ref = TF.normalize(TF.to_tensor(img), mean, std)
    out = torch.full((3, 37, 53), float("nan"))
    got = normalized_into(img, mean, std, out)
    assert got.data_ptr() == out.data_ptr() and torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert torch.allclose(normalized_into(img, mean, std), ref, atol=1e-5, rtol=0)


def test_crop_params_follow_torchvision_distribution():
    """Python-RNG crop parameters: valid windows with the same area / aspect distribution as
    torchvision's RandomResizedCrop.get_params, deterministic in the seed."""
    import math

    from torchvision.transforms import RandomResizedCrop

    from powerclip.data.transforms import crop_params

    W, H, scale, ratio = 120, 90, (0.3, 0.9), (3 / 4, 4 / 3)
    ours = [crop_params(random.Random(s), W, H, scale, ratio) for s in range(3000)]
    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(Image.new("RGB", (W, H)), list(scale), list(ratio)) for _ in range(3000)]
    for i, j, h, w in ours:
        assert 0 <= i <= H - h and 0 <= j <= W - w and h > 0 and w > 0
    assert crop_params(random.Random(7), W, H, scale, ratio) == crop_params(random.Random(7), W, H, scale, ratio)

    def stats(params):
        area = torch.tensor([h * w / (W * H) for _, _, h, w in params])
        aspect = torch.tensor([math.log(w / h) for _, _, h, w in params])
        centre = torch.tensor([(j + w / 2) / W for _, j, _, w in params])
        return area.mean(), area.std(), aspect.mean(), aspect.std(), centre.mean()

    for a, b in zip(stats(ours), stats(ref)):
        assert abs(float(a) - float(b)) < 0.02, (stats(ours), stats(ref))
    # the centre-crop fallback of an extreme aspect ratio, as torchvision computes it
    assert crop_params(random.Random(0), 400, 10, (0.99, 1.0), ratio) == \
           RandomResizedCrop.get_params(Image.new("RGB", (400, 10)), [0.99, 1.0], list(ratio))
