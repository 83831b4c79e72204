"""Image transforms that report their geometry: open_clip's transform, run step by step.

Why track geometry: stored boxes (``precomputed`` regions, e.g. SAM or the synthetic objects)
are in the coordinates of the *stored* image; after open_clip's RandomResizedCrop they must be
mapped into the crop (``regions.map_box``) or the regions point at the wrong patches. We run
open_clip's own transform pipeline step by step and, for the geometric steps, compute the crop
window ourselves - the same transform, plus the window it used.

Two steps are done our way, because the loader pays them on every sample: the RandomResizedCrop
window is drawn from the sample's Python ``random.Random`` (``crop_params``: torchvision's algorithm,
without seeding and restoring torch's global generator per sample), and ToTensor (+ Normalize) is
fused into one or two passes written straight into the batch tensor (``pixels_into``,
``normalized_into``). open_clip's probabilistic colour jitter and grayscale draw their coin and
factors from the same ``random.Random`` (``jitter_with``): open_clip draws the coin from Python's
global ``random``, which no per-sample torch seed would make reproducible.
"""

from __future__ import annotations

import functools
import math
import random
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import CenterCrop, Normalize, RandomResizedCrop, Resize, ToTensor


def _is_convert_mode(t) -> bool:
    """open_clip's MaybeConvertMode, matched by name: importing open_clip here would cost every
    user of this module a second of start-up."""
    return type(t).__name__ == "MaybeConvertMode" and hasattr(t, "mode")


def _is_open_clip_step(t, name: str) -> bool:
    """open_clip's ``color_jitter`` / ``gray_scale`` wrappers (a coin of probability ``p``, then ``transf``),
    matched by name for the reason of ``_is_convert_mode``."""
    return type(t).__name__ == name and hasattr(t, "p") and hasattr(t, "transf")


def jitter_with(rng: random.Random, jitter, img: Image.Image) -> Image.Image:
    """torchvision ``ColorJitter(img)`` with its random order and factors drawn from ``rng``.

    The same distribution as ``ColorJitter.get_params`` (a uniform permutation of the four
    adjustments, each factor uniform in its range) and the same ``adjust_*`` functions."""
    order = [0, 1, 2, 3]
    rng.shuffle(order)
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    factors = [None if r is None else rng.uniform(r[0], r[1]) for r in ranges]
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in order:
        if factors[i] is not None:
            img = adjust[i](img, factors[i])
    return img


def crop_params(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params (i, j, h, w) drawn from a Python ``random.Random``.

    Same algorithm and distribution as torchvision's (10 tries of area x log-uniform aspect,
    then the centre-crop fallback), but four Python floats instead of about ten torch RNG
    calls, and no global torch generator to seed and restore per sample."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@functools.lru_cache(maxsize=8)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 mean, 1 / (255 std)) as [C, 1, 1] tensors, made once per normalisation."""
    shift = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).mul_(255.0)
    inv = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).mul_(255.0).reciprocal_()
    return shift, inv


def normalized_into(img: Image.Image, mean, std, out: torch.Tensor | None = None) -> torch.Tensor:
    """ToTensor + Normalize of an RGB PIL image in two passes, written into ``out`` if given.

    (x / 255 - mean) / std is computed as (x - 255 mean) * 1 / (255 std) straight from the uint8
    pixels: torchvision's ToTensor makes a contiguous copy, a float copy and a divided copy, and
    Normalize a clone, before the two arithmetic passes. Equal to them within 1e-6."""
    with warnings.catch_warnings():  # PIL's array is read-only; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
    shift, inv = _affine(tuple(mean), tuple(std))
    if out is None or out.shape != pixels.shape:
        out = torch.empty(pixels.shape, dtype=torch.float32)
    out.copy_(pixels)
    return out.sub_(shift).mul_(inv)


def pixels_into(img: Image.Image, out: torch.Tensor | None = None) -> torch.Tensor:
    """The uint8 [3, H, W] pixels of an RGB PIL image (ToTensor without the float conversion),
    written into ``out`` if given: the loader ships these and the device normalises them."""
    with warnings.catch_warnings():  # PIL's array is read-only; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
    if out is None or out.shape != pixels.shape or out.dtype != torch.uint8:
        return pixels.contiguous()
    return out.copy_(pixels)


def apply_transform(transform, img, out: torch.Tensor | None = None, rng: random.Random | None = None,
                    uint8: bool = False) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """Apply an open_clip Compose; return (tensor, window) where window = (x0, y0, x1, y1) is the
    part of the original image, in 0..1 coordinates, that the output shows.

    ``out``: where the final Normalize writes (a slot of the batch tensor), which saves both
    open_clip's clone inside Normalize and the copy of stacking the batch afterwards.
    ``rng``: draws the RandomResizedCrop window (``crop_params``); without it the crop uses
    torch's global generator exactly as open_clip's transform does.
    ``uint8``: stop at ToTensor and return the uint8 pixels; ToTensor's division and the Normalize
    are then ``normalize_images``' job on the device (any other step after ToTensor is an error)."""
    w0, h0 = img.size
    win = [0.0, 0.0, float(w0), float(h0)]  # in original pixels
    steps = list(getattr(transform, "transforms", [transform]))
    k = 0
    while k < len(steps):
        t = steps[k]
        k += 1
        if isinstance(t, RandomResizedCrop):
            if rng is not None:
                i, j, h, w = crop_params(rng, img.size[0], img.size[1], t.scale, t.ratio)
            else:
                i, j, h, w = t.get_params(img, t.scale, t.ratio)
            sx, sy = (win[2] - win[0]) / img.size[0], (win[3] - win[1]) / img.size[1]
            win = [win[0] + j * sx, win[1] + i * sy, win[0] + (j + w) * sx, win[1] + (i + h) * sy]
            img = TF.resized_crop(img, i, j, h, w, t.size, t.interpolation, antialias=t.antialias)
        elif isinstance(t, CenterCrop) or (type(t).__name__ == "CenterCropOrPad" and isinstance(img, Image.Image)):
            ch, cw = t.size if isinstance(t.size, (tuple, list)) else (t.size, t.size)
            W, H = img.size
            # a side shorter than the crop is padded (CenterCropOrPad): its offset is minus the left pad
            top = -((ch - H) // 2) if H < ch else int(round((H - ch) / 2.0))
            left = -((cw - W) // 2) if W < cw else int(round((W - cw) / 2.0))
            sx, sy = (win[2] - win[0]) / W, (win[3] - win[1]) / H
            win = [win[0] + left * sx, win[1] + top * sy, win[0] + (left + cw) * sx, win[1] + (top + ch) * sy]
            img = t(img)
        elif _is_convert_mode(t) and isinstance(img, Image.Image) and img.mode == t.mode:
            continue  # PIL's convert to the same mode is a full copy
        elif rng is not None and _is_open_clip_step(t, "color_jitter"):
            if rng.random() < t.p:
                img = jitter_with(rng, t.transf, img)
        elif rng is not None and _is_open_clip_step(t, "gray_scale"):
            if rng.random() < t.p:
                img = t.transf(img)
        elif uint8 and isinstance(t, ToTensor):
            rest = steps[k:]
            if not (isinstance(img, Image.Image) and img.mode == "RGB") or len(rest) > 1 or (
                    rest and not isinstance(rest[0], Normalize)):
                raise ValueError("uint8 images need an RGB image at ToTensor and nothing after it but "
                                 f"Normalize; the transform is {transform}")
            img = pixels_into(img, out)
            k = len(steps)  # the Normalize runs on the device
        elif (isinstance(t, ToTensor) and k < len(steps) and isinstance(steps[k], Normalize)
              and isinstance(img, Image.Image) and img.mode == "RGB"):
            img = normalized_into(img, steps[k].mean, steps[k].std, out)
            k += 1  # the Normalize is done
        elif isinstance(t, Normalize) and isinstance(img, torch.Tensor) and img.is_floating_point():
            mean = torch.as_tensor(t.mean, dtype=img.dtype).view(-1, 1, 1)
            std = torch.as_tensor(t.std, dtype=img.dtype).view(-1, 1, 1)
            if out is not None and out.shape == img.shape:
                img = torch.sub(img, mean, out=out).div_(std)
            else:  # the tensor is fresh from ToTensor: in place is safe
                img = img.sub_(mean).div_(std)
        else:  # Resize scales the image, not the window; the rest are not geometric
            img = t(img)
    return img, (win[0] / w0, win[1] / h0, win[2] / w0, win[3] / h0)


def draft_size(transform) -> int | None:
    """The smallest shorter side (pixels) an input image may be reduced to before ``transform`` without
    its first resizing step ever upsampling, or None when the transform's geometry is not known here.

    RandomResizedCrop(size, scale, ratio) cuts a w x h window with w h = s W H and w / h = a, so with
    the shorter side S <= sqrt(W H): w >= S sqrt(s a) and h >= S sqrt(s / a). Both stay >= size for
    every s >= scale[0] and a in ratio when S >= size / sqrt(scale[0] min(ratio[0], 1 / ratio[1])).
    Resize(size) scales the shorter side to size (a pair: each side to its own), so S >= size."""
    for t in getattr(transform, "transforms", [transform]):
        if _is_convert_mode(t):
            continue
        if isinstance(t, RandomResizedCrop):
            out = max(t.size) if isinstance(t.size, (tuple, list)) else t.size
            least = t.scale[0] * min(t.ratio[0], 1.0 / t.ratio[1])
            if least <= 0:
                return None
            return math.ceil(out / math.sqrt(least)) + 1  # + 1: rounding of the window's integer sides
        if isinstance(t, Resize) and t.max_size is None:
            return max(t.size) if isinstance(t.size, (tuple, list)) else int(t.size)
        return None  # any other first step: geometry unknown, decode in full
    return None


def is_seeded_by_rng(transform) -> bool:
    """True when ``apply_transform(..., rng=)`` draws every random choice of ``transform`` from
    ``rng`` (its random steps: RandomResizedCrop, open_clip's colour jitter and grayscale), so torch's
    generator need not be seeded. open_clip's ResizeKeepRatio and CenterCropOrPad (resize mode
    ``longest``) draw nothing as its evaluation transform builds them."""
    steps = getattr(transform, "transforms", [transform])
    return all(isinstance(t, (RandomResizedCrop, CenterCrop, Resize, ToTensor, Normalize)) or _is_convert_mode(t)
               or _is_open_clip_step(t, "color_jitter") or _is_open_clip_step(t, "gray_scale")
               or (type(t).__name__ == "ResizeKeepRatio" and not t.random_scale_prob and not t.random_aspect_prob)
               or type(t).__name__ == "CenterCropOrPad" for t in steps)


def is_crop_only(transform) -> bool:
    """True when ``transform`` is a RandomResizedCrop followed only by steps that need no pixels of
    their own (open_clip's mode conversion to RGB, ToTensor, Normalize): its output is then fixed by
    the crop window alone, which ``crop_window`` draws without the image being decoded."""
    steps = list(getattr(transform, "transforms", [transform]))
    return bool(steps) and isinstance(steps[0], RandomResizedCrop) and all(
        _is_convert_mode(t) or isinstance(t, (ToTensor, Normalize)) for t in steps[1:])


def crop_window(transform, width: int, height: int, rng: random.Random
                ) -> tuple[tuple[int, int, int, int], tuple[float, float, float, float]]:
    """((top, left, h, w) in pixels, window in 0..1 as ``apply_transform`` returns it) of a crop-only
    ``transform`` (``is_crop_only``) on a ``width`` x ``height`` image: the same draws from ``rng`` as
    ``apply_transform(transform, img, rng=rng)``, so the crop and every later draw are the same."""
    t = list(getattr(transform, "transforms", [transform]))[0]
    i, j, h, w = crop_params(rng, width, height, t.scale, t.ratio)
    return (i, j, h, w), (j / width, i / height, (j + w) / width, (i + h) / height)
