"""Binding pairs (a synthetic benchmark that only binding colours to shapes can solve) and single
objects (a zero-shot set whose label is the only true one).

A case is two images and two captions. Image 0 holds two objects of two different shapes and two
different colours, drawn at the same size on two distinct cells of the 3x3 layout; image 1 is the same
layout with the two colours exchanged. Caption c names image c's objects and nothing else: "a red
circle and a blue square" against "a blue circle and a red square". The order of mention is random
(and the same in both captions), and no relation, position or size word is said.

Why this design: both images hold the same colours, the same shapes and the same positions, and both
captions the same bag of words; what differs is only which colour sits on which shape. So a scorer that
sees colours (their areas, their positions, their order of mention), positions, shapes, the bag of
words, or a preference for one caption string, has no information about which caption goes with which
image; only the binding does. The scenes of the older binding twins (``synthetic.twin_objects``) say a
relation whose arguments are the swapped objects, so matching the colours' positions to the relation
word solves them without binding; they remain a secondary measure of that.

Image size and legibility: a case is drawn by the generator's one renderer at the dataset's own image
size (what the models train on, so the pixels are in the training distribution) and at the largest
object size the data draws (``SIZES["large"]``: 20 px wide at 64 px, twice the area of the small size
that most training objects have), which is where shapes are most legible without leaving that
distribution.

Single objects: the scenes' zero-shot label is their first-named object, which is ill-posed for a
scene of two or three objects (another class is as true of the image). A single-object case holds one
object, so its class is the only true label; heldout cases are the held pairs, never named in training.

The cases are not stored: each is a pure function of (seed, split, index, vocabulary), drawn when
evaluated (``pair_case``). Rendering two 64-px images is far cheaper than reading them from a tar, and
the manifest records everything that defines the set (its seed, vocabulary, heldout pairs, image size
and ``binding_pairs: {"cases": N}``, written by make_synthetic).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from powerclip.data.synthetic import SHAPES, SIZES, Obj, class_names, colour_vocabulary

PAIR_SIZE = "large"  # both objects drawn at the data's largest size (see the module docstring)
# jitter of an object's centre (fraction of the side): at the pair size a box nearly fills its cell
# (half-extent 0.16 of a 1/6 half-cell), so any larger jitter would cut an object by the image border or
# overlap its neighbour, making the two objects unequal and less legible
JITTER = 1 / 6 - SIZES[PAIR_SIZE] - 1e-3

Drawn = list[tuple[str, str, list[float]]]  # (shape, colour, box) per object: synthetic.draw_objects' input


@dataclass(frozen=True)
class PairCase:
    """Two images (as drawable objects) and their two captions: caption c is true of image c only."""

    objects: tuple[Drawn, Drawn]
    captions: tuple[str, str]


def _pick(rng: random.Random, split: str, colours: tuple[str, ...],
          held: set[tuple[str, str]]) -> tuple[tuple[str, str], tuple[str, str]]:
    """(shape 0, shape 1), (colour 0, colour 1) of image 0. Heldout: image 0's first object is a held
    pair (so its caption names a pair never named in training). Other splits: none of the four pairs
    of the case (both images) is held."""
    if split == "heldout":
        if not held:
            raise ValueError("the heldout binding pairs need heldout (colour, shape) pairs")
        colour0, shape0 = rng.choice(sorted(held))
        shape1 = rng.choice([s for s in SHAPES if s != shape0])
        colour1 = rng.choice([c for c in colours if c != colour0])
        return (shape0, shape1), (colour0, colour1)
    for _ in range(1000):
        shapes = tuple(rng.sample(SHAPES, 2))
        cols = tuple(rng.sample(colours, 2))
        pairs = {(cols[0], shapes[0]), (cols[1], shapes[1]), (cols[1], shapes[0]), (cols[0], shapes[1])}
        if not pairs & held:
            return shapes, cols  # type: ignore[return-value]
    raise ValueError("no binding pair avoids the heldout pairs: the colour vocabulary is too small")


def pair_case(index: int, split: str, seed: int, held: set[tuple[str, str]],
              num_colours: int) -> PairCase:
    """Case ``index`` of ``split``: a pure function of its arguments (``held`` as in the manifest)."""
    colours = colour_vocabulary(num_colours)
    rng = random.Random(f"{seed}-pairs-{split}-{index}")
    shapes, cols = _pick(rng, split, colours, held)
    cells = rng.sample([(c, r) for c in range(3) for r in range(3)], 2)
    jitters = [(rng.uniform(-JITTER, JITTER), rng.uniform(-JITTER, JITTER)) for _ in range(2)]
    first = rng.randrange(2)  # which object is named first: independent of the layout and the colours
    order = (first, 1 - first)
    drawn: list[Drawn] = []
    captions: list[str] = []
    for colour_of in (cols, (cols[1], cols[0])):  # image 0, then the same layout with colours exchanged
        objs = [Obj(shapes[k], colour_of[k], None, cells[k]) for k in range(2)]
        boxes = [_box(objs[k], jitters[k]) for k in range(2)]
        drawn.append([(o.shape, o.colour, b) for o, b in zip(objs, boxes)])
        captions.append(" and ".join(objs[k].np_text() for k in order))
    return PairCase((drawn[0], drawn[1]), (captions[0], captions[1]))


def _box(obj: Obj, jitter: tuple[float, float]) -> list[float]:
    """The object's box at the pair size (the caption says no size: ``obj.size`` is None)."""
    return Obj(obj.shape, obj.colour, PAIR_SIZE, obj.cell).box(jitter)


def _manifest_cases(manifest: dict, key: str, split: str, case: Callable) -> list:
    """``case(index, split, seed, held, num_colours)`` for every index the manifest's ``key`` entry
    counts (empty for a dataset written without that set)."""
    entry = manifest.get(key)
    if not entry or not entry.get("cases"):
        return []
    held = {tuple(p.split(" ", 1)) for p in manifest.get("heldout_pairs", [])}
    return [case(i, split, int(manifest["seed"]), held, int(manifest.get("num_colours", 7)))
            for i in range(int(entry["cases"]))]


def pair_cases(manifest: dict, split: str) -> list[PairCase]:
    """Every binding pair of ``split`` of a make_synthetic dataset (empty for a dataset written without)."""
    return _manifest_cases(manifest, "binding_pairs", split, pair_case)


# ---------------------------------------------------------------------------------- single objects
@dataclass(frozen=True)
class SingleObjectCase:
    """One object on the 3x3 layout and its zero-shot class (an index into ``class_names``)."""

    objects: Drawn
    label: int


def single_object_case(index: int, split: str, seed: int, held: set[tuple[str, str]],
                       num_colours: int) -> SingleObjectCase:
    """Zero-shot case ``index`` of ``split``: ONE object, so its class ("colour shape") is the only
    true label, which the scenes' first-named-object label of a multi-object image is not.

    The object is drawn like the data's (random cell, jitter and size of the generator's own range);
    heldout: a held (colour, shape) pair, never named in training; other splits: any other pair."""
    colours = colour_vocabulary(num_colours)
    rng = random.Random(f"{seed}-single-{split}-{index}")
    if split == "heldout":
        if not held:
            raise ValueError("the heldout single objects need heldout (colour, shape) pairs")
        colour, shape = rng.choice(sorted(held))
    else:
        colour, shape = rng.choice([(c, s) for c in colours for s in SHAPES if (c, s) not in held])
    size = rng.choice(("small", "large"))
    cell = (rng.randrange(3), rng.randrange(3))
    jitter = (rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))  # the generator's own scene jitter
    box = Obj(shape, colour, size, cell).box(jitter)
    return SingleObjectCase([(shape, colour, box)], class_names(colours).index(f"{colour} {shape}"))


def single_object_cases(manifest: dict, split: str) -> list[SingleObjectCase]:
    """Every single-object zero-shot case of ``split`` (empty for a dataset written without)."""
    return _manifest_cases(manifest, "single_objects", split, single_object_case)
