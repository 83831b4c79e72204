"""Build annotated webdataset shards from real data (the logic behind tools/build_shards.py).

Inputs (``detect_input``):
* a folder of images with sidecar captions (``x.jpg`` + ``x.txt``), searched recursively; this
  also covers img2dataset's ``files`` output format;
* a table: ``.csv`` / ``.tsv`` / ``.parquet`` with an image-path column and a caption column
  (relative paths are relative to the table's folder), optionally a JSON ``boxes`` column;
* an img2dataset ``webdataset`` output folder (``*.tar`` with ``key.jpg|png|webp`` + ``key.txt``
  [+ ``key.json``, kept under ``source``]): re-annotated and re-sharded.

Output, all inside ``out``: ``NNNNN.tar`` (``{key}.jpg|png|webp``, ``{key}.txt``, ``{key}.json``
with the annotation schema of powerclip.annotate), ``sizes.json`` (shard name → count, what
open_clip reads), ``manifest.json`` (counts and every skipped input with its reason) and
``_build/`` (the plan and one record per finished shard, which is what makes a rerun resume).

Why a plan: items are enumerated and assigned to shards once, deterministically, and the plan's
hash is stored; a rerun with the same inputs redoes only shards without a finished record, and a
rerun with different inputs fails instead of mixing two datasets in one folder. Each shard is
written to ``NNNNN.tar.tmp`` and renamed when complete, so a killed build leaves no half shard.
Keys are generated (``SSSSSIIII``), never taken from input file names, so nothing can escape
``out``.

Symbolic links inside an input folder that lead out of it (an image, a caption or an input tar
whose real path is outside the folder's real path) are not followed unless ``follow_links`` is
set: a shared folder must not pull a private file elsewhere into the shards. Each refused link is
listed in the manifest (``refused_links``). A truncated input tar keeps the samples before the cut;
a key repeated in an input tar keeps its first sample, the repeats are listed as ``duplicate_key``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..outputs import check_output_dir
from .decode import MAX_PIXELS, ImageTooLargeError, decode_image
from .records import ListOf, read_finished, read_pinned
from .shard_pool import run_shards
from .stream import starts_sample

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
DEFAULT_MAX_PIXELS = MAX_PIXELS
TOOL = "tools/build_shards.py"
PLAN_SHAPE = {"hash": str, "inputs": ListOf(str), "items": int, "shard_size": int, "parser": str, "model": str,
              "follow_links?": bool, "refused_links?": ListOf(dict)}
RECORD_SHAPE = {"shard": str, "count": int, "skipped": ListOf({"input": str, "reason": str})}


@dataclass(frozen=True)
class Item:
    """One input sample, as primitives (travels to worker processes)."""

    kind: str  # file | tar
    source: str  # image path, or tar path
    name: str  # caption/sidecar path for files, member key for tars; shown in skip reports
    caption: str | None = None  # from a table
    boxes: str | None = None  # JSON list from a table

    @property
    def label(self) -> str:
        return self.source if self.kind == "file" else f"{self.source}#{self.name}"


# ------------------------------------------------------------------------------ enumeration
def _leaves_root(path: Path, real_root: Path) -> bool:
    """True when ``path`` is (or passes through) a symlink whose target is outside ``real_root``."""
    return not path.resolve().is_relative_to(real_root)


def _folder_items(root: Path, follow_links: bool, refused: list[dict]) -> list[Item]:
    items = []
    real_root = root.resolve()
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        txt = path.with_suffix(".txt")
        bad = [x for x in (path, txt) if x.exists() and not follow_links and _leaves_root(x, real_root)]
        if bad:
            refused.extend({"link": str(x), "target": str(x.resolve()), "input": str(path)} for x in bad)
            continue
        items.append(Item("file", str(path), str(txt)))
    return items


def _table_items(path: Path, image_col: str | None, caption_col: str | None, boxes_col: str | None) -> list[Item]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        delim = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=delim))
    if not rows:
        return []
    cols = list(rows[0].keys())

    def pick(given: str | None, options: tuple[str, ...], what: str) -> str:
        if given is not None:
            if given not in cols:
                raise ValueError(f"{path}: no column {given!r} (columns: {cols})")
            return given
        for o in options:
            if o in cols:
                return o
        raise ValueError(f"{path}: cannot find the {what} column among {cols}; pass --{what}-col")

    icol = pick(image_col, ("image", "filepath", "file", "path", "image_path"), "image")
    ccol = pick(caption_col, ("caption", "title", "text", "txt"), "caption")
    items = []
    for r in rows:
        p = Path(str(r[icol]))
        if not p.is_absolute():
            p = path.parent / p
        cap = r[ccol]
        items.append(Item("file", str(p), str(path), "" if cap is None else str(cap),
                          None if not boxes_col or r.get(boxes_col) in (None, "") else str(r[boxes_col])))
    return items


def read_members(tf: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], str | None]:
    """The members of ``tf`` up to the first unreadable header, and the error there (None if
    none): a tar cut short keeps everything before the cut."""
    members: list[tarfile.TarInfo] = []
    try:
        while (m := tf.next()) is not None:
            members.append(m)
    except (tarfile.TarError, OSError) as e:
        return members, f"{type(e).__name__}: {e}"
    return members, None


def index_members(members: list[tarfile.TarInfo]) -> tuple[dict[str, dict[str, tarfile.TarInfo]], list[str]]:
    """(key -> {member name: member} of the first sample with each key, the keys of later samples
    that repeat a key), grouped as the training reader groups a tar: consecutive members sharing a
    key, a member the sample already has starting the next one. A repeat is never merged."""
    index: dict[str, dict[str, tarfile.TarInfo]] = {}
    repeats: list[str] = []
    key, exts, current = None, set(), None
    for m in members:
        if not (m.isfile() and "." in m.name):
            continue
        k, ext = m.name.rsplit(".", 1)
        if current is None or starts_sample(k, ext.lower(), key, exts):
            key, exts = k, set()
            if k in index:
                repeats.append(k)
                current = {}  # filled, never listed
            else:
                current = index[k] = {}
        exts.add(ext.lower())
        current[m.name] = m
    return index, repeats


def _tar_items(root: Path, follow_links: bool, refused: list[dict]) -> list[Item]:
    items = []
    real_root = root.resolve()
    for tar in sorted(root.glob("*.tar")):
        if not follow_links and _leaves_root(tar, real_root):
            refused.append({"link": str(tar), "target": str(tar.resolve()), "input": str(tar)})
            continue
        try:
            with tarfile.open(tar) as tf:
                members, error = read_members(tf)
        except (tarfile.TarError, OSError) as e:
            items.append(Item("tar", str(tar), f"<unreadable: {type(e).__name__}>"))
            continue
        index, repeats = index_members(members)
        keys = sorted(k for k, ms in index.items() if any(n.lower().endswith(IMAGE_EXTS) for n in ms))
        items.extend(Item("tar", str(tar), k) for k in keys)
        items.extend(Item("tar", str(tar), f"<duplicate_key {k}>") for k in repeats)
        if error is not None:  # the samples after the cut are lost: say so in the manifest
            items.append(Item("tar", str(tar), f"<truncated after {len(keys)} samples: {error}>"))
    return items


def detect_input(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv", ".parquet"):
            return "table"
        raise ValueError(f"{path}: an input file must be .csv, .tsv or .parquet")
    if path.is_dir():
        return "img2dataset" if any(path.glob("*.tar")) else "folder"
    raise ValueError(f"input not found: {path}")


def enumerate_items(inputs: list[str], image_col: str | None = None, caption_col: str | None = None,
                    boxes_col: str | None = None, follow_links: bool = False,
                    refused: list[dict] | None = None) -> list[Item]:
    """Every input sample; links leaving a folder input are appended to ``refused`` instead."""
    items: list[Item] = []
    refused = [] if refused is None else refused
    for inp in inputs:
        p = Path(inp)
        kind = detect_input(p)
        if kind == "table":
            items.extend(_table_items(p, image_col, caption_col, boxes_col))
        elif kind == "img2dataset":
            items.extend(_tar_items(p, follow_links, refused))
        else:
            items.extend(_folder_items(p, follow_links, refused))
    return items


# ------------------------------------------------------------------------------ one shard
_ANNOTATOR = None


def _init_worker(parser: str, model: str) -> None:
    global _ANNOTATOR
    from ..annotate import Annotator

    _ANNOTATOR = Annotator(parser, model)


def _validate_image(data: bytes, max_pixels: int, name: str) -> tuple[bytes, str]:
    """Decode fully once; keep the original bytes for JPEG/PNG/WEBP, re-encode others as PNG."""
    img = decode_image(data, name, max_pixels, rgb=False)
    fmt = KEEP_FORMATS.get(img.format or "")
    if fmt is not None:
        return data, fmt
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def _load(item: Item, tars: dict) -> tuple[bytes, str, dict | None]:
    """Image bytes, caption, source json for one item (raises KeyError/OSError with a reason)."""
    if item.kind == "file":
        data = Path(item.source).read_bytes()
        if item.caption is not None:
            return data, item.caption, None
        txt = Path(item.name)
        if not txt.is_file():
            raise KeyError("missing_caption")
        return data, txt.read_text(encoding="utf-8", errors="replace"), None
    if item.name.startswith("<unreadable"):
        raise KeyError("unreadable_tar")
    if item.name.startswith("<truncated"):
        raise KeyError("truncated_tar")
    if item.name.startswith("<duplicate_key"):
        raise KeyError("duplicate_key")
    if item.source not in tars:  # open each input tar once per shard job and index it by key
        tf = tarfile.open(item.source)
        tars[item.source] = (tf, index_members(read_members(tf)[0])[0])
    tf, index = tars[item.source]
    members = index.get(item.name, {})
    img = next((m for n, m in sorted(members.items()) if n.lower().endswith(IMAGE_EXTS)), None)
    if img is None:
        raise KeyError("missing_image")
    data = tf.extractfile(img).read()
    txt = members.get(item.name + ".txt")
    if txt is None:
        raise KeyError("missing_caption")
    caption = tf.extractfile(txt).read().decode("utf-8", errors="replace")
    src = None
    if item.name + ".json" in members:
        try:
            src = json.loads(tf.extractfile(members[item.name + ".json"]).read())
        except ValueError:
            src = None
    return data, caption, src


def build_one_shard(out: str, shard: int, items: list[Item], max_pixels: int) -> dict:
    """Write out/NNNNN.tar atomically and its finished record; return the record."""
    import webdataset as wds

    assert _ANNOTATOR is not None, "worker not initialised"
    out_dir = Path(out)
    name = f"{shard:05d}.tar"
    ready, skipped = [], []
    tars: dict = {}
    for idx, item in enumerate(items):
        try:
            data, caption, src = _load(item, tars)
        except KeyError as e:
            skipped.append({"input": item.label, "reason": e.args[0]})
            continue
        except (OSError, tarfile.TarError) as e:  # a member cut by a truncation reads as TarError
            skipped.append({"input": item.label, "reason": f"unreadable: {type(e).__name__}"})
            continue
        caption = " ".join(caption.split())
        if not caption:
            skipped.append({"input": item.label, "reason": "empty_caption"})
            continue
        try:
            data, ext = _validate_image(data, max_pixels, item.label)
        except Exception as e:  # noqa: BLE001 - PIL raises many exception types for bad bytes
            skipped.append({"input": item.label, "reason": "too_large" if isinstance(e, ImageTooLargeError)
                            else "bad_image"})
            continue
        boxes = []
        if item.boxes:
            try:
                boxes = [[float(v) for v in b] for b in json.loads(item.boxes)]
            except (ValueError, TypeError):
                skipped.append({"input": item.label, "reason": "bad_boxes"})
                continue
        ready.append((f"{shard:05d}{idx:04d}", data, ext, caption, boxes, src))
    for tf, _ in tars.values():
        tf.close()
    anns = _ANNOTATOR.annotate_many([r[3] for r in ready])
    tmp = out_dir / (name + ".tmp")
    with wds.TarWriter(str(tmp), mtime=0) as w:  # integer mtime: no per-member pax header
        for (key, data, ext, caption, boxes, src), ann in zip(ready, anns):
            ann = {**ann, "boxes": boxes}
            if src is not None:
                ann["source"] = src
            w.write({"__key__": key, ext: data, "txt": caption.encode(), "json": json.dumps(ann).encode()})
    os.replace(tmp, out_dir / name)
    record = {"shard": name, "count": len(ready), "skipped": skipped}
    rec_path = out_dir / "_build" / f"{shard:05d}.json"
    rec_tmp = rec_path.with_suffix(".json.tmp")
    rec_tmp.write_text(json.dumps(record))
    os.replace(rec_tmp, rec_path)
    return record


def _build_task(args: tuple[str, int, list[Item], int]) -> dict:
    return build_one_shard(*args)


# ------------------------------------------------------------------------------ whole build
def _plan_hash(items: list[Item], shard_size: int, parser: str, model: str) -> str:
    h = hashlib.sha256(f"{shard_size}|{parser}|{model}".encode())
    for it in items:
        h.update(repr((it.kind, it.source, it.name, it.caption, it.boxes)).encode())
    return h.hexdigest()


def plan_build(inputs: list[str], out: str | Path, shard_size: int = 1000, parser: str = "spacy",
               model: str = "en_core_web_sm", image_col: str | None = None, caption_col: str | None = None,
               boxes_col: str | None = None, follow_links: bool = False) -> tuple[Path, list[list[Item]]]:
    """Enumerate the inputs, cut them into shards and record (or check) the plan in ``out``;
    returns (out resolved, items per shard). Deterministic: every task of a job array that calls
    it gets the same shards. Links refused by ``follow_links=False`` are recorded in the plan."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out).resolve()
    refused: list[dict] = []
    items = enumerate_items(inputs, image_col, caption_col, boxes_col, follow_links, refused)
    if not items:
        raise ValueError(f"no input samples found in {inputs}")
    # only a new or empty folder or an earlier build's (resumed): never overwrite others' shards
    check_output_dir(out, lambda p: (p / "_build").is_dir(), f"an output folder of {TOOL}")
    (out / "_build").mkdir(parents=True, exist_ok=True)
    plan_path = out / "_build" / "plan.json"
    digest = _plan_hash(items, shard_size, parser, model)
    if plan_path.is_file():
        old = read_pinned(plan_path, PLAN_SHAPE, TOOL)
        if old["hash"] != digest:
            raise ValueError(f"{out} holds a build of different inputs or settings; use an empty output folder")
    else:
        tmp = plan_path.with_suffix(f".{os.getpid()}.tmp")  # tasks of an array may race here
        tmp.write_text(json.dumps({"hash": digest, "inputs": inputs, "items": len(items),
                                   "shard_size": shard_size, "parser": parser, "model": model,
                                   "follow_links": follow_links, "refused_links": refused}))
        os.replace(tmp, plan_path)
    return out, [items[i:i + shard_size] for i in range(0, len(items), shard_size)]


def build_shards(inputs: list[str], out: str | Path, shard_size: int = 1000, workers: int = 1,
                 parser: str = "spacy", model: str = "en_core_web_sm", max_pixels: int = DEFAULT_MAX_PIXELS,
                 image_col: str | None = None, caption_col: str | None = None, boxes_col: str | None = None,
                 progress: bool = True, only: tuple[int, int] | None = None, write_manifest: bool = True,
                 follow_links: bool = False) -> dict:
    """Build (or resume building) shards; returns the manifest dict. ``only=(lo, hi)``: build
    shards lo..hi-1 of the plan only (one task of a job array), ``write_manifest=False``: leave
    sizes.json/manifest.json to the summary (``build_manifest``)."""
    out, chunks = plan_build(inputs, out, shard_size, parser, model, image_col, caption_col, boxes_col,
                             follow_links)
    mine = range(len(chunks)) if only is None else range(max(0, only[0]), min(len(chunks), only[1]))
    todo = [s for s in mine if _finished(out, s) is None]
    run_shards([(str(out), s, chunks[s], max_pixels) for s in todo], _build_task, workers=workers,
               initializer=_init_worker, initargs=(parser, model), desc="shards", progress=progress)
    manifest = build_manifest(out)
    manifest["resumed_shards"] = len(mine) - len(todo)
    if write_manifest:
        write_build_manifest(out, manifest)
    return manifest


def _finished(out: Path, shard: int) -> dict | None:
    """Shard ``shard``'s record when it is finished (the shard and a sound record exist)."""
    if not (out / f"{shard:05d}.tar").is_file():
        return None
    return read_finished(out / "_build" / f"{shard:05d}.json", RECORD_SHAPE)


def build_manifest(out: str | Path) -> dict:
    """The manifest of every finished shard in ``out``, from the plan and the shard records."""
    out = Path(out)
    plan = read_pinned(out / "_build" / "plan.json", PLAN_SHAPE, TOOL)
    n_chunks = -(-plan["items"] // plan["shard_size"])
    records = {}
    for s in range(n_chunks):
        if (rec := _finished(out, s)) is not None:
            records[s] = rec
    sizes = {records[s]["shard"]: records[s]["count"] for s in sorted(records)}
    skipped = [x for s in sorted(records) for x in records[s]["skipped"]]
    parser, model = plan["parser"], plan["model"]
    return {"schema": 1, "inputs": plan["inputs"], "parser": parser if parser == "rule" else f"spacy:{model}",
            "num_shards": len(sizes), "num_samples": sum(sizes.values()), "num_inputs": plan["items"],
            "num_skipped": len(skipped), "skipped_by_reason": dict(Counter(x["reason"] for x in skipped)),
            "skipped": skipped, "shards": f"{{00000..{len(sizes) - 1:05d}}}.tar",
            "missing_shards": [f"{s:05d}.tar" for s in range(n_chunks) if s not in records],
            "follow_links": plan.get("follow_links", False), "refused_links": plan.get("refused_links", []),
            "sizes": sizes}


def write_build_manifest(out: str | Path, manifest: dict) -> None:
    out = Path(out)
    (out / "sizes.json").write_text(json.dumps(manifest["sizes"], indent=1))
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "sizes"}, indent=1))
