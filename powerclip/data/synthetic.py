"""Procedural compositional image-caption dataset: the project's embedded default data.

Why procedural: CI has no internet and no data, yet every loss needs what real shards carry
(parse spans, concept noun phrases, region boxes, hard negatives). A small grammar gives all of
that *exactly*, so the annotation, region and negative code paths are tested against ground truth.

Scene: 1-3 objects (shape x colour x size) on distinct cells of a 3x3 layout, drawn with PIL.
Caption grammar (every span below is known at construction time)::

    caption := clause [" and " NP]
    clause  := NP | NP " " REL " " NP                 REL in {left of, right of, above, below}
    NP      := "a " [SIZE " "] COLOUR " " SHAPE

Phrase nodes: every NP, every "REL NP" (labelled PP) and the ROOT (whole caption). Concepts:
the NPs. Evaluation negatives follow SugarCrepe's kinds; DeGLA training negatives follow
docs/losses.md §4's five kinds; both are generated from the grammar, never by string hacks on text.
The heldout split contains only scenes with at least one (colour, shape) pair that never occurs
in train/val, not even in their negatives (a compositional-generalisation probe).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from powerclip.outputs import check_output_dir

SCHEMA_VERSION = 1
GRAMMAR_PARSER = "synthetic-grammar"  # the annotation's "parser": its objects, boxes and negatives are exact

# Every colour the generator can name, RGB far from each other and from BACKGROUND (>= 50 apart).
# The first DEFAULT_COLOURS are the default vocabulary; ``num_colours`` takes a longer prefix.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "pink": (250, 150, 200),
    "brown": (120, 70, 30),
    "cyan": (40, 220, 230),
    "magenta": (230, 40, 200),
    "lime": (160, 240, 60),
    "navy": (20, 30, 110),
    "teal": (20, 130, 130),
    "maroon": (120, 20, 40),
    "olive": (120, 120, 20),
    "beige": (225, 205, 160),
    "gold": (200, 160, 20),
    "violet": (180, 120, 240),
    "turquoise": (60, 200, 160),
    "coral": (250, 110, 90),
    "lavender": (200, 190, 250),
    "silver": (175, 175, 180),
    "indigo": (75, 0, 130),
    "mint": (170, 250, 200),
    "azure": (130, 190, 250),
}
DEFAULT_COLOURS = 7
COLOURS: dict[str, tuple[int, int, int]] = dict(list(PALETTE.items())[:DEFAULT_COLOURS])
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.11, "large": 0.16}  # half-extent as a fraction of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a rendering of a {}.", "a {}."]
BACKGROUND = (90, 90, 90)
JPEG_QUALITY = 90  # image_format="jpg"


def colour_vocabulary(num_colours: int = DEFAULT_COLOURS) -> tuple[str, ...]:
    """The first ``num_colours`` colour words of PALETTE.

    Why a knob: with few colours, two scenes of one batch often hold the same colours and shapes
    bound differently ("red circle + blue square" and "blue circle + red square"); the contrastive
    loss then has to bind colours to shapes to tell them apart. With many colours such binding twins
    are rare in a batch, so matching the bag of words suffices for the loss (as for web captions), and
    the swap kinds measure whether a method adds binding. Zero-shot stays learnable: each colour is
    still seen often enough to be learned.
    """
    if not 2 <= num_colours <= len(PALETTE):
        raise ValueError(f"num_colours must be in [2, {len(PALETTE)}] (the palette), got {num_colours}")
    return tuple(list(PALETTE)[:num_colours])


def class_names(colours: tuple[str, ...]) -> list[str]:
    """Zero-shot classes ("colour shape") of a vocabulary, in the order the labels index."""
    return [f"{c} {s}" for c in colours for s in SHAPES]


@dataclass
class Obj:
    shape: str
    colour: str
    size: str | None  # None: the size word is not said (drawn small)
    cell: tuple[int, int]  # (col, row) in the 3x3 layout

    def np_text(self) -> str:
        first = self.size or self.colour
        words = ["an" if first[0] in "aeiou" else "a"] + ([self.size] if self.size else []) + [self.colour, self.shape]
        return " ".join(words)

    def box(self, jitter: tuple[float, float]) -> list[float]:
        half = SIZES[self.size or "small"]
        cx = (self.cell[0] + 0.5) / 3 + jitter[0]
        cy = (self.cell[1] + 0.5) / 3 + jitter[1]
        return [round(max(0.0, cx - half), 4), round(max(0.0, cy - half), 4),
                round(min(1.0, cx + half), 4), round(min(1.0, cy + half), 4)]


def heldout_pairs(seed: int, fraction: float = 0.15,
                  colours: tuple[str, ...] = tuple(COLOURS)) -> set[tuple[str, str]]:
    """(colour, shape) pairs reserved for the heldout split; each shape keeps most colours."""
    rng = random.Random(f"heldout-{seed}")
    pairs = [(c, s) for c in colours for s in SHAPES]
    n = max(1, round(fraction * len(pairs)))
    return set(rng.sample(pairs, n))


# ------------------------------------------------------------------------------------ captions
class Caption:
    """Builds a caption piece by piece, recording the char span of every grammar node."""

    def __init__(self) -> None:
        self.text = ""
        self.phrases: list[dict] = []
        self.concepts: list[dict] = []

    def add(self, s: str) -> tuple[int, int]:
        start = len(self.text)
        self.text += s
        return start, len(self.text)

    def add_np(self, obj: Obj) -> tuple[int, int]:
        start, end = self.add(obj.np_text())
        self.phrases.append({"label": "NP", "start": start, "end": end})
        self.concepts.append({"text": self.text[start:end], "start": start, "end": end})
        return start, end


def render_caption(objs: list[Obj], rel: str | None) -> Caption:
    """Caption for objs[0] REL objs[1] (if rel) and objs[2] (if present)."""
    cap = Caption()
    cap.add_np(objs[0])
    rest = 1
    if rel is not None:
        cap.add(" ")
        pp_start, _ = cap.add(rel + " ")
        _, np_end = cap.add_np(objs[1])
        cap.phrases.append({"label": "PP", "start": pp_start, "end": np_end})
        rest = 2
    for o in objs[rest:]:
        cap.add(" and ")
        cap.add_np(o)
    # same canonical order as powerclip.annotate (by position, ROOT last)
    cap.phrases.sort(key=lambda p: (p["start"], -p["end"], p["label"]))
    cap.phrases.append({"label": "ROOT", "start": 0, "end": len(cap.text)})
    return cap


def _relation_holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    return {"left of": a[0] < b[0], "right of": a[0] > b[0],
            "above": a[1] < b[1], "below": a[1] > b[1]}[rel]


def _text(objs: list[Obj], rel: str | None) -> str:
    return render_caption(objs, rel).text


def _copy(o: Obj, **kw) -> Obj:
    d = dict(shape=o.shape, colour=o.colour, size=o.size, cell=o.cell)
    d.update(kw)
    return Obj(**d)


def _names_forbidden(objs: list[Obj], forbid: set[tuple[str, str]]) -> bool:
    return any((o.colour, o.shape) in forbid for o in objs)


def eval_negatives(objs: list[Obj], rel: str | None, rng: random.Random,
                   forbid: frozenset[tuple[str, str]] = frozenset(),
                   colours: tuple[str, ...] = tuple(COLOURS)) -> dict[str, str]:
    """SugarCrepe-style hard negatives, each a caption that is false for this image.

    ``forbid``: (colour, shape) pairs no negative may name (the heldout pairs, outside the heldout
    split): a pair that only ever occurs in false captions would be a shortcut ("this pair means
    false") that a model trained on negatives learns and that the heldout split then punishes.
    A kind that cannot avoid a forbidden pair is left out.
    """
    out: dict[str, str] = {}
    pos = _text(objs, rel)
    i = rng.randrange(len(objs))
    # replace-att: one object's colour becomes a colour no object in the scene has
    free_colours = [c for c in colours if c != objs[i].colour and (c, objs[i].shape) not in forbid]
    new = list(objs)
    new[i] = _copy(objs[i], colour=rng.choice(free_colours))
    out["replace-att"] = _text(new, rel)
    # replace-obj: one object's shape becomes a different shape
    new = list(objs)
    new[i] = _copy(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape
                                              and (objs[i].colour, s) not in forbid]))
    out["replace-obj"] = _text(new, rel)
    if rel is not None:
        out["replace-rel"] = _text(objs, RELATIONS[rel])
    # add-obj: an object that is not in the scene
    present = {(o.colour, o.shape) for o in objs}
    extra = rng.choice([(c, s) for c in colours for s in SHAPES if (c, s) not in present and (c, s) not in forbid])
    out["add-obj"] = pos + " and " + Obj(extra[1], extra[0], None, (0, 0)).np_text()
    if len(objs) >= 2:
        a, b = objs[0], objs[1]
        if a.colour != b.colour:
            new = [_copy(a, colour=b.colour), _copy(b, colour=a.colour)] + objs[2:]
            if not _names_forbidden(new, forbid):
                out["swap-att"] = _text(new, rel)
        if a.shape != b.shape:
            new = [_copy(a, shape=b.shape), _copy(b, shape=a.shape)] + objs[2:]
            if not _names_forbidden(new, forbid):
                out["swap-obj"] = _text(new, rel)
    return {k: v for k, v in out.items() if v != pos}


def training_negatives(objs: list[Obj], rel: str | None, rng: random.Random,
                       forbid: frozenset[tuple[str, str]] = frozenset(),
                       colours: tuple[str, ...] = tuple(COLOURS)) -> list[dict]:
    """DeGLA's five kinds (docs/losses.md §4), generated from the grammar; inapplicable kinds are absent.

    No negative names a ``forbid`` pair (see ``eval_negatives``) and no text appears twice (two kinds
    can coincide, e.g. a reorder of two same-shape objects equals their colour swap; a duplicate
    would count one negative twice in the softmax).
    """
    pos = _text(objs, rel)
    out: list[dict] = []
    if rel is not None and len(objs) >= 2:
        # reorder: the two related NPs change places (the relation is asymmetric)
        out.append({"kind": "reorder", "text": _text([objs[1], objs[0]] + objs[2:], rel)})
    else:
        words = pos.split(" ")
        for _ in range(10):
            shuffled = rng.sample(words, len(words))
            if shuffled != words:
                out.append({"kind": "reorder", "text": " ".join(shuffled)})
                break
    if len(objs) >= 2:
        a, b = objs[0], objs[1]
        swapped = [_copy(a, shape=b.shape), _copy(b, shape=a.shape)] + objs[2:]
        if a.shape != b.shape and not _names_forbidden(swapped, forbid):
            out.append({"kind": "swap_nouns", "text": _text(swapped, rel)})
        swapped = [_copy(a, colour=b.colour), _copy(b, colour=a.colour)] + objs[2:]
        if a.colour != b.colour and not _names_forbidden(swapped, forbid):
            out.append({"kind": "swap_adjectives", "text": _text(swapped, rel)})
    i = rng.randrange(len(objs))
    new = list(objs)
    new[i] = _copy(objs[i], colour=rng.choice([c for c in colours if c != objs[i].colour
                                               and (c, objs[i].shape) not in forbid]))
    out.append({"kind": "replace_adjectives", "text": _text(new, rel)})
    new = list(objs)
    new[i] = _copy(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape
                                              and (objs[i].colour, s) not in forbid]))
    out.append({"kind": "replace_nouns", "text": _text(new, rel)})
    seen = {pos}
    unique = []
    for n in out:
        if n["text"] not in seen:
            seen.add(n["text"])
            unique.append(n)
    return unique


# -------------------------------------------------------------------------------------- scenes
def sample_scene(rng: random.Random, split: str, held: set[tuple[str, str]],
                 relation_prob: float = 1.0, colours: tuple[str, ...] = tuple(COLOURS)) -> tuple[list[Obj], str | None]:
    """Objects and relation for one sample; heldout scenes use >= 1 held pair, others none.

    ``relation_prob`` < 1: that share of multi-object scenes is said with a relation; the others are
    "NP and NP [and NP]" in a random order of mention. Why: with a relation the order of mention
    follows the layout ("X left of Y": X's colour is on the left), so a model can reject a colour
    swap by matching word order to image position, without binding colours to shapes; without one,
    only the binding tells "a red circle and a blue square" from its swap (a bag-of-words trap).
    1.0 (the default) draws exactly the same dataset as before the option existed.
    """
    n = rng.choice((1, 2, 2, 3))
    cells = rng.sample([(c, r) for c in range(3) for r in range(3)], n)
    rel: str | None = None
    said = relation_prob >= 1.0 or rng.random() < relation_prob
    if n >= 2 and said:
        options = [r for r in RELATIONS if _relation_holds(r, cells[0], cells[1])]
        rel = rng.choice(options) if options else None
        if rel is None and n == 2:
            # cells on the same row and column cannot happen (distinct cells): options is never empty
            raise AssertionError("no relation between distinct cells")
    pairs_ok = [(c, s) for c in colours for s in SHAPES if (c, s) not in held]
    held_list = sorted(held)
    objs: list[Obj] = []
    for k in range(n):
        if split == "heldout" and k == 0:
            colour, shape = rng.choice(held_list)
        else:  # no two objects of the same colour and shape: every object is nameable
            colour, shape = rng.choice([p for p in pairs_ok if p not in {(o.colour, o.shape) for o in objs}])
        size = rng.choice((None, "small", "large"))
        objs.append(Obj(shape=shape, colour=colour, size=size, cell=cells[k]))
    if split == "heldout" or not said:
        rng.shuffle(objs)  # the held pair is not always first; no relation: mention order is random
        # keep the relation true after shuffling the objects between the cells
        if n >= 2 and said:
            options = [r for r in RELATIONS if _relation_holds(r, objs[0].cell, objs[1].cell)]
            rel = rng.choice(options)
    return objs, rel


def draw_scene(objs: list[Obj], size: int, rng: random.Random) -> tuple[Image.Image, list[list[float]]]:
    boxes = [o.box((rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03))) for o in objs]
    return draw_objects([(o.shape, o.colour, box) for o, box in zip(objs, boxes)], size), boxes


def draw_objects(objects: list[tuple[str, str, list[float]]], size: int) -> Image.Image:
    """The image of ``(shape, colour, box)`` objects, boxes as fractions of the side: the one
    renderer, so a scene re-drawn from its annotation has exactly the pixels of the original."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for shape, colour, box in objects:
        x0, y0, x1, y1 = (v * size for v in box)
        col = PALETTE[colour]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=col)
        elif shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=col)
        elif shape == "triangle":
            d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=col)
        elif shape == "diamond":
            d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=col)
        elif shape == "cross":
            w = (x1 - x0) / 3
            d.rectangle([cx - w / 2, y0, cx + w / 2, y1], fill=col)
            d.rectangle([x0, cy - w / 2, x1, cy + w / 2], fill=col)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return img


def twin_objects(annotation: dict) -> tuple[list[tuple[str, str, list[float]]], str] | None:
    """The ``(shape, colour, box)`` objects of an annotated scene's colour-swapped twin (the first two
    objects exchange colours, everything else stays) and the twin's caption, which is the scene's
    swap-att negative. None where the scene has no swap-att negative or is not the grammar's own.

    Why: a scene and its twin hold the same bag of words and the same shapes in the same places, so
    only binding colours to shapes tells which caption goes with which image; scored as Winoground
    (text, image and group score), a bag-of-words model is at chance, and a caption prior alone
    (always preferring one of the two strings) scores no text point at all.
    """
    twin_caption = (annotation.get("eval_negatives") or {}).get("swap-att")
    objects = annotation.get("objects") or []
    if annotation.get("parser") != GRAMMAR_PARSER or twin_caption is None or len(objects) < 2:
        return None
    drawn = [(o["shape"], o["colour"], o["box"]) for o in objects]
    (s0, c0, b0), (s1, c1, b1) = drawn[0], drawn[1]
    return [(s0, c1, b0), (s1, c0, b1)] + drawn[2:], twin_caption


def binding_twin(annotation: dict, size: int) -> tuple[Image.Image, str] | None:
    """The colour-swapped twin of an annotated scene drawn at ``size`` px, and its caption
    (``twin_objects``); None where the scene has none."""
    twin = twin_objects(annotation)
    return None if twin is None else (draw_objects(twin[0], size), twin[1])


def make_sample(index: int, split: str, seed: int, image_size: int, held: set[tuple[str, str]],
                image_format: str = "png", relation_prob: float = 1.0, num_colours: int = DEFAULT_COLOURS) -> dict:
    """One webdataset sample dict; a pure function of its arguments (``held`` must come from
    ``heldout_pairs`` of the same seed and vocabulary)."""
    colours = colour_vocabulary(num_colours)
    rng = random.Random(f"{seed}-{split}-{index}")
    objs, rel = sample_scene(rng, split, held, relation_prob, colours)
    forbid = frozenset() if split == "heldout" else frozenset(held)
    img, boxes = draw_scene(objs, image_size, rng)
    cap = render_caption(objs, rel)
    ann = {
        "schema": SCHEMA_VERSION,
        "parser": GRAMMAR_PARSER,
        "caption": cap.text,
        "phrases": cap.phrases,
        "concepts": cap.concepts,
        "boxes": boxes,
        "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size or "small",
                     "box": b} for o, b in zip(objs, boxes)],
        "relation": rel,
        "label": class_names(colours).index(f"{objs[0].colour} {objs[0].shape}"),
        # outside the heldout split no text names a heldout pair, negatives included (eval_negatives)
        "negatives": training_negatives(objs, rel, rng, forbid, colours),
        "eval_negatives": eval_negatives(objs, rel, rng, forbid, colours),
    }
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    key = f"{split}_{index:08d}"
    return {"__key__": key, image_format: buf.getvalue(), "txt": cap.text.encode(),
            "json": json.dumps(ann).encode()}


def write_split(out: Path, split: str, num_shards: int, per_shard: int, seed: int, image_size: int,
                held: set[tuple[str, str]], image_format: str = "png", relation_prob: float = 1.0,
                num_colours: int = DEFAULT_COLOURS) -> dict[str, int]:
    """Write OUT/split/NNNNN.tar + sizes.json; returns the sizes mapping."""
    import webdataset as wds

    d = out / split
    d.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for s in range(num_shards):
        name = f"{s:05d}.tar"
        tmp = d / (name + ".tmp")
        # fixed integer mtime: byte-identical reruns, and no per-member pax header (a float mtime
        # makes tarfile add one), which halves the tar headers every reader parses
        with wds.TarWriter(str(tmp), mtime=0) as w:
            for i in range(per_shard):
                w.write(make_sample(s * per_shard + i, split, seed, image_size, held, image_format, relation_prob,
                                    num_colours))
        tmp.replace(d / name)
        sizes[name] = per_shard
    (d / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sizes


MARKER = ".synthetic"


def _is_synthetic(path: Path) -> bool:
    """An earlier synthetic dataset (regenerated in place: the same seed writes the same bytes)."""
    if (path / MARKER).is_file():
        return True
    try:
        return json.loads((path / "manifest.json").read_text()).get("generator") == "powerclip.data.synthetic"
    except (OSError, ValueError, AttributeError):
        return False


def make_synthetic(out: str | Path, train_shards: int = 4, val_shards: int = 1, heldout_shards: int = 1,
                   per_shard: int = 256, image_size: int = 64, seed: int = 0,
                   image_format: str = "png", relation_prob: float = 1.0, num_colours: int = DEFAULT_COLOURS,
                   binding_pairs: int = 2000, single_objects: int = 2000) -> dict:
    """Write the whole dataset under ``out``; returns the manifest dict (also written to disk).

    ``num_colours``: the colour vocabulary (``colour_vocabulary``); the default is the original one.
    ``binding_pairs``: cases per split of the binding pairs (``synthetic_pairs``), recorded in the
    manifest and drawn when evaluated (0: none). ``single_objects``: cases per split of the
    single-object zero-shot set (``synthetic_pairs.single_object_case``), likewise.
    """
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    if not 0.0 <= relation_prob <= 1.0:
        raise ValueError(f"relation_prob must be in [0, 1], got {relation_prob}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if binding_pairs < 0 or single_objects < 0:
        raise ValueError(f"binding_pairs and single_objects must be >= 0, got {binding_pairs}, {single_objects}")
    out = check_output_dir(out, _is_synthetic, "a synthetic dataset (tools/make_synthetic.py)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()  # first: an interrupted run's folder is still recognised as this tool's
    colours = colour_vocabulary(num_colours)
    held = heldout_pairs(seed, colours=colours)
    splits = {"train": train_shards, "val": val_shards, "heldout": heldout_shards}
    manifest: dict = {"generator": "powerclip.data.synthetic", "schema": SCHEMA_VERSION, "seed": seed,
                      "image_size": image_size, "image_format": image_format, "relation_prob": relation_prob,
                      "num_colours": num_colours, "heldout_pairs": sorted(f"{c} {s}" for c, s in held),
                      "binding_pairs": {"cases": binding_pairs}, "single_objects": {"cases": single_objects},
                      "splits": {}}
    for split, n in splits.items():
        if n <= 0:
            continue
        sizes = write_split(out, split, n, per_shard, seed, image_size, held, image_format, relation_prob,
                            num_colours)
        manifest["splits"][split] = {"shards": f"{split}/{{00000..{n - 1:05d}}}.tar",
                                     "num_samples": sum(sizes.values()), "skipped": []}
    (out / "classes.json").write_text(json.dumps({"classnames": class_names(colours), "templates": TEMPLATES}, indent=1))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
