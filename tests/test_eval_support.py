"""Fixtures for the eval tests: a tiny open_clip export folder and real datasets in published layouts.

Imported by the other tests/test_eval*.py modules; its own tests check that the fixtures are what
the real tools read (open_clip loads the export strictly; webdataset reads the shards).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import open_clip
import torch
import webdataset as wds
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file

TINY_MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20),
       "purple": (140, 20, 160), "orange": (250, 140, 0), "white": (245, 245, 245)}


def train_tiny(model: torch.nn.Module, steps: int = 40, seed: int = 0) -> torch.nn.Module:
    """A few CLIP steps on coloured-square images vs "a {colour} square." so the model is not chance.

    A trained model gives non-saturated, class-dependent numbers, which is what an agreement test
    needs (a random tiny CLIP predicts one class for everything).
    """
    pp = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)),
                                      is_train=False)
    tok = open_clip.get_tokenizer("ViT-B-32")
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(COLORS), generator=g).tolist()
        imgs = torch.stack([pp(make_image(10_000 + 31 * step + i, COLORS[i])) for i in idx])
        txt = tok([f"a {COLORS[i]} square." for i in idx])
        img_f, txt_f, scale = model(imgs, txt)
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def make_export(folder: Path, seed: int = 0, train_steps: int = 0) -> Path:
    """A tiny CLIP (random init, optionally briefly trained) saved as an open_clip export folder."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_MODEL_CFG)
    if train_steps:
        train_tiny(model, train_steps, seed)
    folder.mkdir(parents=True, exist_ok=True)
    pp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in open_clip.get_model_preprocess_cfg(model).items()}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CFG, "preprocess_cfg": pp}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def make_image(seed: int, color: str | None = None, size: int = 40) -> Image.Image:
    """Noise plus (optionally) a coloured square, so images differ and classes are visible."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    if color is not None:
        c = RGB[color]
        x, y = rng.integers(0, size // 2, 2)
        arr[y:y + size // 2, x:x + size // 2] = c
    return Image.fromarray(arr)


def image_bytes(img: Image.Image, fmt: str = "png") -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else fmt.upper())
    return buf.getvalue()


def write_wds_classification(root: Path, n: int = 24, classes: list[str] | None = None, shards: int = 2,
                             split: str = "test") -> tuple[Path, list[int]]:
    """clip_benchmark ``wds`` classification layout (what clip_benchmark_export_wds writes)."""
    classes = classes or COLORS[:6]
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c} square.\n")
    labels = [i % len(classes) for i in range(n)]
    per = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(str(root / split / f"{s}.tar")) as tw:
            for i in range(s * per, min(n, (s + 1) * per)):
                fmt = "jpg" if i % 3 == 0 else "png"
                tw.write({"__key__": f"s{i:05d}", fmt: image_bytes(make_image(i, classes[labels[i]]), fmt),
                          "cls": str(labels[i])})
    (root / split / "nshards.txt").write_text(str(shards))
    return root, labels


def write_wds_retrieval(root: Path, n: int = 12, caps_per_image: int = 2, split: str = "test") -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    with wds.TarWriter(str(root / split / "0.tar")) as tw:
        for i in range(n):
            color = COLORS[i % len(COLORS)]
            caps = [f"a {color} square number {i} view {j}" for j in range(caps_per_image)]
            tw.write({"__key__": f"r{i:05d}", "png": image_bytes(make_image(100 + i, color)), "txt": "\n".join(caps)})
    (root / split / "nshards.txt").write_text("1")
    return root


def write_folder_dataset(root: Path, per_class: int = 3, classes: list[str] | None = None) -> Path:
    classes = classes or ["red_thing", "green_thing", "blue_thing"]
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            make_image(ci * 100 + j, c.split("_")[0]).save(root / c / f"{j}.jpg")
    return root


def write_sugarcrepe(root: Path, tasks=("swap_att", "add_obj"), n: int = 6) -> Path:
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        make_image(500 + i, COLORS[i]).save(root / "val2017" / f"{i:012d}.jpg")
    for t, task in enumerate(tasks):
        ann = {str(10 * k + t): {"filename": f"{k % 4:012d}.jpg", "caption": f"a {COLORS[k % 7]} cat on a mat {k}",
                                 "negative_caption": f"a mat on a {COLORS[(k + 1) % 7]} cat {k}"} for k in range(n)}
        (root / f"{task}.json").write_text(json.dumps(ann))
    return root


def write_winoground(root: Path, n: int = 4) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for k in (0, 1):
            make_image(700 + 2 * i + k, COLORS[(i + k) % 7]).save(root / "images" / f"ex_{i}_img_{k}.png")
        rows.append({"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1",
                     "caption_0": f"a {COLORS[i]} dog chases a {COLORS[i + 1]} cat",
                     "caption_1": f"a {COLORS[i + 1]} cat chases a {COLORS[i]} dog", "tag": "Object"})
    (root / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_aro_vg(root: Path, n: int = 6) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        make_image(800 + i, COLORS[i], size=64).save(root / "images" / f"{2300 + i}.jpg")
    rel = [{"image_id": str(2300 + k % 3), "image_path": f"{2300 + k % 3}.jpg", "bbox_x": 4 * (k % 3), "bbox_y": 2,
            "bbox_w": 40, "bbox_h": 50 - k, "relation_name": ["on", "wearing", "holding"][k % 3],
            "true_caption": f"the {COLORS[k % 7]} horse is on the grass {k}",
            "false_caption": f"the grass is on the {COLORS[k % 7]} horse {k}"} for k in range(n)]
    att = [{"image_id": str(2300 + k % 3), "image_path": f"{2300 + k % 3}.jpg", "bbox_x": 0, "bbox_y": 3 * (k % 2),
            "bbox_w": 60, "bbox_h": 60 - 3 * (k % 2), "attributes": [COLORS[k % 2], COLORS[2 + k % 2]],
            "true_caption": f"the {COLORS[k % 2]} shirt and the {COLORS[2 + k % 2]} door",
            "false_caption": f"the {COLORS[2 + k % 2]} shirt and the {COLORS[k % 2]} door"} for k in range(n)]
    (root / "visual_genome_relation.json").write_text(json.dumps(rel))
    (root / "visual_genome_attribution.json").write_text(json.dumps(att))
    return root


def write_aro_coco_order(root: Path, n: int = 3) -> Path:
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    ann = []
    for i in range(n):
        name = f"val2014/COCO_val2014_{i:012d}.jpg"
        make_image(900 + i, COLORS[i]).save(root / name)
        ann.append({"image": name, "caption": [f"A {COLORS[i]} bus parked next to a tall building.",
                                               f"Two small dogs play with a {COLORS[i + 1]} ball in the park!"]})
    (root / "coco_karpathy_test.json").write_text(json.dumps(ann))
    return root


def write_valse(root: Path, n: int = 6) -> Path:
    (root / "images" / "visual7w").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        make_image(1000 + i, COLORS[i]).save(root / "images" / "visual7w" / f"v7w_{i}.jpg")
    ann = {f"existence_{k}": {"dataset": "visual7w", "image_file": f"v7w_{k % 3}.jpg",
                              "caption": f"There are {COLORS[k % 7]} people {k}.",
                              "foil": f"There are no {COLORS[k % 7]} people {k}.",
                              "mturk": {"foil": 0, "caption": 3 if k % 3 else 1, "other": 0}} for k in range(n)}
    (root / "existence.json").write_text(json.dumps(ann))
    return root


def write_synthetic(root: Path, n: int = 10) -> Path:
    """The tools/make_synthetic layout (annotation schema 1), written directly."""
    classes = {"classnames": COLORS[:5], "templates": ["a photo of a {}.", "a {} thing."]}
    (root / "heldout").mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(classes))
    rng = random.Random(0)
    with wds.TarWriter(str(root / "heldout" / "00000.tar")) as tw:
        for i in range(n):
            c = COLORS[i % 5]
            cap = f"a {c} circle left of a {COLORS[(i + 2) % 5]} square"
            negs = {"swap-att": f"a {COLORS[(i + 2) % 5]} circle left of a {c} square",
                    "replace-rel": f"a {c} circle right of a {COLORS[(i + 2) % 5]} square"}
            if i % 2:
                negs["add-obj"] = cap + " and a blue star"
            ann = {"schema": 1, "caption": cap, "phrases": [], "concepts": [], "boxes": [], "objects": [],
                   "label": i % 5, "eval_negatives": negs}
            tw.write({"__key__": f"{i:06d}", "png": image_bytes(make_image(1200 + i, c)), "txt": cap,
                      "json": json.dumps(ann)})
            rng.random()
    (root / "heldout" / "sizes.json").write_text(json.dumps({"00000.tar": n}))
    return root


# ----------------------------------------------------------------------------- fixture tests
def test_export_loads_strictly_in_open_clip(tmp_path):
    folder = make_export(tmp_path / "export")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    ref = open_clip.model.CLIP(**TINY_MODEL_CFG)
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**TINY_MODEL_CFG)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert preprocess(make_image(0)).shape == (3, 32, 32)


def test_wds_fixture_reads_with_webdataset(tmp_path):
    root, labels = write_wds_classification(tmp_path / "cls", n=7, shards=2)
    urls = [str(root / "test" / f"{i}.tar") for i in range(2)]
    got = [int(s["cls"]) for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")]
    assert got == labels
