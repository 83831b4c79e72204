"""The one image decode: PIL with a pixel-count limit checked before any pixel is decoded.

Why one function: shards, evaluation files and parquet cells are untrusted input, and a small
compressed file can declare billions of pixels (a decompression bomb). Every reader of images (the
training loader, the evaluation sources, the shard builder, the tools) decodes through here, so the
limit and the error that names the offending sample or file are the same everywhere.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

from powerclip.errors import UserError

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)


class ImageTooLargeError(UserError, ValueError):
    """The image declares more pixels than the limit allows; it was not decoded."""


def decode_image(source: bytes | str | Path, name: str, max_pixels: int = MAX_PIXELS,
                 rgb: bool = True, draft: int | None = None) -> Image.Image:
    """The decoded image of ``source`` (encoded bytes or a file path), in RGB unless ``rgb`` is
    False (then in its stored mode, ``format`` kept). ``name`` says where the image came from
    (shard and sample, file, parquet row) and starts every error message.

    The size is read from the header and checked against ``max_pixels`` before the pixels are
    decoded; PIL's own bomb check (a warning above its limit, an error above twice it) is folded
    into the same ``ImageTooLargeError``. Unreadable bytes raise PIL's own errors (OSError, ...),
    a missing file ``FileNotFoundError``.

    ``draft``: a JPEG is decoded at the smallest of libjpeg's scales 1, 1/2, 1/4, 1/8 that keeps both
    sides at least ``draft`` pixels (``Image.draft``: the inverse DCT at a reduced size, so the
    skipped pixels are never computed). The scale depends only on the header, and libjpeg's scaled
    decode is deterministic, so the same bytes give the same pixels on every run. Other formats
    ignore it."""
    img = _open_checked(source, name, max_pixels)
    if draft is not None and img.format == "JPEG":
        img.draft(img.mode, (draft, draft))
    img.load()
    if not rgb or img.mode == "RGB":
        return img
    return img.convert("RGB")


def _open_checked(source: bytes | str | Path, name: str, max_pixels: int) -> Image.Image:
    """``source`` opened by PIL (header read, no pixel decoded) after the pixel-count check."""
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageTooLargeError(f"{name}: image of {w}x{h} pixels exceeds the limit of {max_pixels} pixels "
                                 "(decompression-bomb guard)")
    return img


def image_header(source: bytes | str | Path, name: str, max_pixels: int = MAX_PIXELS) -> tuple[str, str, int, int]:
    """(format, mode, width, height) of ``source`` read from its header alone, under the same pixel
    limit and errors as ``decode_image``: what a loader worker needs to draw a crop window for an
    image that is decoded elsewhere (``data.decode_on_device``)."""
    img = _open_checked(source, name, max_pixels)
    try:
        return str(img.format), img.mode, img.size[0], img.size[1]
    finally:
        img.close()
