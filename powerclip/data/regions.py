"""Image transforms that report their geometry, and region boxes on the patch grid (METHODS 2).

Why track geometry: stored boxes (``precomputed`` regions, e.g. SAM or the synthetic objects)
are in the coordinates of the *stored* image; after open_clip's RandomResizedCrop they must be
mapped into the crop or the regions point at the wrong patches. We run open_clip's own transform
pipeline step by step and, for the geometric steps, compute the crop window ourselves with the
step's own ``get_params`` - the same transform, plus the window it used.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import CenterCrop, Normalize, RandomResizedCrop


def apply_transform(transform, img, out: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, tuple[float, float, float, float]]:
    """Apply an open_clip Compose; return (tensor, window) where window = (x0, y0, x1, y1) is the
    part of the original image, in 0..1 coordinates, that the output shows.

    ``out``: where the final Normalize writes (a slot of the batch tensor), which saves both
    open_clip's clone inside Normalize and the copy of stacking the batch afterwards."""
    w0, h0 = img.size
    win = [0.0, 0.0, float(w0), float(h0)]  # in original pixels
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, RandomResizedCrop):
            i, j, h, w = t.get_params(img, t.scale, t.ratio)
            sx, sy = (win[2] - win[0]) / img.size[0], (win[3] - win[1]) / img.size[1]
            win = [win[0] + j * sx, win[1] + i * sy, win[0] + (j + w) * sx, win[1] + (i + h) * sy]
            img = TF.resized_crop(img, i, j, h, w, t.size, t.interpolation, antialias=t.antialias)
        elif isinstance(t, CenterCrop):
            ch, cw = t.size if isinstance(t.size, (tuple, list)) else (t.size, t.size)
            W, H = img.size
            top, left = int(round((H - ch) / 2.0)), int(round((W - cw) / 2.0))
            sx, sy = (win[2] - win[0]) / W, (win[3] - win[1]) / H
            win = [win[0] + left * sx, win[1] + top * sy, win[0] + (left + cw) * sx, win[1] + (top + ch) * sy]
            img = t(img)
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


def map_box(box, window) -> tuple[float, float, float, float] | None:
    """A 0..1 box of the stored image in the 0..1 coordinates of the transformed view (None if outside)."""
    wx0, wy0, wx1, wy1 = window
    sx, sy = wx1 - wx0, wy1 - wy0
    x0, y0 = (box[0] - wx0) / sx, (box[1] - wy0) / sy
    x1, y1 = (box[2] - wx0) / sx, (box[3] - wy0) / sy
    x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def box_to_cells(box, grid: int) -> tuple[int, int, int, int]:
    """0..1 box → grid cells [c0, c1) x [r0, r1), at least one cell."""
    c0 = min(grid - 1, max(0, math.floor(box[0] * grid)))
    r0 = min(grid - 1, max(0, math.floor(box[1] * grid)))
    c1 = max(c0 + 1, min(grid, math.ceil(box[2] * grid)))
    r1 = max(r0 + 1, min(grid, math.ceil(box[3] * grid)))
    return c0, c1, r0, r1


def random_cells(rng: random.Random, grid: int) -> tuple[int, int, int, int]:
    """Random box on the grid: size uniform in 1..grid per side, position uniform where it fits."""
    r = rng.random  # four floats: ~10x cheaper than four randint calls, same distribution
    w, h = 1 + int(r() * grid), 1 + int(r() * grid)
    c0, r0 = int(r() * (grid - w + 1)), int(r() * (grid - h + 1))
    return c0, c0 + w, r0, r0 + h


def region_masks(boxes: list, window, grid: int, m: int, source: str, rng: random.Random) -> torch.Tensor:
    """[M, T] bool, T = grid*grid (row-major, like the ViT patch order). Stored boxes first when
    ``source == 'precomputed'``, then random boxes up to M: every slot is a real, non-empty region."""
    masks = np.zeros((m, grid, grid), dtype=np.bool_)  # numpy slicing is ~10x cheaper than torch's here
    cells = []
    if source == "precomputed":
        for b in boxes:
            mb = map_box(b, window)
            if mb is not None:
                cells.append(box_to_cells(mb, grid))
            if len(cells) == m:
                break
    while len(cells) < m:
        cells.append(random_cells(rng, grid))
    for k, (c0, c1, r0, r1) in enumerate(cells):
        masks[k, r0:r1, c0:c1] = True
    return torch.from_numpy(masks.reshape(m, grid * grid))
