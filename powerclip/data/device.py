"""Batches onto the training device: uint8 images travel, the device normalises them.

Why: fp32 images are 4x the bytes of uint8 in the loader workers' shared memory, in the pinned host
buffers and over PCIe; the normalisation is two elementwise passes the GPU does for free. The
arithmetic is that of ``transforms.normalized_into`` exactly, (x - 255 mean) * 1 / (255 std) in fp32, so the
pixels the model sees do not depend on where they were normalised. With ``data.decode_on_device``
the JPEGs the workers did not decode are decoded here first, on the device (``jpeg_device``).
"""

from __future__ import annotations

import functools

import torch

from powerclip.errors import UserError

from .batch import Batch, field_specs
from .jpeg_device import decode_crops


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
    if batch.jpegs is not None:
        decode_pending(moved)
    for name, spec in field_specs(type(batch)):
        v = getattr(batch, name)
        if spec.move == "pixels" and isinstance(v, torch.Tensor) and v.dtype == torch.uint8:
            setattr(moved, name, normalize_images(getattr(moved, name), mean, std, dtype))
    return moved


def decode_pending(batch: Batch) -> None:
    """Decode ``batch.jpegs`` (bytes + crop window per sample, ``data.decode_on_device``) into their
    ``images`` slots on the images' device, in one batched call, then set ``jpegs`` to None. Samples
    whose entry is None already hold their pixels (non-JPEG images the worker decoded).

    The worker read only the header, so a JPEG whose compressed data is damaged is found here, where
    a sample can no longer be skipped: the run stops naming the batch's keys."""
    images, pending = batch.images, batch.jpegs
    idx = [k for k, j in enumerate(pending) if j is not None]
    batch.jpegs = None
    if not idx:
        return
    try:
        decoded = decode_crops([pending[k][0] for k in idx], [pending[k][1] for k in idx], int(images.shape[-1]),
                               images.device)
    except (RuntimeError, ValueError) as e:
        keys = [batch.keys[k] for k in idx]
        raise UserError(f"data.decode_on_device: a JPEG among samples {keys} cannot be decoded "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); repair or drop it from "
                        "its shard, or set data.decode_on_device=false (the workers then skip it)") from None
    if len(idx) == len(pending):
        images.copy_(decoded)
    else:
        for n, k in enumerate(idx):
            images[k].copy_(decoded[n])
