"""The ``aug`` section against open_clip's own train transform: grayscale and colour jitter give the
pixels (or the distribution) open_clip's ``image_transform(..., is_train=True, aug_cfg=...)`` gives,
the crop respects scale and ratio, mean/std reach the device normalisation and the export's
preprocess_cfg, everything is a function of (seed, sample) so exact resume holds, and what cannot
run identically is refused at config load in one line naming the key."""

from __future__ import annotations

import json
import random
import statistics
from itertools import islice
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, Normalize, Resize

from powerclip.config import ConfigError, aug_cfg_dict, aug_preprocess, load_config
from powerclip.data import build_loader
from powerclip.data.device import normalize_images
from powerclip.data.geometry import model_geometry
from powerclip.data.samples import SampleProcessor
from powerclip.data.transforms import apply_transform
from powerclip.eval.periodic import eval_transform
from powerclip.export import export_open_clip, run_preprocess_cfg
from powerclip.model import create_model, model_cfg_dict
from tests.test_data_resume import TINY, cfg_for
from tests.tiny import tiny_config

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _cfg(*extra: str):
    return load_config(None, [TINY, "data.context_length=32", *extra])


def _image(w: int = 48, h: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _ours(cfg, img: Image.Image, seed: int) -> tuple[torch.Tensor, tuple]:
    """The loader's path: the worker's uint8 crop from the sample's rng, normalised as on the device."""
    proc = SampleProcessor(cfg, train=True)
    assert proc.rng_only  # every random choice comes from the sample's seed
    pixels, window = apply_transform(proc.transform, img, rng=random.Random(seed), uint8=True)
    return normalize_images(pixels[None], proc.geo.mean, proc.geo.std)[0], window


def _open_clip(cfg, img: Image.Image, seed: int) -> torch.Tensor:
    geo = model_geometry(cfg)
    t = open_clip.image_transform(geo.image_size, is_train=True, mean=geo.mean, std=geo.std, aug_cfg=aug_cfg_dict(cfg))
    torch.manual_seed(seed)
    random.seed(seed)
    return t(img)


def test_grayscale_at_prob_one_equals_open_clip_and_has_equal_channels():
    # scale [1, 1] on a square image: the crop is the whole image, so the pixels are comparable
    cfg = _cfg("aug.scale=[1.0, 1.0]", "aug.gray_scale_prob=1.0", f"aug.mean={MEAN}", f"aug.std={STD}")
    img = _image()
    ours, _ = _ours(cfg, img, 3)
    theirs = _open_clip(cfg, img, 3)
    assert (ours - theirs).abs().max() < 1e-5
    raw = ours * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert (raw[0] - raw[1]).abs().max() < 1e-5 and (raw[1] - raw[2]).abs().max() < 1e-5
    plain, _ = _ours(_cfg("aug.scale=[1.0, 1.0]", f"aug.mean={MEAN}", f"aug.std={STD}"), img, 3)
    assert (plain - ours).abs().max() > 0.1  # the colour image is not gray


def test_jitter_and_grayscale_at_prob_zero_change_nothing():
    img = _image(64, 40)
    base = _cfg("aug.scale=[0.5, 1.0]")
    off = _cfg("aug.scale=[0.5, 1.0]", "aug.color_jitter=[0.4, 0.4, 0.4, 0.1]", "aug.color_jitter_prob=0.0",
               "aug.gray_scale_prob=0.0")
    for seed in range(5):
        a, wa = _ours(base, img, seed)
        b, wb = _ours(off, img, seed)
        assert torch.equal(a, b) and wa == wb
    on = _cfg("aug.scale=[0.5, 1.0]", "aug.color_jitter=[0.4, 0.4, 0.4, 0.1]", "aug.color_jitter_prob=1.0")
    assert not torch.equal(_ours(base, img, 0)[0], _ours(on, img, 0)[0])


def test_color_jitter_distribution_matches_open_clip():
    """Per-image channel means over many seeds: same mean and spread as open_clip's own transform
    (200 draws each; the tolerances are several standard errors)."""
    cfg = _cfg("aug.scale=[1.0, 1.0]", "aug.color_jitter=[0.4, 0.4, 0.4, 0.1]", "aug.color_jitter_prob=0.8")
    img = _image(32, 32, seed=1)
    ours = [_ours(cfg, img, s)[0].mean().item() for s in range(200)]
    theirs = [_open_clip(cfg, img, s).mean().item() for s in range(200)]
    untouched = _open_clip(_cfg("aug.scale=[1.0, 1.0]"), img, 0).mean().item()
    spread = statistics.pstdev(theirs)
    assert spread > 0.05  # the jitter moves the image
    assert abs(statistics.fmean(ours) - statistics.fmean(theirs)) < 0.4 * spread
    assert 0.75 < statistics.pstdev(ours) / spread < 1.33
    # p = 0.8: about a fifth of the draws leave the image as it was, in both
    same_ours = sum(abs(m - untouched) < 1e-5 for m in ours) / len(ours)
    same_theirs = sum(abs(m - untouched) < 1e-5 for m in theirs) / len(theirs)
    assert abs(same_ours - 0.2) < 0.1 and abs(same_theirs - 0.2) < 0.1


def test_crop_respects_scale_and_ratio_bounds():
    cfg = _cfg("aug.scale=[0.25, 0.5]")
    W, H = 120, 80
    img = _image(W, H)
    areas, aspects = [], []
    for seed in range(200):
        _, (x0, y0, x1, y1) = _ours(cfg, img, seed)
        areas.append((x1 - x0) * (y1 - y0))
        aspects.append((x1 - x0) * W / ((y1 - y0) * H))
    slack = 0.03  # the window's sides are whole pixels
    assert 0.25 - slack <= min(areas) and max(areas) <= 0.5 + slack
    assert min(areas) < 0.3 and max(areas) > 0.45  # the whole range is drawn
    assert 3 / 4 - slack <= min(aspects) and max(aspects) <= 4 / 3 + slack  # open_clip's ratio
    assert min(aspects) < 0.85 and max(aspects) > 1.2


def test_data_augment_scale_is_an_alias_of_aug_scale():
    assert aug_cfg_dict(_cfg("data.augment_scale=[0.3, 0.6]"))["scale"] == (0.3, 0.6)
    assert aug_cfg_dict(_cfg("aug.scale=[0.3, 0.6]"))["scale"] == (0.3, 0.6)
    assert aug_cfg_dict(_cfg())["scale"] == (0.9, 1.0)


def test_eval_transform_follows_interpolation_and_resize_mode():
    geo = model_geometry(_cfg("aug.interpolation=bilinear", "aug.resize_mode=longest"))
    assert (geo.interpolation, geo.resize_mode) == ("bilinear", "longest")
    proc = SampleProcessor(_cfg("aug.interpolation=bilinear", "aug.resize_mode=longest"), train=False)
    img = _image(64, 32)
    pixels, window = apply_transform(proc.transform, img, rng=random.Random(0), uint8=True)
    # longest side to 32: the 64x32 image becomes 32x16, padded by 8 rows above and below
    assert pixels.shape == (3, 32, 32) and bool((pixels[:, :8] == 0).all())
    assert window == pytest.approx((0.0, -0.5, 1.0, 1.5))  # 8 padded rows = half the 16 image rows
    squash = SampleProcessor(_cfg("aug.resize_mode=squash", "aug.interpolation=bilinear"), train=False)
    resize = [t for t in squash.transform.transforms if isinstance(t, Resize)]
    assert resize and resize[0].interpolation == InterpolationMode.BILINEAR and tuple(resize[0].size) == (32, 32)


def test_exact_resume_with_jitter_and_grayscale(synthetic_root: Path):
    aug = ("aug.color_jitter=[0.4, 0.4, 0.4, 0.1]", "aug.color_jitter_prob=0.8", "aug.gray_scale_prob=0.5",
           "aug.scale=[0.5, 1.0]")
    cfg = cfg_for(synthetic_root, "data.workers=2", *aug)
    N = 7
    straight = list(islice(iter(build_loader(cfg, 0, 1)), N))
    first = build_loader(cfg, 0, 1)
    head = list(islice(iter(first), N // 2))
    state = json.loads(json.dumps(first.state_dict()))
    tail = list(islice(iter(build_loader(cfg, 0, 1, state=state)), N - N // 2))
    assert [b.keys for b in head + tail] == [b.keys for b in straight]
    for a, b in zip(head + tail, straight):
        assert torch.equal(a.images, b.images)
    plain = list(islice(iter(build_loader(cfg_for(synthetic_root, "data.workers=2", "aug.scale=[0.5, 1.0]"), 0, 1)),
                        2))
    assert plain[0].keys == straight[0].keys and not torch.equal(plain[0].images, straight[0].images)
    gray = sum(bool((im[0] == im[1]).all() and (im[1] == im[2]).all()) for b in straight for im in b.images)
    assert 0 < gray < sum(len(b.keys) for b in straight)  # p = 0.5 of the samples are gray


def test_export_preprocess_cfg_makes_open_clip_transforms_match(tmp_path):
    cfg = tiny_config([f"aug.mean={MEAN}", f"aug.std={STD}", "aug.interpolation=bilinear", "aug.resize_mode=squash"])
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    model_cfg = model_cfg_dict(cfg.model)
    out = export_open_clip(model, model_cfg, run_preprocess_cfg(cfg, model_cfg), tmp_path / "export")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    norm = [t for t in preprocess.transforms if isinstance(t, Normalize)]
    assert list(norm[0].mean) == pytest.approx(MEAN) and list(norm[0].std) == pytest.approx(STD)
    resize = [t for t in preprocess.transforms if isinstance(t, Resize)]
    assert resize[0].interpolation == InterpolationMode.BILINEAR and tuple(resize[0].size) == (32, 32)
    geo = model_geometry(cfg)  # the device normalisation of training uses the same values
    assert list(geo.mean) == pytest.approx(MEAN) and list(geo.std) == pytest.approx(STD)
    periodic = eval_transform(model.clip, aug_preprocess(cfg))  # and the periodic evaluation during training
    assert [repr(t) for t in periodic.transforms] == [repr(t) for t in preprocess.transforms]


@pytest.mark.parametrize("override, key", [
    ("aug.use_timm=true", "aug.use_timm"),
    ("aug.ratio=[0.5, 2.0]", "aug.ratio"),
    ("aug.re_prob=0.25", "aug.re_prob"),
    ("aug.re_count=2", "aug.re_count"),
    ("aug.color_jitter=[0.4, 0.4, 0.4, 0.1]", "aug.color_jitter"),
    ("aug.color_jitter_prob=0.8", "aug.color_jitter"),
    ("aug.gray_scale_prob=1.5", "aug.gray_scale_prob"),
    ("aug.scale=[0.5, 1.5]", "aug.scale"),
    ("aug.mean=[0.5, 0.5]", "aug.mean"),
    ("aug.std=[0.5, 0.0, 0.5]", "aug.std"),
    ("aug.interpolation=nearest", "aug.interpolation"),
    ("aug.resize_mode=crop", "aug.resize_mode"),
])
def test_config_errors_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        _cfg(override)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_aug_scale_and_augment_scale_both_set_is_refused():
    with pytest.raises(ConfigError, match="aug.scale and data.augment_scale"):
        _cfg("aug.scale=[0.5, 1.0]", "data.augment_scale=[0.4, 1.0]")
