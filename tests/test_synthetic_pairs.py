"""The binding pairs (powerclip.data.synthetic_pairs): every scorer blind to binding is at chance on
them, a scorer given the binding solves them, and the cases are what the module says they are."""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from powerclip.data.synthetic import PALETTE, SHAPES, draw_objects, heldout_pairs, make_synthetic
from powerclip.data.synthetic_pairs import pair_case, pair_cases
from powerclip.eval.metrics import pair_assignment, winoground_scores

N_CASES = 400  # per scorer test: the binomial 99% half-width at p = 0.5 is 0.064
SIZE = 64
NUM_COLOURS = 27
HELD = heldout_pairs(0, colours=tuple(list(PALETTE)[:NUM_COLOURS]))
COLOUR_WORDS = set(PALETTE)


def _cases(split: str = "val", n: int = N_CASES):
    return [pair_case(i, split, 0, HELD, NUM_COLOURS) for i in range(n)]


def _named(caption: str) -> list[tuple[str, str]]:
    """(colour, shape) per noun phrase of a binding-pair caption, in order of mention."""
    out = []
    for np_text in caption.split(" and "):
        words = np_text.split(" ")
        out.append((words[-2], words[-1]))
    return out


def _pixels(objects) -> np.ndarray:
    return np.asarray(draw_objects(objects, SIZE), dtype=np.int16)


def _mask(img: np.ndarray, colour: str) -> np.ndarray:
    return (np.abs(img - np.array(PALETTE[colour])).sum(-1) == 0)


# --- scorers: score(caption, drawn objects of one image) -> float
def colour_scorer(caption, objects):
    """Colours only: the pixel area of each named colour, the first-named weighted more."""
    img = _pixels(objects)
    return sum((2 - k) * float(_mask(img, c).sum()) for k, (c, _) in enumerate(_named(caption)))


def colour_position_scorer(caption, objects):
    """The old twins' shortcut: the first-named colour is the leftmost (then the upper) of the two."""
    img = _pixels(objects)
    (c0, _), (c1, _) = _named(caption)
    ys0, xs0 = np.nonzero(_mask(img, c0))
    ys1, xs1 = np.nonzero(_mask(img, c1))
    return float((xs0.mean(), ys0.mean()) < (xs1.mean(), ys1.mean()))


def shape_position_scorer(caption, objects):
    """Positions only: the first-named shape is the leftmost object."""
    first = _named(caption)[0][1]
    left = min(objects, key=lambda o: (o[2][0], o[2][1]))
    return float(left[0] == first)


def caption_prior_scorer(caption, objects):
    """A preference for one caption string, whatever the image."""
    return float(zlib.crc32(caption.encode()) % 1000)


def bag_of_words_scorer(caption, objects):
    """Overlap of the caption's words with the words of the image's objects (colours and shapes)."""
    image_words = Counter([o[1] for o in objects] + [o[0] for o in objects])
    return float(sum((Counter(caption.split(" ")) & image_words).values()))


def binding_scorer(caption, objects):
    """Given the binding: how many named (colour, shape) pairs the image holds."""
    return float(sum((c, s) in {(o[1], o[0]) for o in objects} for c, s in _named(caption)))


def _sim(case, scorer) -> torch.Tensor:
    return torch.tensor([[scorer(case.captions[c], case.objects[i]) for i in (0, 1)] for c in (0, 1)])


@pytest.mark.parametrize("scorer", [colour_scorer, colour_position_scorer, shape_position_scorer,
                                    caption_prior_scorer, bag_of_words_scorer])
def test_blind_scorers_are_at_chance(scorer):
    """The pair accuracy (the matched pairs outscore the crossed ones; chance 0.5) of every scorer
    that does not bind colours to shapes lies within the 99% binomial interval of 0.5."""
    acc = [pair_assignment(_sim(case, scorer)) for case in _cases()]
    mean = sum(acc) / len(acc)
    assert abs(mean - 0.5) <= 2.576 * math.sqrt(0.25 / len(acc)), (scorer.__name__, mean)


def test_colour_position_scorer_is_decisive_on_the_pairs():
    """The colour-position scorer (what solves the relation twins) never ties on a pair: its chance
    score comes from the random order of mention, not from abstaining (a tie scores exactly 0.5)."""
    picks = [pair_assignment(_sim(case, colour_position_scorer)) for case in _cases()]
    assert set(picks) == {0.0, 1.0}


def test_a_scorer_given_the_binding_solves_every_case():
    cases = _cases("heldout", 200) + _cases("val", 200)
    assert all(pair_assignment(_sim(case, binding_scorer)) == 1.0 for case in cases)
    assert all(winoground_scores(_sim(case, binding_scorer)) == (True, True, True) for case in cases)


def test_cases_hold_two_shapes_two_colours_one_layout_and_no_other_words():
    for case in _cases(n=100):
        (a, b), (a2, b2) = case.objects
        assert a[0] != b[0] and a[1] != b[1]  # two shapes, two colours
        assert (a2[0], a2[2], b2[0], b2[2]) == (a[0], a[2], b[0], b[2])  # same shapes in the same boxes
        assert (a2[1], b2[1]) == (b[1], a[1])  # colours exchanged
        w0, h0 = a[2][2] - a[2][0], a[2][3] - a[2][1]
        assert w0 == pytest.approx(b[2][2] - b[2][0], abs=1e-3) and h0 == pytest.approx(b[2][3] - b[2][1], abs=1e-3)
        assert w0 == pytest.approx(0.32, abs=1e-3) and h0 == pytest.approx(0.32, abs=1e-3)  # never cut by the border
        for caption, objects in zip(case.captions, case.objects):
            words = set(caption.split(" "))
            assert words <= COLOUR_WORDS | set(SHAPES) | {"a", "an", "and"}
            assert sorted(_named(caption)) == sorted((o[1], o[0]) for o in objects)
        assert Counter(case.captions[0].split(" ")) == Counter(case.captions[1].split(" "))
    # the order of mention is random: about half the captions name image 0's left object first
    firsts = [_named(c.captions[0])[0][1] == min(c.objects[0], key=lambda o: o[2][0])[0] for c in _cases()]
    assert 0.4 < sum(firsts) / len(firsts) < 0.6


def test_heldout_cases_name_a_held_pair_and_the_others_none():
    for case in _cases("heldout", 200):
        assert set(_named(case.captions[0])) & HELD
    for split in ("train", "val"):
        for case in _cases(split, 200):
            assert not (set(_named(case.captions[0])) | set(_named(case.captions[1]))) & HELD
    # splits are different draws; a case is a pure function of its arguments
    assert _cases("val", 20) != _cases("train", 20) and _cases("val", 20) == _cases("val", 20)


def test_make_synthetic_records_the_pairs_and_they_are_evaluated_per_split(tmp_path):
    from powerclip.eval.synthetic import load_synthetic

    make_synthetic(tmp_path, train_shards=1, val_shards=1, heldout_shards=1, per_shard=4, image_size=SIZE,
                   num_colours=NUM_COLOURS, binding_pairs=12)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["binding_pairs"]["cases"] == 12
    assert pair_cases(manifest, "heldout") == _cases("heldout", 12)
    for split in ("train", "val", "heldout"):
        bench = load_synthetic(tmp_path, split)
        assert bench.pairs is not None and len(bench.pairs.cases) == 12 and len(bench.pairs.images) == 24
        assert bench.pairs.images[0].load().size == (SIZE, SIZE)
    # a folder that is not one of the generator's splits has no pairs
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "00000.tar").symlink_to(tmp_path / "val" / "00000.tar")
    assert load_synthetic(tmp_path, "other").pairs is None
    # and a dataset written without them neither
    make_synthetic(tmp_path / "none", train_shards=0, val_shards=1, heldout_shards=0, per_shard=4, binding_pairs=0)
    assert load_synthetic(tmp_path / "none", "val").pairs is None


# ---------------------------------------------------------------------------------- single objects
def test_single_object_cases_hold_one_object_whose_class_is_the_label():
    from powerclip.data.synthetic import class_names
    from powerclip.data.synthetic_pairs import single_object_case

    names = class_names(tuple(list(PALETTE)[:NUM_COLOURS]))
    for split in ("val", "heldout"):
        cases = [single_object_case(i, split, 0, HELD, NUM_COLOURS) for i in range(300)]
        labels = set()
        for c in cases:
            assert len(c.objects) == 1
            shape, colour, box = c.objects[0]
            assert names[c.label] == f"{colour} {shape}"
            # heldout: only held pairs (never named in training); val: none of them
            assert ((colour, shape) in HELD) == (split == "heldout")
            px = _pixels(c.objects)
            assert (px != np.asarray((90, 90, 90))).any(-1).sum() > 20  # the object is drawn
            labels.add(c.label)
        # the classes spread over the split's pairs: no class holds over 4x its uniform share
        classes = len(HELD) if split == "heldout" else len(names) - len(HELD)
        top = Counter(c.label for c in cases).most_common(1)[0][1]
        assert len(labels) >= min(classes, 100) * 0.9 and top <= 4 * len(cases) / classes
    assert single_object_case(7, "val", 0, HELD, NUM_COLOURS) == single_object_case(7, "val", 0, HELD, NUM_COLOURS)


def test_make_synthetic_records_the_single_objects_and_they_are_evaluated_per_split(tmp_path):
    from powerclip.eval.synthetic import load_synthetic

    make_synthetic(tmp_path, train_shards=1, val_shards=1, heldout_shards=1, per_shard=4, image_size=SIZE,
                   num_colours=NUM_COLOURS, binding_pairs=0, single_objects=10)
    for split in ("val", "heldout"):
        bench = load_synthetic(tmp_path, split)
        assert bench.single is not None and len(bench.single.images) == 10 and bench.pairs is None
        assert bench.single.images[0].load().size == (SIZE, SIZE)
    make_synthetic(tmp_path / "none", train_shards=0, val_shards=1, heldout_shards=0, per_shard=4, single_objects=0)
    assert load_synthetic(tmp_path / "none", "val").single is None
