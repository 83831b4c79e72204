"""Region geometry (docs/losses.md §2): stored boxes or patch-index sets mapped into a transformed view and
drawn on the model's patch grid as [M, T] masks.

The view is described by the crop window that ``transforms.apply_transform`` reports, in 0..1
coordinates of the stored image; every function here maps stored geometry through that window.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

# the CSR reader of ``samlens``/``samcat`` lives with the published format, torch-free so the preflight
# check reads regions without importing torch; named here too, beside the code that maps the regions
from .published import PatchRegionError, read_patch_sets  # noqa: F401


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
    r = rng.random  # four floats: cheaper than four randint calls, same distribution
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
