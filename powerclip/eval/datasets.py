"""Zero-shot and retrieval datasets: clip_benchmark's ``wds`` layout and a plain folder layout.

clip_benchmark ``wds`` layout (read from clip_benchmark.datasets.builder.build_wds_dataset)::

    ROOT/{split}/nshards.txt, ROOT/{split}/0.tar ... {n-1}.tar
    ROOT/classnames.txt                          one class name per line (classification)
    ROOT/zeroshot_classification_templates.txt   one template per line, ``{c}`` is the class name
    ROOT/dataset_type.txt                        "retrieval" for retrieval sets (default classification)

Samples hold an image (webp/png/jpg/jpeg) and ``.cls`` (class index) or ``.txt`` (captions, one per
line). Folder layout: ``ROOT/<class name>/*.jpg`` (class names from folder names, ``_`` -> space,
templates from open_clip's ``OPENAI_IMAGENET_TEMPLATES`` unless ROOT holds the two txt files above).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from powerclip.eval.sources import (
    FileImage,
    ImageRef,
    image_member,
    index_tar,
    read_text,
    require_file,
)

FOLDER_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass
class ClassificationSet:
    name: str
    images: list[ImageRef]
    labels: list[int]
    classnames: list[str]
    templates: list[str | Callable[[str], str]]


@dataclass
class RetrievalSet:
    name: str
    images: list[ImageRef]
    captions: list[list[str]]  # captions[i]: every caption of image i
    meta: dict = field(default_factory=dict)


def template_fn(template: str) -> Callable[[str], str]:
    """clip_benchmark templates use ``{c}``, open_clip's use ``{}``: accept both."""
    return lambda c: template.format(c, c=c)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def wds_shards(root: Path, split: str) -> list[Path]:
    nshards_file = require_file(root / split / "nshards.txt", f"wds dataset {root} split {split!r}")
    n = int(nshards_file.read_text().strip())
    shards = [root / split / f"{i}.tar" for i in range(n)]
    for s in shards:
        require_file(s, f"wds dataset {root}")
    return shards


def wds_type(root: Path) -> str:
    f = root / "dataset_type.txt"
    return f.read_text().strip().lower() if f.is_file() else "classification"


def load_wds(root: str | Path, split: str = "test", name: str | None = None) -> ClassificationSet | RetrievalSet:
    """Read a clip_benchmark ``wds`` dataset (classification or retrieval, per dataset_type.txt)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"wds dataset folder not found: {root}")
    name = name or f"wds/{root.name}"
    kind = wds_type(root)
    samples = [s for shard in wds_shards(root, split) for s in index_tar(shard)]
    where = f"wds dataset {root}"
    images = [image_member(s, where) for s in samples]
    if kind == "retrieval":
        captions = []
        for s in samples:
            if "txt" not in s:
                raise ValueError(f"{where}: retrieval sample {s['__key__']!r} has no .txt captions")
            captions.append(read_text(s["txt"]).splitlines())
        return RetrievalSet(name, images, captions)
    if kind != "classification":
        raise ValueError(f"{where}: dataset_type {kind!r} is not supported (classification, retrieval)")
    labels = []
    for s in samples:
        if "cls" not in s:
            raise ValueError(f"{where}: classification sample {s['__key__']!r} has no .cls label")
        labels.append(int(read_text(s["cls"]).strip()))
    classnames = _read_lines(require_file(root / "classnames.txt", where))
    templates = _read_lines(require_file(root / "zeroshot_classification_templates.txt", where))
    templates = [t for t in templates if t]
    _check_labels(labels, classnames, where)
    return ClassificationSet(name, images, labels, classnames, [template_fn(t) for t in templates])


def load_folder(root: str | Path, name: str | None = None) -> ClassificationSet:
    """Read ``ROOT/<class>/*.jpg``. 1000 WordNet-id folders (n01440764 ...) get ImageNet's class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder dataset not found: {root}")
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise ValueError(f"{root}: no class folders (expected ROOT/<class name>/*.jpg)")
    images: list[ImageRef] = []
    labels: list[int] = []
    for label, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in FOLDER_IMAGE_EXTS:
                images.append(FileImage(str(f)))
                labels.append(label)
    if not images:
        raise ValueError(f"{root}: class folders hold no images ({sorted(FOLDER_IMAGE_EXTS)})")
    if (root / "classnames.txt").is_file():
        classnames = [c for c in _read_lines(root / "classnames.txt") if c]
        if len(classnames) != len(dirs):
            raise ValueError(f"{root}/classnames.txt has {len(classnames)} names for {len(dirs)} class folders")
    elif len(dirs) == 1000 and all(d.name.startswith("n") and d.name[1:].isdigit() for d in dirs):
        classnames = list(IMAGENET_CLASSNAMES)
    else:
        classnames = [d.name.replace("_", " ") for d in dirs]
    tfile = root / "zeroshot_classification_templates.txt"
    templates: list = ([template_fn(t) for t in _read_lines(tfile) if t] if tfile.is_file()
                       else list(OPENAI_IMAGENET_TEMPLATES))
    return ClassificationSet(name or root.name, images, labels, classnames, templates)


def _check_labels(labels: list[int], classnames: list[str], where: str) -> None:
    bad = [y for y in labels if not 0 <= y < len(classnames)]
    if bad:
        raise ValueError(f"{where}: label {bad[0]} out of range for {len(classnames)} class names")
