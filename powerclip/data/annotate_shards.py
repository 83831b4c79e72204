"""Add powerclip's annotation to webdataset shards someone else wrote (tools/annotate_shards.py).

Why a separate path from ``build``: published shard sets (PowerCLIP's CC12M shards with their
SAM regions as ``samlens.npy``/``samcat.npy``, img2dataset output) already hold the images and
whatever else their authors stored; re-sharding them would re-encode nothing but would rename
keys and lose members. Here every member is copied unchanged (same name, same bytes, same order)
and only ``{key}.json`` becomes powerclip's annotation (powerclip.annotate: parse-tree phrase
spans and concepts of the caption, parsed by us), with the original json object kept under
``source``. Hard negatives are a separate, optional pass (tools/make_negatives.py), which copies
members the same way.

Output, all inside ``out``: the shards under their own names, ``sizes.json``, ``manifest.json``
(counts, and every sample left unannotated with its reason: such samples are copied as they
are, never dropped) and ``_annotate/`` (the settings and one record per finished shard: a rerun
redoes only shards without one). Each shard is written to ``NAME.tmp`` and renamed when complete.

Each shard is read twice (captions first, so that spaCy parses them in large batches; then the
copy), which keeps memory at one sample whatever the shard size.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from .records import ListOf, read_finished, read_pinned
from .shard_pool import check_output_folder, run_shards
from .stream import starts_sample

RECORDS = "_annotate"
TOOL = "tools/annotate_shards.py"
SETTINGS_SHAPE = {"parser": str}
RECORD_SHAPE = {"shard": str, "count": int, "annotated": int, "skipped": ListOf({"input": str, "reason": str})}
_ANNOTATOR = None


def _init_worker(parser: str, model: str) -> None:
    global _ANNOTATOR
    from ..annotate import Annotator

    _ANNOTATOR = Annotator(parser, model)


def _members(path: Path) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """(member info, bytes for files / None for anything else) in file order."""
    with tarfile.open(path, "r|*") as tf:
        for m in tf:
            yield m, (tf.extractfile(m).read() if m.isfile() else None)


def _key_ext(name: str) -> tuple[str | None, str | None]:
    prefix, suffix = base_plus_ext(name)
    return prefix, (suffix.lower() if suffix else suffix)


def _caption_of(members: dict[str, bytes]) -> tuple[str | None, object, str | None]:
    """(caption, original json object or None, reason when no caption)."""
    src = None
    if "json" in members:
        try:
            src = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError):
            return None, None, "bad_json"
    caption = None
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None, src, "bad_caption"
    if not caption and isinstance(src, dict) and isinstance(src.get("caption"), str):
        caption = src["caption"]
    caption = " ".join((caption or "").split())
    return (caption or None), src, (None if caption else "missing_caption")


def _samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of each sample (consecutive members sharing a key, webdataset's rule; a
    member the sample already has starts the next one, as the training reader splits them)."""
    key, cur = None, {}
    for m, data in _members(path):
        if data is None:
            continue
        k, ext = _key_ext(m.name)
        if k is None:
            continue
        if key is not None and starts_sample(k, ext, key, cur):
            yield key, cur
            cur = {}
        key = k
        cur[ext] = data
    if key is not None:
        yield key, cur


def annotate_one_shard(src: str, out: str) -> dict:
    """Write out/NAME (every member of src copied, ``{key}.json`` replaced by the annotation) and
    its finished record; return the record."""
    assert _ANNOTATOR is not None, "worker not initialised"
    src_path, out_dir = Path(src), Path(out)
    captions: dict[str, tuple[str, object]] = {}
    skipped, keys, seen = [], [], set()
    for key, members in _samples(src_path):
        keys.append(key)
        if key in seen:  # copied as it is; the training reader skips it (its reason, duplicate_key)
            skipped.append({"input": f"{src}#{key}", "reason": "duplicate_key"})
            continue
        seen.add(key)
        caption, obj, reason = _caption_of(members)
        if reason is not None:
            skipped.append({"input": f"{src}#{key}", "reason": reason})
        else:
            captions[key] = (caption, obj)
    anns = dict(zip(captions, _ANNOTATOR.annotate_many([c for c, _ in captions.values()])))
    for key, ann in anns.items():
        obj = captions[key][1]
        if obj is not None:
            ann["source"] = obj

    def json_member(key: str) -> tuple[tarfile.TarInfo, bytes]:
        data = json.dumps(anns.pop(key)).encode()
        info = tarfile.TarInfo(f"{key}.json")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        return info, data

    tmp = out_dir / (src_path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as w:
        prev, prev_exts = None, set()
        for m, data in _members(src_path):
            key, ext = _key_ext(m.name) if data is not None else (None, None)
            new_sample = key is not None and starts_sample(key, ext, prev, prev_exts)
            if prev is not None and new_sample and prev in anns:  # the sample had no json member
                w.addfile(*_with_stream(json_member(prev)))
            if key is not None and ext == "json" and key in anns:
                w.addfile(*_with_stream(json_member(key)))
            else:
                w.addfile(m, io.BytesIO(data) if data is not None else None)
            if key is not None:
                prev, prev_exts = key, (set() if new_sample else prev_exts) | {ext}
        if prev is not None and prev in anns:
            w.addfile(*_with_stream(json_member(prev)))
    os.replace(tmp, out_dir / src_path.name)
    record = {"shard": src_path.name, "source": str(src_path), "count": len(keys),
              "annotated": len(captions), "skipped": skipped,
              "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}  # which task of a job array wrote it
    rec_path = out_dir / RECORDS / f"{src_path.name}.json"
    rec_tmp = rec_path.with_suffix(".json.tmp")
    rec_tmp.write_text(json.dumps(record))
    os.replace(rec_tmp, rec_path)
    return record


def _with_stream(member: tuple[tarfile.TarInfo, bytes]) -> tuple[tarfile.TarInfo, io.BytesIO]:
    return member[0], io.BytesIO(member[1])


def _settings(parser: str, model: str) -> dict:
    return {"parser": parser if parser == "rule" else f"spacy:{model}"}


def prepare_output(shards: list[Path], out: str | Path, parser: str, model: str) -> Path:
    """Check the input/output pair and record the settings in ``out`` (refusing a folder annotated
    with other settings, which would mix two annotations in one shard set); returns ``out`` resolved.
    Done once before a job array starts, so that its tasks only read the settings."""
    out = check_output_folder(shards, out, RECORDS, TOOL)
    (out / RECORDS).mkdir(parents=True, exist_ok=True)
    settings_path = out / RECORDS / "settings.json"
    settings = _settings(parser, model)
    if settings_path.is_file():
        if read_pinned(settings_path, SETTINGS_SHAPE, TOOL) != settings:
            raise ValueError(f"{out} holds shards annotated with {settings_path.read_text()}, not {settings}; "
                             "use another output folder")
    else:
        tmp = settings_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(settings))
        os.replace(tmp, settings_path)
    return out


def annotate_shards(shards: list[Path], out: str | Path, workers: int = 1, parser: str = "spacy",
                    model: str = "en_core_web_sm", progress: bool = True, write_manifest: bool = True) -> dict:
    """Annotate (or resume annotating) ``shards`` into ``out``; returns the manifest of every shard
    finished in ``out`` so far (``write_manifest=False``: the records only, for one task of many)."""
    out = prepare_output(shards, out, parser, model)
    todo = [p for p in shards if _finished(out, p.name) is None]
    run_shards([str(p) for p in todo], partial(annotate_one_shard, out=str(out)), workers=workers,
               initializer=_init_worker, initargs=(parser, model), desc="annotate", progress=progress)
    manifest = summarize(out)
    manifest["resumed_shards"] = len(shards) - len(todo)
    if write_manifest:
        write_summary(out, manifest)
    return manifest


def _finished(out: Path, name: str) -> dict | None:
    """Shard ``name``'s record when it is finished (the shard and a sound record exist)."""
    if not (out / name).is_file():
        return None
    return read_finished(out / RECORDS / f"{name}.json", RECORD_SHAPE)


def summarize(out: Path) -> dict:
    """Manifest of every finished shard record in ``out`` (all tasks of a job array together)."""
    found = (_finished(out, p.name[: -len(".json")]) for p in sorted((out / RECORDS).glob("*.tar.json")))
    records = [r for r in found if r is not None]
    skipped = [x for r in records for x in r["skipped"]]
    settings = read_pinned(out / RECORDS / "settings.json", SETTINGS_SHAPE, TOOL)
    return {"schema": 1, **settings, "num_shards": len(records),
            "num_samples": sum(r["count"] for r in records),
            "num_annotated": sum(r["annotated"] for r in records),
            "num_skipped": len(skipped), "skipped_by_reason": dict(Counter(x["reason"] for x in skipped)),
            "skipped": skipped, "sizes": {r["shard"]: r["count"] for r in records}}


def write_summary(out: Path, manifest: dict) -> None:
    (out / "sizes.json").write_text(json.dumps(manifest["sizes"], indent=1))
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "sizes"}, indent=1))
