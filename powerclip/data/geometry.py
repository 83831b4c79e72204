"""Image geometry of the configured model: input size, patch grid, normalisation, resizing.

Why here: the data pipeline must agree with the model on the input resolution, the patch grid
(region masks are [M, grid*grid]) and the mean/std, and the model config is the one source of
truth. Read from ``cfg.model.config`` (a full open_clip model_cfg dict), an open_clip built-in
name, or an exported folder ``local-dir:DIR`` (its open_clip_config.json); ``aug.mean``, ``aug.std``,
``aug.interpolation`` and ``aug.resize_mode`` override its preprocess_cfg as open_clip's ``--image-*``
flags do, and the export writes them into its preprocess_cfg (``config.aug_preprocess``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from powerclip.config import aug_preprocess

# open_clip.constants values, repeated so that importing this module does not import open_clip
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Geometry:
    image_size: int
    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _model_and_preprocess_cfg(cfg) -> tuple[dict, dict]:
    m = cfg.model
    if m.config is not None:
        mc = dict(m.config)
        return mc, dict(mc.get("preprocess_cfg") or {})
    name = m.name
    if name is None:
        raise ValueError("model.name or model.config must be set to know the image geometry")
    if name.startswith("local-dir:"):
        path = Path(name.split(":", 1)[1]) / "open_clip_config.json"
        if not path.is_file():
            raise ValueError(f"model.name={name!r}: {path} not found")
        d = json.loads(path.read_text())
        return d["model_cfg"], dict(d.get("preprocess_cfg") or {})
    import open_clip

    mc = open_clip.get_model_config(name)
    if mc is None:
        raise ValueError(f"model.name={name!r} is not an open_clip model config")
    return mc, dict(mc.get("preprocess_cfg") or {})


def model_geometry(cfg) -> Geometry:
    mc, pp = _model_and_preprocess_cfg(cfg)
    vc = mc.get("vision_cfg", {})
    size = pp.get("size", vc.get("image_size", 224))
    if isinstance(size, (list, tuple)):
        if size[0] != size[1]:
            raise ValueError(f"non-square image size {size} is not supported")
        size = size[0]
    patch = vc.get("patch_size")
    if patch is None and vc.get("timm_model_name"):
        found = re.search(r"patch(\d+)", vc["timm_model_name"])
        patch = int(found.group(1)) if found else None
    if patch is None:
        if isinstance(vc.get("layers"), (list, tuple)):  # ModifiedResNet: stride-32 feature map
            patch = 32
        else:
            raise ValueError(f"cannot tell the patch size of vision_cfg {vc}")
    pp.update(aug_preprocess(cfg))
    mean = tuple(float(x) for x in (pp.get("mean") or vc.get("image_mean") or OPENAI_DATASET_MEAN))
    std = tuple(float(x) for x in (pp.get("std") or vc.get("image_std") or OPENAI_DATASET_STD))
    return Geometry(int(size), int(patch), mean, std, str(pp.get("interpolation") or "bicubic"),
                    str(pp.get("resize_mode") or "shortest"))


def grid_size(cfg) -> int:
    """Patches per side of the image grid: image_size // patch_size of the configured model."""
    return model_geometry(cfg).grid
