"""Batched JPEG decode + crop + resize on a device (``torchvision.io.decode_jpeg``), the CPU path's twin.

Why: on a GPU node the loader workers' JPEG decode is the CPU cost that grows with the GPU's speed;
nvJPEG decodes a whole batch in one call on the GPU. This module takes what a worker can produce
without decoding (the encoded bytes and the crop window drawn from the header's size) and returns the
uint8 [B, 3, size, size] batch the CPU path (``decode.decode_image`` + ``transforms.apply_transform``)
would have written. On a CPU device the same code runs torchvision's libjpeg decode, which is the
fallback and what the tests compare with PIL: equal shapes, pixels within a few grey levels (the
decoders' IDCT rounding and PIL's fixed-point bicubic differ slightly).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def decode_crops(jpegs: Sequence[bytes], crops: Sequence[tuple[int, int, int, int]], size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [B, 3, size, size]: each JPEG decoded to RGB on ``device`` (one batched call), cut to its
    crop (top, left, height, width) in decoded-image pixels, resized bicubic with antialiasing (open_clip's
    RandomResizedCrop / Resize interpolation), rounded to uint8. A batch the device decoder refuses
    is decoded on the CPU instead and moved."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if len(jpegs) != len(crops):
        raise ValueError(f"decode_crops: {len(jpegs)} images but {len(crops)} crop windows")
    device = torch.device(device)
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    try:
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        if device.type == "cpu":
            raise
        # a JPEG the device decoder refuses (nvJPEG lacks some encodings): the CPU decoder, then moved
        images = [img.to(device, non_blocking=True) for img in decode_jpeg(data, mode=ImageReadMode.RGB)]
    out = torch.empty((len(data), 3, size, size), dtype=torch.uint8, device=device)
    for k, (img, (top, left, h, w)) in enumerate(zip(images, crops)):
        if top < 0 or left < 0 or h < 1 or w < 1 or top + h > img.shape[1] or left + w > img.shape[2]:
            raise ValueError(f"decode_crops: crop {(top, left, h, w)} of image {k} lies outside its "
                             f"{img.shape[2]}x{img.shape[1]} pixels")
        crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
        resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[k] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return out
