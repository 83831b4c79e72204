"""Loaders for the published compositional benchmarks, all turned into image–caption selection cases.

A ``SelectionSet`` is a list of cases (one image, several captions, the index of the right caption);
images are referenced, not loaded, and deduplicated so every distinct image (or crop) is encoded once.
Caption order follows each reference implementation, so ``argmax`` tie-breaking matches it too.

* SugarCrepe (RAIVNLab/sugar-crepe, also clip_benchmark ``sugar_crepe/*``): ``ROOT/{add_att, add_obj,
  replace_att, replace_obj, replace_rel, swap_att, swap_obj}.json`` = ``{id: {"filename", "caption",
  "negative_caption"}}``; images ``IMAGES/filename`` with IMAGES defaulting to ``ROOT/val2017``
  (clip_benchmark's layout). Captions [caption, negative], right = 0.
* ARO (mertyg/vision-language-models-are-bows): ``visual_genome_relation.json`` and
  ``visual_genome_attribution.json`` = lists of {"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h",
  "true_caption", "false_caption", "relation_name" | "attributes"}; images ``ROOT/images/image_path``,
  cropped to the box. Captions [false, true], right = 1. ``acc`` is the micro accuracy; ``macro_acc``
  is the paper's number: mean over relations without the ARO notebook's symmetric-relation list (VG-R),
  mean over attribute pairs with >= 25 cases (VG-A).
  COCO-Order / Flickr30k-Order: ``coco_karpathy_test.json`` / ``flickr30k_test.json`` = lists of
  {"image", "caption": [...]}; images ``ROOT/image``. Each caption gives one case: [caption and four
  perturbations: shuffle nouns+adjectives, shuffle all but nouns+adjectives, shuffle within trigrams,
  shuffle trigrams], all normalised by ARO's ``pre_caption`` (30 words), right = 0. Tags from spaCy
  (``en_core_web_sm*``), tokens for trigrams from spaCy too (ARO used nltk's word_tokenize), seeded.
* VALSE (Heidelberg-NLP/VALSE): ``ROOT/*.json`` = ``{id: {"dataset", "image_file", "caption", "foil",
  "mturk": {"caption": votes, ...}}}``; images ``IMAGES/image_file`` or ``IMAGES/<dataset>/image_file``.
  Only valid foils (``mturk.caption >= 2``, the VALSE README's rule) unless ``all_valse=True``.
  Captions [caption, foil], right = 0; metric is the pairwise accuracy acc_r.
* Winoground: ``ROOT/examples.jsonl`` rows {"image_0", "image_1", "caption_0", "caption_1", ...};
  images ``ROOT/images/<image_k>.png`` (any extension accepted); or the hub's parquet files
  (``ROOT/data/*.parquet``, images inline). Metrics carry clip_benchmark's names: ``text_acc``
  (the paper's text score), ``image_acc`` (image score), ``acc`` (group score).
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from powerclip.config import EVAL_TASK_PARTS
from powerclip.eval.sources import BytesImage, FileImage, ImageRef, require_file

SUGARCREPE_TASKS = EVAL_TASK_PARTS["sugar_crepe"]
ARO_TASKS = EVAL_TASK_PARTS["aro"]
ARO_FILES = {
    "vg_relation": "visual_genome_relation.json",
    "vg_attribution": "visual_genome_attribution.json",
    "coco_order": "coco_karpathy_test.json",
    "flickr30k_order": "flickr30k_test.json",
}
# relations the ARO authors drop from the VG-Relation macro accuracy (their replication notebook)
ARO_SYMMETRIC_RELATIONS = frozenset("""adjusting|attached to|between|bigger than|biting|boarding|brushing|
chewing|cleaning|climbing|close to|coming from|coming out of|contain|crossing|dragging|draped over|drinking|
drinking from|driving|driving down|driving on|eating from|eating in|enclosing|exiting|facing|filled with|
floating in|floating on|flying|flying above|flying in|flying over|flying through|full of|going down|
going into|going through|grazing in|growing in|growing on|guiding|hanging from|hanging in|hanging off|
hanging over|higher than|holding onto|hugging|in between|jumping off|jumping on|jumping over|kept in|
larger than|leading|leaning over|leaving|licking|longer than|looking in|looking into|looking out|
looking over|looking through|lying next to|lying on top of|making|mixed with|mounted on|moving|
on the back of|on the edge of|on the front of|on the other side of|opening|painted on|parked at|
parked beside|parked by|parked in|parked in front of|parked near|parked next to|perched on|petting|
piled on|playing|playing in|playing on|playing with|pouring|reaching for|reading|reflected on|riding on|
running in|running on|running through|seen through|sitting behind|sitting beside|sitting by|
sitting in front of|sitting near|sitting next to|sitting under|skiing down|skiing on|sleeping in|
sleeping on|smiling at|sniffing|splashing|sprinkled on|stacked on|standing against|standing around|
standing behind|standing beside|standing in front of|standing near|standing next to|staring at|stuck in|
surrounding|swimming in|swinging|talking to|topped with|touching|traveling down|traveling on|tying|
typing on|underneath|wading in|waiting for|walking across|walking by|walking down|walking next to|
walking through|working in|working on|worn on|wrapped around|wrapped in|by|of|near|next to|with|beside|
on the side of|around""".replace("\n", "").split("|"))


@dataclass
class SelectionCase:
    image: int  # index into SelectionSet.images
    captions: list[str]
    correct: int
    group: str | None = None  # relation / attribute pair, for macro averages


@dataclass
class SelectionSet:
    name: str
    images: list[ImageRef]
    cases: list[SelectionCase]
    macro: str | None = None  # "vg_relation" | "vg_attribution": how to macro-average groups
    meta: dict = field(default_factory=dict)
    # how a tie between the right caption and another one counts, as each benchmark's own script does:
    # "strict" (SugarCrepe, VALSE: right only if its score is strictly the highest) or "first"
    # (ARO: numpy argmax, the first of equal scores wins)
    ties: str = "strict"


@dataclass
class WinogroundCase:
    images: tuple[int, int]
    captions: tuple[str, str]


@dataclass
class WinogroundSet:
    name: str
    images: list[ImageRef]
    cases: list[WinogroundCase]


class _ImageTable:
    """Deduplicates image references so each distinct image/crop is encoded once."""

    def __init__(self) -> None:
        self.refs: list[ImageRef] = []
        self._index: dict[ImageRef, int] = {}

    def add(self, ref: ImageRef) -> int:
        if ref not in self._index:
            self._index[ref] = len(self.refs)
            self.refs.append(ref)
        return self._index[ref]


def _load_json(path: Path, what: str):
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e}") from None


def _field(entry: dict, key: str, where: str):
    if key not in entry:
        raise ValueError(f"{where}: missing field {key!r}")
    return entry[key]


# ------------------------------------------------------------------------------ SugarCrepe
def _select_tasks(benchmark: str, known: Sequence[str], file_of, root: Path,
                  tasks: Sequence[str] | None) -> list[str]:
    """The requested tasks (every one whose file is in ``root`` when None), each checked known."""
    if tasks is None:
        tasks = [t for t in known if (root / file_of(t)).is_file()]
        if not tasks:
            raise FileNotFoundError(f"{benchmark}: none of {[file_of(t) for t in known]} in {root}")
    for task in tasks:
        if task not in known:
            raise ValueError(f"{benchmark}: unknown task {task!r}; one of {known}")
    return list(tasks)


def load_sugarcrepe(root: str | Path, tasks: Sequence[str] | None = None,
                    images: str | Path | None = None) -> list[SelectionSet]:
    """One SelectionSet per SugarCrepe json; ``tasks=None`` takes every one of the seven present."""
    root = Path(root)
    image_root = Path(images) if images else root / "val2017"
    out = []
    for task in _select_tasks("SugarCrepe", SUGARCREPE_TASKS, lambda t: f"{t}.json", root, tasks):
        path = root / f"{task}.json"
        ann = _load_json(path, f"SugarCrepe {task}")
        table, cases = _ImageTable(), []
        for key, entry in ann.items():
            where = f"{path} entry {key!r}"
            img = table.add(FileImage(str(image_root / _field(entry, "filename", where))))
            cases.append(SelectionCase(img, [_field(entry, "caption", where),
                                             _field(entry, "negative_caption", where)], 0))
        out.append(SelectionSet(f"sugar_crepe/{task}", table.refs, cases))
    return out


# ------------------------------------------------------------------------------------ ARO
def load_aro(root: str | Path, tasks: Sequence[str] | None = None, seed: int = 0,
             max_words: int = 30) -> list[SelectionSet]:
    """ARO sets; ``tasks=None`` takes every one whose annotation file is in ROOT."""
    root = Path(root)
    out = []
    for task in _select_tasks("ARO", ARO_TASKS, lambda t: ARO_FILES[t], root, tasks):
        if task in ("vg_relation", "vg_attribution"):
            out.append(_load_aro_vg(root, task))
        else:
            out.append(_load_aro_order(root, task, seed, max_words))
    return out


def _load_aro_vg(root: Path, task: str) -> SelectionSet:
    path = root / ARO_FILES[task]
    data = _load_json(path, f"ARO {task}")
    table, cases = _ImageTable(), []
    for i, item in enumerate(data):
        where = f"{path} item {i}"
        x, y = float(_field(item, "bbox_x", where)), float(_field(item, "bbox_y", where))
        w, h = float(_field(item, "bbox_w", where)), float(_field(item, "bbox_h", where))
        ref = FileImage(str(root / "images" / _field(item, "image_path", where)), (x, y, x + w, y + h))
        if task == "vg_relation":
            group = str(_field(item, "relation_name", where))
        else:
            attrs = _field(item, "attributes", where)
            group = f"{attrs[0]}_{attrs[1]}"
        cases.append(SelectionCase(table.add(ref), [_field(item, "false_caption", where),
                                                    _field(item, "true_caption", where)], 1, group))
    return SelectionSet(f"aro/{task}", table.refs, cases, macro=task, ties="first")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """ARO's (BLIP's) caption normalisation: lower-case, punctuation to spaces, truncate."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


_NOUN_TAGS = {"NN", "NNS", "NNP", "NNPS"}
_ADJ_TAGS = {"JJ", "JJR", "JJS"}


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def order_perturbations(tokens: list[str], tags: list[str], rng: random.Random) -> list[str]:
    """ARO's four word-order perturbations of one tagged caption."""

    def shuffle_positions(tok: list[str], positions: list[int]) -> list[str]:
        tok = list(tok)
        values = [tok[i] for i in positions]
        rng.shuffle(values)
        for i, v in zip(positions, values):
            tok[i] = v
        return tok

    nouns = [i for i, t in enumerate(tags) if t in _NOUN_TAGS]
    adjs = [i for i, t in enumerate(tags) if t in _ADJ_TAGS]
    others = [i for i, t in enumerate(tags) if t not in _NOUN_TAGS | _ADJ_TAGS]
    a = shuffle_positions(shuffle_positions(tokens, nouns), adjs)
    b = shuffle_positions(tokens, others)
    tri = _trigrams(tokens)
    within = []
    for t in tri:
        t = list(t)
        rng.shuffle(t)
        within.append(" ".join(t))
    across = [" ".join(t) for t in tri]
    rng.shuffle(across)
    return [" ".join(a), " ".join(b), " ".join(within), " ".join(across)]


def _spacy_tagger():
    import spacy

    names = [n for n in spacy.util.get_installed_models() if n.startswith("en_core_web_sm")]
    if not names:
        raise RuntimeError("ARO order tasks need a spaCy English model (en_core_web_sm*) for POS tags")
    return spacy.load(names[0], exclude=["parser", "ner", "lemmatizer", "senter"])


def _load_aro_order(root: Path, task: str, seed: int, max_words: int) -> SelectionSet:
    path = root / ARO_FILES[task]
    data = _load_json(path, f"ARO {task}")
    table = _ImageTable()
    pairs = []
    for i, ann in enumerate(data):
        where = f"{path} item {i}"
        img = table.add(FileImage(str(root / _field(ann, "image", where))))
        for cap in _field(ann, "caption", where):
            pairs.append((img, cap))
    nlp = _spacy_tagger()
    rng = random.Random(seed)
    cases = []
    for (img, cap), doc in zip(pairs, nlp.pipe([c for _, c in pairs], batch_size=256)):
        tokens, tags = [t.text for t in doc], [t.tag_ for t in doc]
        options = [cap] + order_perturbations(tokens, tags, rng)
        cases.append(SelectionCase(img, [pre_caption(o, max_words) for o in options], 0))
    return SelectionSet(f"aro/{task}", table.refs, cases, ties="first")


# ---------------------------------------------------------------------------------- VALSE
def load_valse(root: str | Path, images: str | Path | None = None, files: Sequence[str] | None = None,
               all_valse: bool = False) -> list[SelectionSet]:
    """One SelectionSet per VALSE json in ROOT (or the given file names)."""
    root = Path(root)
    image_root = Path(images) if images else root / "images"
    paths = [root / f for f in files] if files else sorted(root.glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"VALSE: no *.json piece files in {root}")
    out = []
    for path in paths:
        ann = _load_json(path, "VALSE")
        table, cases = _ImageTable(), []
        for key, e in ann.items():
            where = f"{path} entry {key!r}"
            if not all_valse and int(_field(e, "mturk", where).get("caption", 0)) < 2:
                continue
            fname = _field(e, "image_file", where)
            direct, nested = image_root / fname, image_root / str(e.get("dataset", "")) / fname
            if direct.is_file() or not nested.is_file():
                ref = FileImage(str(direct))  # a missing image is reported by this path
            else:
                ref = FileImage(str(nested))
            cases.append(SelectionCase(table.add(ref), [_field(e, "caption", where), _field(e, "foil", where)], 0))
        out.append(SelectionSet(f"valse/{path.stem}", table.refs, cases))
    return out


# ------------------------------------------------------------------------------ Winoground
def load_winoground(root: str | Path) -> WinogroundSet:
    """``ROOT/examples.jsonl`` + ``ROOT/images/``, or else the hub's parquet layout
    (``ROOT/data/*.parquet``, or parquet files directly in ROOT)."""
    root = Path(root)
    if not (root / "examples.jsonl").is_file():
        parquet = sorted((root / "data").glob("*.parquet")) or sorted(root.glob("*.parquet"))
        if parquet:
            return _load_winoground_parquet(parquet)
    path = require_file(root / "examples.jsonl", "Winoground (examples.jsonl + images/, or data/*.parquet)")
    table, cases = _ImageTable(), []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        e = json.loads(line)
        where = f"{path} line {n + 1}"
        ids = []
        for k in ("image_0", "image_1"):
            ids.append(table.add(FileImage(str(_winoground_image(root / "images", _field(e, k, where))))))
        cases.append(WinogroundCase((ids[0], ids[1]), (_field(e, "caption_0", where), _field(e, "caption_1", where))))
    return WinogroundSet("winoground", table.refs, cases)


def _load_winoground_parquet(files: Sequence[Path]) -> WinogroundSet:
    """The hub's layout (facebook/winoground): columns image_0/image_1 as ``{"bytes", "path"}``
    structs (the datasets library's Image feature), caption_0/caption_1 as strings."""
    import pyarrow.parquet as pq

    table, cases = _ImageTable(), []
    for f in files:
        rows = pq.read_table(f).to_pylist()
        for n, e in enumerate(rows):
            where = f"{f} row {n}"
            ids = []
            for k in ("image_0", "image_1"):
                cell = _field(e, k, where)
                data = cell.get("bytes") if isinstance(cell, dict) else None
                if not data:
                    raise ValueError(f"Winoground: {where}: {k} holds no image bytes")
                ids.append(table.add(BytesImage(f"{where} {k}", data)))
            cases.append(WinogroundCase((ids[0], ids[1]), (_field(e, "caption_0", where), _field(e, "caption_1", where))))
    if not cases:
        raise ValueError(f"Winoground: the parquet files {[str(f) for f in files]} hold no rows")
    return WinogroundSet("winoground", table.refs, cases)


def _winoground_image(folder: Path, stem: str) -> Path:
    for ext in (".png", ".jpg", ".jpeg", ".webp"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return folder / f"{stem}.png"  # reported as missing


# ----------------------------------------------------------------------------------- scores
def macro_accuracy(kind: str, groups: list[str | None], correct: list[bool]) -> float:
    """ARO's per-relation / per-attribute-pair macro accuracy (see module docstring)."""
    by: dict[str, list[bool]] = defaultdict(list)
    for g, c in zip(groups, correct):
        by[str(g)].append(c)
    if kind == "vg_relation":
        accs = [sum(v) / len(v) for g, v in by.items() if g not in ARO_SYMMETRIC_RELATIONS]
    else:
        accs = [sum(v) / len(v) for v in by.values() if len(v) >= 25]
    return sum(accs) / len(accs) if accs else float("nan")
