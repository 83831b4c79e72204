"""The synthetic benchmark written by tools/make_synthetic: one set of images, three evaluations.

``ROOT/{split}/*.tar`` (default split ``heldout``) with samples ``{key}.png|jpg``, ``{key}.txt`` (caption)
and ``{key}.json`` (annotation schema 1: ``"label"`` into ``ROOT/classes.json`` ``"classnames"``, and
``"eval_negatives": {kind: negative caption}``), plus ``ROOT/classes.json`` = {"classnames",
"templates"}. It yields a zero-shot ClassificationSet, a caption RetrievalSet and one SelectionSet per
negative kind ([caption, negative], right = 0), all over the same image list so each image is
encoded once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from powerclip.eval.compositional import SelectionCase, SelectionSet
from powerclip.eval.datasets import ClassificationSet, RetrievalSet, template_fn
from powerclip.eval.sources import ImageRef, image_member, index_tar, read_text, require_file


@dataclass
class SyntheticBenchmark:
    images: list[ImageRef]
    classification: ClassificationSet | None
    retrieval: RetrievalSet
    selection: list[SelectionSet]


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
    return SyntheticBenchmark(images, classification, retrieval, selection)
