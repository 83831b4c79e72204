"""The synthetic dataset: format, ground-truth annotations, negatives, heldout split, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from powerclip.data.synthetic import (
    COLOURS,
    PALETTE,
    SHAPES,
    Obj,
    binding_twin,
    colour_vocabulary,
    draw_objects,
    heldout_pairs,
    make_sample,
    make_synthetic,
)
from powerclip.data.synthetic_twins import (
    are_twins,
    count_twin_pairs,
    scene_key,
    train_scene_keys,
    twin_rates,
)

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


def test_default_vocabulary_draws_the_same_data():
    # digest of the annotations of the first 30 samples per split, as written before the colour
    # vocabulary became a knob: the default data (and so every figure measured on it) is unchanged
    h, pixels = hashlib.sha256(), hashlib.sha256()
    held = heldout_pairs(0)
    for split in ("train", "val", "heldout"):
        for i in range(30):
            s = make_sample(i, split, 0, 32, held)
            h.update(s["json"])
            pixels.update(Image.open(io.BytesIO(s["png"])).tobytes())
    assert h.hexdigest() == "1403cbd37dff6fe971658aec969970c6bf21a4e831e9a94a210e90ef699ece59"
    assert pixels.hexdigest() == "a6af9a7d7f7b8cd0c7476637431245a686af43716bd94390e2f89e0aa599fbfe"
    assert colour_vocabulary() == tuple(COLOURS) and heldout_pairs(0, colours=colour_vocabulary(7)) == held


def test_larger_vocabulary_keeps_the_heldout_rule(tmp_path: Path):
    colours = colour_vocabulary(27)
    assert len(set(PALETTE[c] for c in colours)) == 27 and colours[:len(COLOURS)] == tuple(COLOURS)
    root = tmp_path / "big"
    manifest = make_synthetic(root, 2, 1, 1, 48, image_size=32, num_colours=27)
    held = heldout_pairs(0, colours=colours)
    assert manifest["num_colours"] == 27
    assert set(manifest["heldout_pairs"]) == {f"{c} {s}" for c, s in held} and len(held) == round(0.15 * 27 * 5)
    classes = json.loads((root / "classes.json").read_text())["classnames"]
    assert classes == [f"{c} {s}" for c in colours for s in SHAPES]
    used: set[str] = set()
    for split in ("train", "val", "heldout"):
        for shard in sorted((root / split).glob("*.tar")):
            for s in _samples(shard):
                ann = json.loads(s["json"])
                pairs = {(o["colour"], o["shape"]) for o in ann["objects"]}
                used |= {c for c, _ in pairs}
                o = ann["objects"][0]
                assert classes[ann["label"]] == f"{o['colour']} {o['shape']}"
                assert bool(pairs & held) == (split == "heldout"), (split, pairs)
                if split != "heldout":  # neither captions nor any negative name a heldout pair
                    texts = [ann["caption"], *(n["text"] for n in ann["negatives"]), *ann["eval_negatives"].values()]
                    named = {(w[i], w[i + 1]) for t in texts for w in [t.split(" ")] for i in range(len(w) - 1)}
                    assert not named & held, (split, texts)
    assert len(used - set(COLOURS)) >= 10  # the new colours are really drawn
    with pytest.raises(ValueError, match="num_colours"):
        make_synthetic(tmp_path / "bad", 1, 0, 0, 4, num_colours=len(PALETTE) + 1)


def test_count_twin_pairs_is_the_pairwise_count():
    def scene(*pairs):
        return scene_key([Obj(s, c, None, (i, 0)) for i, (c, s) in enumerate(pairs)])

    a = scene(("red", "circle"), ("blue", "square"))
    twin = scene(("blue", "circle"), ("red", "square"))
    same = scene(("blue", "square"), ("red", "circle"))  # the same scene, said in the other order
    other = scene(("red", "circle"), ("blue", "cross"))
    keys = [a, twin, same, other, twin]
    assert count_twin_pairs(keys) == sum(are_twins(x, y) for i, x in enumerate(keys) for y in keys[i + 1:]) == 4
    drawn = train_scene_keys(400, num_colours=7)
    brute = sum(are_twins(x, y) for i, x in enumerate(drawn) for y in drawn[i + 1:])
    assert count_twin_pairs(drawn) == brute > 0


def test_more_colours_make_binding_twins_rare_in_a_batch():
    # counted over the first 100 batches of 64 train scenes exactly as the generator draws them:
    # with 7 colours about half the batches hold a pair of binding twins (the contrastive loss then
    # supervises binding); with the full palette few do
    def pairs_in_batches(num_colours: int) -> tuple[int, int]:
        keys = train_scene_keys(6400, num_colours=num_colours)
        counts = [count_twin_pairs(keys[i:i + 64]) for i in range(0, 6400, 64)]
        return sum(counts), sum(c > 0 for c in counts)

    old_pairs, old_batches = pairs_in_batches(7)
    new_pairs, new_batches = pairs_in_batches(27)
    assert old_pairs >= 40 and old_batches >= 30, (old_pairs, old_batches)
    assert new_pairs * 5 <= old_pairs and new_batches * 4 <= old_batches, (new_pairs, new_batches)
    rates = twin_rates(train_scene_keys(6400, num_colours=27), 64)
    assert rates["scene_has_twin"] < 0.005 and rates["pairs_per_batch"] < 0.1


def test_rule_parser_exact_on_the_larger_vocabulary():
    # the concept/phrase annotations of real shards come from the rule parser; new colour words
    # (also vowel-initial ones: "an olive circle") must parse as the grammar built them
    from powerclip.annotate import rule_annotation

    held = heldout_pairs(0, colours=colour_vocabulary(27))
    anns = [json.loads(make_sample(i, split, 0, 16, held, num_colours=27)["json"])
            for split in ("train", "heldout") for i in range(150)]
    assert any(a["caption"].startswith("an ") and a["objects"][0]["colour"] not in COLOURS for a in anns)
    for ann in anns:
        got = rule_annotation(ann["caption"])
        assert (got["phrases"], got["concepts"]) == (ann["phrases"], ann["concepts"]), ann["caption"]


def _pixel(img: Image.Image, box: list[float]) -> tuple[int, int, int]:
    """The colour at the centre of a box (inside every shape the generator draws)."""
    w = img.size[0]
    return img.getpixel((int((box[0] + box[2]) / 2 * w), int((box[1] + box[3]) / 2 * w)))


def _outside(img: Image.Image, boxes: tuple[list[float], ...]) -> list:
    """The pixels outside ``boxes`` (grown by one pixel)."""
    w = img.size[0]
    return [img.getpixel((x, y)) for x in range(w) for y in range(w)
            if not any(b[0] * w - 1 <= x <= b[2] * w + 1 and b[1] * w - 1 <= y <= b[3] * w + 1 for b in boxes)]


def test_binding_twin_swaps_the_colours_of_the_first_two_objects():
    """The twin is the scene re-drawn from its annotation with objects 0 and 1 exchanging colours,
    and its caption is the scene's swap-att negative: same bag of words, same layout, other binding."""
    colours = colour_vocabulary(27)
    held = heldout_pairs(0, colours=colours)
    twins = 0
    for split in ("val", "heldout"):
        for i in range(60):
            s = make_sample(i, split, 0, 64, held, num_colours=27)
            ann = json.loads(s["json"])
            image = Image.open(io.BytesIO(s["png"])).convert("RGB")
            objs = ann["objects"]
            # the annotation holds everything needed to re-draw the scene pixel for pixel
            assert draw_objects([(o["shape"], o["colour"], o["box"]) for o in objs], 64).tobytes() == image.tobytes()
            twin = binding_twin(ann, 64)
            if "swap-att" not in ann["eval_negatives"]:
                assert twin is None
                continue
            twins += 1
            twin_image, twin_caption = twin
            assert twin_caption == ann["eval_negatives"]["swap-att"]
            (c0, s0), (c1, s1) = (objs[0]["colour"], objs[0]["shape"]), (objs[1]["colour"], objs[1]["shape"])
            assert c0 != c1
            # the caption names the swapped pairs, and the image draws them where the originals were
            assert f"{c1} {s0}" in twin_caption and f"{c0} {s1}" in twin_caption
            if s0 != s1:  # (two circles swap colours: the same pairs, bound to other sizes and places)
                assert f"{c0} {s0}" not in twin_caption and f"{c1} {s1}" not in twin_caption
            def _words(text: str) -> list[str]:  # the article follows the colour ("an orange")
                return sorted(w for w in text.split() if w not in ("a", "an"))

            assert _words(twin_caption) == _words(ann["caption"])  # the same bag of words
            assert _pixel(twin_image, objs[0]["box"]) == PALETTE[c1] == _pixel(image, objs[1]["box"])
            assert _pixel(twin_image, objs[1]["box"]) == PALETTE[c0] == _pixel(image, objs[0]["box"])
            for o in objs[2:]:
                assert _pixel(twin_image, o["box"]) == PALETTE[o["colour"]]
            # outside the two objects nothing changed
            swapped = (objs[0]["box"], objs[1]["box"])
            assert _outside(twin_image, swapped) == _outside(image, swapped)
    assert twins > 20
    # annotations from elsewhere (parsed captions) have no exact objects to re-draw: no twin
    assert binding_twin({**ann, "parser": "spacy"}, 64) is None
