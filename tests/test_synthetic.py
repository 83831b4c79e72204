"""The synthetic dataset: format, ground-truth annotations, negatives, heldout split, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image

from powerclip.data.synthetic import COLOURS, SHAPES, heldout_pairs, make_sample, make_synthetic

ROOT = Path(__file__).resolve().parent.parent


def _samples(path: Path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))


def test_layout_and_sizes(synthetic_root: Path):
    for split in ("train", "val", "heldout"):
        sizes = json.loads((synthetic_root / split / "sizes.json").read_text())
        for name, n in sizes.items():
            assert len(_samples(synthetic_root / split / name)) == n
    manifest = json.loads((synthetic_root / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 3 * 64
    classes = json.loads((synthetic_root / "classes.json").read_text())
    assert len(classes["classnames"]) == len(COLOURS) * len(SHAPES)
    assert all("{}" in t for t in classes["templates"])
    with tarfile.open(synthetic_root / "train" / "00000.tar") as tf:  # plain ustar: no per-member pax header
        assert all(m.pax_headers == {} and m.mtime == 0 for m in tf)


def test_annotations_are_exact(synthetic_root: Path):
    classes = json.loads((synthetic_root / "classes.json").read_text())["classnames"]
    for s in _samples(synthetic_root / "train" / "00000.tar"):
        ann = json.loads(s["json"])
        cap = ann["caption"]
        assert ann["schema"] == 1 and s["txt"].decode() == cap
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (32, 32)
        # every concept is an NP node whose text is exactly the caption slice
        nps = {(p["start"], p["end"]) for p in ann["phrases"] if p["label"] == "NP"}
        assert {(c["start"], c["end"]) for c in ann["concepts"]} == nps
        for c in ann["concepts"]:
            assert cap[c["start"]:c["end"]] == c["text"]
            assert c["text"].split()[-1] in SHAPES
        assert ann["phrases"][-1] == {"label": "ROOT", "start": 0, "end": len(cap)}
        # one box per object, colour at the box centre is the object's colour (a real rendering)
        assert len(ann["boxes"]) == len(ann["objects"]) == len(ann["concepts"])
        o = ann["objects"][0]
        assert classes[ann["label"]] == f"{o['colour']} {o['shape']}"
        # relation in the caption holds for the drawn boxes
        if ann["relation"]:
            a, b = ann["boxes"][0], ann["boxes"][1]
            ca, cb = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2), ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
            holds = {"left of": ca[0] < cb[0], "right of": ca[0] > cb[0],
                     "above": ca[1] < cb[1], "below": ca[1] > cb[1]}[ann["relation"]]
            assert holds, (cap, ann["boxes"])


def test_negatives_differ_from_caption(synthetic_root: Path):
    kinds: set[str] = set()
    eval_kinds: set[str] = set()
    for s in _samples(synthetic_root / "train" / "00001.tar"):
        ann = json.loads(s["json"])
        for n in ann["negatives"]:
            assert n["text"] != ann["caption"]
            kinds.add(n["kind"])
        for k, text in ann["eval_negatives"].items():
            assert text != ann["caption"]
            eval_kinds.add(k)
    assert kinds == {"reorder", "swap_nouns", "swap_adjectives", "replace_adjectives", "replace_nouns"}
    assert eval_kinds == {"swap-att", "swap-obj", "replace-att", "replace-obj", "replace-rel", "add-obj"}


def test_heldout_pairs_never_in_train(synthetic_root: Path):
    held = {f"{c} {s}" for c, s in heldout_pairs(0)}
    assert set(json.loads((synthetic_root / "manifest.json").read_text())["heldout_pairs"]) == held
    for split, expect in (("train", False), ("val", False), ("heldout", True)):
        for s in _samples(synthetic_root / split / "00000.tar"):
            ann = json.loads(s["json"])
            pairs = {f"{o['colour']} {o['shape']}" for o in ann["objects"]}
            assert bool(pairs & held) == expect
            if split != "heldout":  # no negative may name a heldout pair: "unseen pair = false" shortcut
                texts = [n["text"] for n in ann["negatives"]] + list(ann["eval_negatives"].values())
                assert not [t for t in texts if any(p in t for p in held)], (split, texts)
                assert len(texts[:len(ann["negatives"])]) == len({n["text"] for n in ann["negatives"]})


def test_relation_free_captions_leave_only_binding(tmp_path: Path):
    held = heldout_pairs(0)
    same = [make_sample(i, "train", 0, 32, held) for i in range(20)]
    assert same == [make_sample(i, "train", 0, 32, held, relation_prob=1.0) for i in range(20)]  # default unchanged
    firsts, swaps = set(), 0
    for i in range(60):
        ann = json.loads(make_sample(i, "train", 0, 32, held, relation_prob=0.0)["json"])
        assert ann["relation"] is None and "replace-rel" not in ann["eval_negatives"]
        assert not any(r in ann["caption"] for r in ("left of", "right of", "above", "below"))
        if len(ann["objects"]) >= 2:
            # the mention order is not the layout's: the first-named object is anywhere
            firsts.add(tuple(round(v, 1) for v in ann["objects"][0]["box"][:2]))
            swaps += "swap-att" in ann["eval_negatives"]
    assert len(firsts) > 3 and swaps > 10


def test_seeded_and_224(tmp_path: Path):
    held = heldout_pairs(3)
    a, b = make_sample(7, "train", 3, 224, held), make_sample(7, "train", 3, 224, held)
    assert a == b
    assert Image.open(io.BytesIO(a["png"])).size == (224, 224)
    assert make_sample(8, "train", 3, 224, held)["json"] != a["json"]
    # whole-dataset determinism: the CLI and the library write byte-identical shards
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), "--out", str(tmp_path / "x"),
                    "--train-shards", "1", "--val-shards", "0", "--heldout-shards", "0",
                    "--per-shard", "8", "--format", "jpg"], check=True, capture_output=True)
    make_synthetic(tmp_path / "y", 1, 0, 0, 8, image_format="jpg")
    digest = [hashlib.sha256((tmp_path / n / "train" / "00000.tar").read_bytes()).hexdigest() for n in "xy"]
    assert digest[0] == digest[1]
    assert make_synthetic(tmp_path / "z", 1, 0, 0, 4)["splits"]["train"]["num_samples"] == 4
