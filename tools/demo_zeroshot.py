#!/usr/bin/env python
"""Zero-shot classification of an exported model on a synthetic split, with open_clip ONLY.

This is the demo's proof that the export is a plain open_clip model: nothing from powerclip is
imported. Class prompts come from classes.json (classnames x templates, embeddings averaged), the
label of each image is ``json["label"]`` in the shards.

Only the scenes of ONE object are scored: a scene's label is its first-named object, and in a scene
of two or three objects another class is as true of the image, so top-1 against that label would
count right answers as wrong (``--all-scenes`` scores every scene that way anyway). On the heldout
split a one-object scene's object is a held colour-shape pair, never named in training.

    python tools/demo_zeroshot.py --model demo/export --data demo/synth --split heldout
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from scipy.stats import binomtest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="open_clip folder written by `powerclip export`")
    p.add_argument("--data", required=True, help="synthetic dataset root (classes.json + split folders)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--all-scenes", action="store_true",
                   help="score every scene against its first-named object (ill-posed for a scene of several objects)")
    a = p.parse_args(argv)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{a.model}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{a.model}")
    model.eval()
    classes = json.loads((Path(a.data) / "classes.json").read_text())
    names, templates = classes["classnames"], classes["templates"]

    with torch.no_grad():
        class_emb = []
        for name in names:
            e = F.normalize(model.encode_text(tokenizer([t.format(name) for t in templates])), dim=-1)
            class_emb.append(F.normalize(e.mean(0), dim=-1))
        class_emb = torch.stack(class_emb)

        shards = sorted(str(s) for s in (Path(a.data) / a.split).glob("*.tar"))
        if not shards:
            raise SystemExit(f"no shards in {Path(a.data) / a.split}")
        correct = total = 0
        images, labels = [], []

        def flush() -> None:
            nonlocal correct, total
            emb = F.normalize(model.encode_image(torch.stack(images)), dim=-1)
            pred = (emb @ class_emb.T).argmax(-1)
            correct += int((pred == torch.tensor(labels)).sum())
            total += len(labels)
            images.clear()
            labels.clear()

        for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            if not a.all_scenes and len(meta["objects"]) != 1:
                continue
            img_key = next(k for k in ("png", "jpg", "jpeg") if k in sample)
            images.append(preprocess(Image.open(io.BytesIO(sample[img_key])).convert("RGB")))
            labels.append(int(meta["label"]))
            if len(images) == a.batch_size:
                flush()
        if images:
            flush()
    if not total:
        raise SystemExit(f"no {'' if a.all_scenes else 'one-object '}scene in {Path(a.data) / a.split}")
    acc, chance = correct / total, 1.0 / len(names)
    ci = binomtest(correct, total).proportion_ci(0.95, method="wilson")  # a few hundred scenes: say how sure
    scenes = "every scene, first-named object" if a.all_scenes else "one-object scenes"
    print(f"zero-shot top-1 on {a.split} ({scenes}): {100 * acc:.1f}% ({correct}/{total}, 95% CI "
          f"{100 * ci.low:.1f}-{100 * ci.high:.1f}%); chance {100 * chance:.1f}% ({len(names)} classes) -> "
          f"{acc / chance:.1f}x chance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
