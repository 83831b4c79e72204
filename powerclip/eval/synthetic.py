"""The synthetic benchmark written by tools/make_synthetic: one set of images, three evaluations.

``ROOT/{split}/*.tar`` (default split ``heldout``) with samples ``{key}.png|jpg``, ``{key}.txt`` (caption)
and ``{key}.json`` (annotation schema 1: ``"label"`` into ``ROOT/classes.json`` ``"classnames"``, and
``"eval_negatives": {kind: negative caption}``), plus ``ROOT/classes.json`` = {"classnames",
"templates"}. It yields a zero-shot ClassificationSet, a caption RetrievalSet and one SelectionSet per
negative kind ([caption, negative], right = 0), all over the same image list so each image is
encoded once; and, for the generator's own annotations, a Winoground set of binding twins: each
scene with a swap-att negative against its colour-swapped twin (``data.synthetic.twin_objects``,
re-drawn from the annotation's objects and boxes, encoded in the scene's own image format), with
the two captions [caption, swap-att negative]. The one-sided swap-att accuracy can rise above
chance by preferring one string of a pair whatever the image shows; the twin's group score cannot.
The twins' captions say a relation whose arguments are the swapped objects, so the colours' positions
and the relation word solve them without binding. The binding pairs (``data.synthetic_pairs``, a
Winoground set ``synthetic/binding-pairs`` drawn from the manifest when evaluated) are solved by binding
only; they exist for the generator's own splits (train, val, heldout), not for other folders. The
scenes' zero-shot label is their first-named object, ill-posed for a multi-object scene; the single
objects (``data.synthetic_pairs.single_object_case``, a ClassificationSet ``synthetic/single-object``
drawn from the manifest like the pairs) are the well-posed zero-shot.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL.Image

from powerclip.data.synthetic import JPEG_QUALITY, draw_objects, twin_objects
from powerclip.data.synthetic_pairs import pair_cases, single_object_cases
from powerclip.eval.compositional import SelectionCase, SelectionSet, WinogroundCase, WinogroundSet
from powerclip.eval.datasets import ClassificationSet, RetrievalSet, template_fn
from powerclip.eval.sources import (
    BytesImage,
    ImageRef,
    TarMember,
    image_member,
    index_tar,
    read_text,
    require_file,
)


@dataclass
class SyntheticBenchmark:
    images: list[ImageRef]
    classification: ClassificationSet | None
    retrieval: RetrievalSet
    selection: list[SelectionSet]
    binding: WinogroundSet | None  # scenes against their colour-swapped twins; None: no twin-able scene
    pairs: WinogroundSet | None = None  # the binding pairs of the split; None: the manifest has none
    single: ClassificationSet | None = None  # single-object zero-shot cases; None: the manifest has none


def load_synthetic(root: str | Path, split: str = "heldout") -> SyntheticBenchmark:
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"synthetic benchmark: split folder not found: {split_dir}")
    shards = sorted(split_dir.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"synthetic benchmark: no .tar shards in {split_dir}")
    images: list[ImageRef] = []
    captions: list[list[str]] = []
    labels: list[int | None] = []
    negatives: dict[str, list[SelectionCase]] = {}
    twin_images: list[ImageRef] = []
    twin_cases: list[WinogroundCase] = []
    for shard in shards:
        for s in index_tar(shard):
            where = f"{shard} sample {s['__key__']!r}"
            for ext in ("txt", "json"):
                if ext not in s:
                    raise ValueError(f"{where}: missing .{ext}")
            ann = json.loads(read_text(s["json"]))
            caption = read_text(s["txt"]).strip()
            idx = len(images)
            images.append(image_member(s, where))
            captions.append([caption])
            labels.append(ann.get("label"))
            for kind, neg in sorted((ann.get("eval_negatives") or {}).items()):
                negatives.setdefault(kind, []).append(SelectionCase(idx, [caption, neg], 0))
            twin = _twin_image(ann, images[-1], where)
            if twin is not None:
                twin_images += [images[-1], twin[0]]
                twin_cases.append(WinogroundCase((len(twin_images) - 2, len(twin_images) - 1), (caption, twin[1])))
    if not images:
        raise ValueError(f"synthetic benchmark: the shards in {split_dir} hold no samples")
    classification = None
    classes_file = root / "classes.json"
    if any(y is not None for y in labels):
        classes = json.loads(require_file(classes_file, "synthetic benchmark zero-shot").read_text())
        classnames, templates = list(classes["classnames"]), list(classes["templates"])
        missing = [i for i, y in enumerate(labels) if y is None]
        if missing:
            raise ValueError(f"synthetic benchmark: {len(missing)} sample(s) have no 'label' (first: #{missing[0]})")
        bad = [y for y in labels if not 0 <= int(y) < len(classnames)]
        if bad:
            raise ValueError(f"synthetic benchmark: label {bad[0]} out of range for {len(classnames)} classes")
        classification = ClassificationSet("synthetic", images, [int(y) for y in labels], classnames,
                                           [template_fn(t) for t in templates])
    retrieval = RetrievalSet("synthetic", images, captions)
    selection = [SelectionSet(f"synthetic/{kind}", images, cases) for kind, cases in sorted(negatives.items())]
    binding = WinogroundSet("synthetic/binding", twin_images, twin_cases) if twin_cases else None
    return SyntheticBenchmark(images, classification, retrieval, selection, binding, _binding_pairs(root, split),
                              _single_objects(root, split))


def _drawn_cases(root: Path, split: str, cases_of: Callable[[dict, str], list]) -> tuple[Path, dict, list] | None:
    """(manifest file, manifest, cases) of a set the generator draws at evaluation, when ``split`` is
    one of its splits and the manifest counts cases of that set; else None."""
    manifest_file = root / "manifest.json"
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text())
    if split not in manifest.get("splits", {}):
        return None
    cases = cases_of(manifest, split)
    return (manifest_file, manifest, cases) if cases else None


def _png(objects: list, size: int, where: str) -> BytesImage:
    buf = io.BytesIO()
    draw_objects(objects, size).save(buf, format="PNG")
    return BytesImage(where, buf.getvalue())


def _single_objects(root: Path, split: str) -> ClassificationSet | None:
    """The split's single-object zero-shot cases drawn at the dataset's image size (PNG, like the
    pairs), classified over the dataset's own classes and templates; None where the manifest has none."""
    found = _drawn_cases(root, split, single_object_cases)
    if found is None:
        return None
    manifest_file, manifest, cases = found
    classes = json.loads(require_file(root / "classes.json", "synthetic single-object zero-shot").read_text())
    size = int(manifest["image_size"])
    images = [_png(c.objects, size, f"{manifest_file} single object {split} #{i}") for i, c in enumerate(cases)]
    return ClassificationSet("synthetic/single-object", images, [c.label for c in cases], list(classes["classnames"]),
                             [template_fn(t) for t in classes["templates"]])


def _binding_pairs(root: Path, split: str) -> WinogroundSet | None:
    """The split's binding pairs drawn at the dataset's image size, PNG-encoded like its images;
    None for a folder the manifest does not name as a split, or a dataset written without pairs."""
    found = _drawn_cases(root, split, pair_cases)
    if found is None:
        return None
    manifest_file, manifest, cases = found
    size = int(manifest["image_size"])
    images: list[ImageRef] = []
    wino: list[WinogroundCase] = []
    for i, case in enumerate(cases):
        for k, objects in enumerate(case.objects):
            images.append(_png(objects, size, f"{manifest_file} binding pair {split} #{i} image {k}"))
        wino.append(WinogroundCase((len(images) - 2, len(images) - 1), case.captions))
    return WinogroundSet("synthetic/binding-pairs", images, wino)


def _twin_image(ann: dict, original: TarMember, where: str) -> tuple[BytesImage, str] | None:
    """The scene's colour-swapped twin, encoded like the original (PNG, or JPEG at the generator's
    quality) so the two images of a pair differ by the swap and not by compression; and its caption.
    The original is read only for scenes that have a twin (its size and format)."""
    twin = twin_objects(ann)
    if twin is None:
        return None
    with PIL.Image.open(io.BytesIO(original.read())) as img:
        size, fmt = img.size[0], img.format or "PNG"
    buf = io.BytesIO()
    draw_objects(twin[0], size).save(buf, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return BytesImage(f"{where} (colour-swapped twin)", buf.getvalue()), twin[1]
