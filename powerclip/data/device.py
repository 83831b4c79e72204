"""Batches onto the training device: uint8 images travel, the device normalises them.

Why: fp32 images are 4x the bytes of uint8 in the loader workers' shared memory, in the pinned host
buffers and over PCIe; the normalisation is two elementwise passes the GPU does for free. The
arithmetic is that of ``transforms.normalized_into`` exactly, (x - 255 mean) * 1 / (255 std) in fp32, so the
pixels the model sees do not depend on where they were normalised.
"""

from __future__ import annotations

import functools

import torch

from .batch import Batch, field_specs


@functools.lru_cache(maxsize=16)
def _affine_on(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 mean, 1 / (255 std)) as [C, 1, 1] fp32 tensors on ``device``, made once: a per-step copy
    of two small CPU tensors would be a synchronous host-to-device transfer."""
    shift = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).mul_(255.0)
    inv = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).mul_(255.0).reciprocal_()
    return shift.to(device), inv.to(device)


def normalize_images(images: torch.Tensor, mean, std, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] → (x / 255 - mean) / std in fp32 on the images' device, then ``dtype``."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype}")
    shift, inv = _affine_on(tuple(float(m) for m in mean), tuple(float(s) for s in std), str(images.device))
    out = images.to(torch.float32).sub_(shift).mul_(inv)
    return out if dtype is None or dtype == torch.float32 else out.to(dtype)


def to_device(batch: Batch, device: torch.device | str, dtype: torch.dtype | None, mean, std) -> Batch:
    """``batch`` on ``device`` (asynchronous copies: the loader pins its buffers when CUDA is in use),
    uint8 ``pixels`` fields normalised there with ``mean``/``std`` and cast to ``dtype``. Float
    images (batches made by hand or by a custom loader) are only moved and cast."""
    moved = batch.to(device, dtype)
    for name, spec in field_specs(type(batch)):
        v = getattr(batch, name)
        if spec.move == "pixels" and isinstance(v, torch.Tensor) and v.dtype == torch.uint8:
            setattr(moved, name, normalize_images(getattr(moved, name), mean, std, dtype))
    return moved
