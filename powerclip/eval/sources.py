"""Random-access image sources: files on disk (optionally cropped) and members of tar shards.

Evaluation wants map-style access (shard the items over ranks, decode in DataLoader workers,
encode each distinct image once), while WebDataset shards are streams. A tar shard is indexed once
(member offsets from ``tarfile``; samples grouped by webdataset's own key rule ``base_plus_ext``) and
members are then read by offset. Every image is decoded by ``data.decode.decode_image`` (the pixel
limit, errors naming the file or member), in RGB: the pixels of webdataset's ``ImageHandler('pil')``,
the decoder clip_benchmark's ``wds`` loader uses, so both tools see identical pixels.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch.utils.data import Dataset
from webdataset.tariterators import base_plus_ext

from ..data.decode import ImageTooLargeError, decode_image
from ..data.stream import starts_sample

log = logging.getLogger(__name__)

IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order of preference


@dataclass(frozen=True)
class FileImage:
    """An image file, optionally cropped to ``crop = (x0, y0, x1, y1)`` pixels (ARO's VG boxes)."""

    path: str
    crop: tuple[float, float, float, float] | None = None

    def load(self) -> PIL.Image.Image:
        img = decode_image(self.path, self.path)
        return img.crop(self.crop) if self.crop is not None else img

    def describe(self) -> str:
        return self.path


@dataclass(frozen=True)
class TarMember:
    """One member of a tar shard, read by byte offset."""

    tar: str
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.tar, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)

    def load(self) -> PIL.Image.Image:
        return decode_image(self.read(), self.describe())

    def describe(self) -> str:
        return f"{self.tar}:{self.name}"


@dataclass(frozen=True)
class BytesImage:
    """An encoded image held in memory (a Hugging Face parquet ``{"bytes", "path"}`` image cell)."""

    name: str  # where it came from, for error messages: "file.parquet row 3 image_0"
    data: bytes

    def load(self) -> PIL.Image.Image:
        return decode_image(self.data, self.name)

    def describe(self) -> str:
        return self.name


ImageRef = FileImage | TarMember | BytesImage


class ImageDataset(Dataset):
    """Preprocessed image tensors for a list of image references (what ``encode_images`` consumes)."""

    def __init__(self, refs: Sequence[ImageRef], preprocess: Callable[[PIL.Image.Image], torch.Tensor]):
        self.refs, self.preprocess = list(refs), preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor:
        ref = self.refs[i]
        try:
            img = ref.load()
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {ref.describe()}") from None
        except ImageTooLargeError:
            raise  # its message names the image already
        except Exception as e:
            raise RuntimeError(f"cannot decode image {ref.describe()}: {e}") from e
        return self.preprocess(img)


def check_files_exist(refs: Sequence[ImageRef], what: str) -> None:
    """Fail before any encoding when image files are missing, naming them (not after an hour)."""
    missing = sorted({r.path for r in refs if isinstance(r, FileImage) and not Path(r.path).is_file()})
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{what}: {len(missing)} image file(s) not found: {shown}")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    return path


def index_tar(path: str | Path) -> list[dict[str, TarMember]]:
    """Samples of one tar shard in stream order: ``[{"__key__": ..., ext: TarMember}]``, grouped as
    the training reader groups them. A key met again is a repeat: the first sample with it is kept
    whole, the repeats are skipped (never merged into a neighbour) and counted in one warning line."""
    path = str(path)
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: dict[str, Any] | None = None
    repeats = 0
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = base_plus_ext(m.name)
            if key is None:
                continue
            ext = ext.lower()
            if current is None or starts_sample(key, ext, current["__key__"], current):
                current = {"__key__": key}
                if key in seen:
                    repeats += 1  # filled but never listed
                else:
                    samples.append(current)
                seen.add(key)
            current[ext] = TarMember(path, m.name, m.offset_data, m.size)
    if repeats:
        log.warning("%s: %d samples skipped: duplicate_key (a key repeated in the shard; the first sample "
                    "with it is kept)", path, repeats)
    return samples


def image_member(sample: dict[str, Any], where: str) -> TarMember:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"{where}: sample {sample['__key__']!r} has no image ({'/'.join(IMAGE_EXTS)})")


def read_text(member: TarMember) -> str:
    return member.read().decode("utf-8")
