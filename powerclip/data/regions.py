"""Image transforms that report their geometry, and region boxes on the patch grid (METHODS 2).

Why track geometry: stored boxes (``precomputed`` regions, e.g. SAM or the synthetic objects)
are in the coordinates of the *stored* image; after open_clip's RandomResizedCrop they must be
mapped into the crop or the regions point at the wrong patches. We run open_clip's own transform
pipeline step by step and, for the geometric steps, compute the crop window ourselves - the same
transform, plus the window it used.

Two steps are done our way, because the loader pays them on every sample: the RandomResizedCrop
window is drawn from the sample's Python ``random.Random`` (``crop_params``: torchvision's algorithm,
without seeding and restoring torch's global generator per sample), and ToTensor + Normalize are
fused into two passes written straight into the batch tensor (``normalized_into``). Together the
image path costs about 0.8x open_clip's stock transform per sample (tools/bench_loader.py).
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


def crop_params(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params (i, j, h, w) drawn from a Python ``random.Random``.

    Same algorithm and distribution as torchvision's (10 tries of area x log-uniform aspect,
    then the centre-crop fallback), but four Python floats instead of about ten torch RNG
    calls: ~0.15 ms less per sample, and no global torch generator to seed and restore."""
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
        elif isinstance(t, CenterCrop):
            ch, cw = t.size if isinstance(t.size, (tuple, list)) else (t.size, t.size)
            W, H = img.size
            top, left = int(round((H - ch) / 2.0)), int(round((W - cw) / 2.0))
            sx, sy = (win[2] - win[0]) / W, (win[3] - win[1]) / H
            win = [win[0] + left * sx, win[1] + top * sy, win[0] + (left + cw) * sx, win[1] + (top + ch) * sy]
            img = t(img)
        elif _is_convert_mode(t) and isinstance(img, Image.Image) and img.mode == t.mode:
            continue  # PIL's convert to the same mode is a full copy
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


def is_seeded_by_rng(transform) -> bool:
    """True when ``apply_transform(..., rng=)`` draws every random choice of ``transform`` from
    ``rng`` (its only random step is RandomResizedCrop), so torch's generator need not be seeded."""
    steps = getattr(transform, "transforms", [transform])
    return all(isinstance(t, (RandomResizedCrop, CenterCrop, Resize, ToTensor, Normalize)) or _is_convert_mode(t)
               for t in steps)


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


def region_cells(boxes: list, window, grid: int, m: int, source: str, rng: random.Random
                 ) -> list[tuple[int, int, int, int]]:
    """M regions as grid cells (c0, c1, r0, r1): stored boxes first when ``source == 'precomputed'``,
    then random boxes up to M, so every slot is a real, non-empty region."""
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
    return cells


def cells_to_masks(cells: list[list[tuple[int, int, int, int]]], grid: int) -> torch.Tensor:
    """[B, M, T] bool masks (T = grid*grid, row-major like the ViT patch order) of B samples' cells,
    built in one broadcast per batch rather than M slice writes per sample."""
    c = np.asarray(cells, dtype=np.int64).reshape(len(cells), -1, 4)  # [B, M, (c0, c1, r0, r1)]
    ar = np.arange(grid)
    cols = (ar >= c[..., 0:1]) & (ar < c[..., 1:2])  # [B, M, grid]
    rows = (ar >= c[..., 2:3]) & (ar < c[..., 3:4])
    masks = rows[..., :, None] & cols[..., None, :]  # [B, M, grid (rows), grid (cols)]
    return torch.from_numpy(masks.reshape(len(cells), c.shape[1], grid * grid))


def region_masks(boxes: list, window, grid: int, m: int, source: str, rng: random.Random) -> torch.Tensor:
    """[M, T] bool masks of one sample's regions (``region_cells`` drawn on the grid)."""
    return cells_to_masks([region_cells(boxes, window, grid, m, source, rng)], grid)[0]


# ---------------------------------------------------------------- regions as sets of patch cells
class PatchRegionError(ValueError):
    """A sample's patch-index regions cannot be read (wrong dtype, shape or lengths)."""


def read_patch_sets(lens_npy: bytes, cat_npy: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The CSR pair of ``{key}.samlens.npy`` (patch indices per region) and ``{key}.samcat.npy``
    (every region's patch indices, concatenated) as two int64 arrays, checked for consistency.

    Why CSR: regions have different sizes; two flat arrays are what SAM annotators store and
    avoid pickled object arrays (``allow_pickle`` stays off: a shard is untrusted input)."""
    import io

    try:
        lens = np.load(io.BytesIO(lens_npy), allow_pickle=False)
        cat = np.load(io.BytesIO(cat_npy), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PatchRegionError(f"unreadable .npy: {e}") from None
    if lens.ndim != 1 or cat.ndim != 1 or lens.dtype.kind not in "iu" or (cat.size and cat.dtype.kind not in "iu"):
        raise PatchRegionError(f"samlens {lens.dtype}{list(lens.shape)} / samcat {cat.dtype}{list(cat.shape)}: "
                               "expected two 1-D integer arrays")
    lens, cat = lens.astype(np.int64), cat.astype(np.int64)
    if (lens < 0).any() or int(lens.sum()) != cat.size:
        raise PatchRegionError(f"samlens sums to {int(lens.sum())} but samcat holds {cat.size} indices")
    if (cat < 0).any():
        raise PatchRegionError("negative patch index in samcat")
    return lens, cat


def patch_sets_in_view(lens: np.ndarray, cat: np.ndarray, src_grid: int, window, grid: int) -> np.ndarray:
    """Regions given as patch indices on the stored image's ``src_grid`` x ``src_grid`` grid (row
    major), mapped onto the model's ``grid`` for the view ``window`` (``apply_transform``'s crop):
    [R, grid*grid] bool, a region that left the view being an all-False row.

    A model cell belongs to a region when its area in the stored image overlaps one of the
    region's cells: the rule ``box_to_cells`` applies to boxes, so a rectangular set of cells and
    the equivalent box give the same mask. Overlap is counted with a summed-area table of every
    region at once (one broadcast per sample, no loop over cells)."""
    R, g = lens.size, src_grid
    src = np.zeros((R, g * g), dtype=np.int32)
    if cat.size:
        src[np.repeat(np.arange(R), lens), cat] = 1
    sat = np.zeros((R, g + 1, g + 1), dtype=np.int32)
    sat[:, 1:, 1:] = src.reshape(R, g, g).cumsum(1).cumsum(2)
    eps = 1e-6
    edges = np.arange(grid + 1) / grid

    def span(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        pos = (lo + edges * (hi - lo)) * g  # model cell edges in stored-grid units
        first = np.clip(np.floor(pos[:-1] + eps), 0, g - 1).astype(np.int64)
        last = np.clip(np.ceil(pos[1:] - eps), 0, g).astype(np.int64)
        return first, np.maximum(last, first + 1)

    c0, c1 = span(window[0], window[2])
    r0, r1 = span(window[1], window[3])
    count = (sat[:, r1[:, None], c1[None, :]] - sat[:, r0[:, None], c1[None, :]]
             - sat[:, r1[:, None], c0[None, :]] + sat[:, r0[:, None], c0[None, :]])
    return (count > 0).reshape(R, grid * grid)


def patch_region_masks(lens: np.ndarray, cat: np.ndarray, src_grid: int, window, grid: int, m: int,
                       rng: random.Random) -> tuple[np.ndarray, int]:
    """M region masks [M, grid*grid] of one sample: its stored patch-set regions that are still in
    the view, in stored order, then random boxes up to M (as ``region_cells``); and the number of
    stored regions dropped because nothing of them is left in the view (or they were empty)."""
    view = patch_sets_in_view(lens, cat, src_grid, window, grid)
    alive = view[view.any(1)]
    dropped = int(lens.size - alive.shape[0])
    kept = alive[:m]
    if kept.shape[0] == m:
        return kept, dropped
    fill = cells_to_masks([[random_cells(rng, grid) for _ in range(m - kept.shape[0])]], grid)[0].numpy()
    return np.concatenate([kept, fill]), dropped


def stack_regions(per_sample: list, grid: int) -> torch.Tensor:
    """[B, M, T] bool masks of a batch whose samples carry either cell boxes (``region_cells``)
    or ready masks (``patch_region_masks``): one region source per run, so never both."""
    if isinstance(per_sample[0], np.ndarray):
        return torch.from_numpy(np.stack(per_sample))
    return cells_to_masks(per_sample, grid)
