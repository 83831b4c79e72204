"""``build_loader``: webdataset shards → typed ``Batch`` objects, resumable at the exact sample.

Pipeline per DataLoader worker (one *slot* of ``stream.slot_samples``): raw sample → decode
(pixel limit) → open_clip transform (seeded per sample) → tokenize → char spans to token
positions → regions → concepts → negatives → collate ``batch_size`` samples into one Batch.
Each worker builds whole batches (as open_clip does), so the main process only unwraps them.

Exact resume: every yielded item carries its slot's cursor and cumulative skip counters (plain
ints). The main process keeps, per slot, those of the last batch it *consumed* (prefetched
batches do not count) and the number of batches consumed. PyTorch's DataLoader hands out
IterableDataset batches round-robin over workers, so after n consumed batches the next one comes
from slot n mod W; a restored loader rotates worker ids by that offset. ``state_dict()`` is
primitives only and goes into the checkpoint; ``counters()`` sums skips by reason over slots,
which is how counts made inside worker processes reach the main process.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import hashlib
import logging
import random
import re
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np
import orjson
import torch
from braceexpand import braceexpand

from ..config import Config, ConfigError
from .batch import Batch
from .geometry import model_geometry
from .regions import (
    PatchRegionError,
    apply_transform,
    is_seeded_by_rng,
    map_box,
    patch_region_masks,
    read_patch_sets,
    region_cells,
    stack_regions,
)
from .remap import RemapError, check_compatible, pieces_from_json, remap, shards_fingerprint
from .stream import (
    ERROR_KEY,
    SHARD_END,
    StreamSpec,
    decode_image,
    image_bytes,
    initial_cursor,
    slot_samples,
    slot_universe,
)
from .text import build_tokenizer, span_positions

STATE_VERSION = 1
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold
SCHEMA_SUPPORTED = 1
RING_SPARE = 2  # shared-memory image buffers per worker beyond data.prefetch_factor
PHRASE_LABELS = {"NP", "PP", "VP", "S", "ROOT"}
# counter of stored regions dropped because the crop left nothing of them: not a skipped sample
# (counters named "regions_*" are logged apart from the skips)
REGIONS_DROPPED = "regions_dropped"
SKIP_LOG_FIRST = 5  # skipped samples logged per reason and worker slot (all are counted)

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot be read as configured (raised before training starts)."""


# ------------------------------------------------------------------------------ shard lists
def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a pattern; several patterns may be joined with '::' (open_clip's convention)."""
    urls: list[str] = []
    for part in pattern.split("::"):
        urls.extend(u for u in braceexpand(part.strip()) if u)
    return urls


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def make_spec(cfg: Config, rank: int, world_size: int, sources: list[tuple[str, float]] | None = None,
              resampled: bool | None = None, finite: bool = False) -> StreamSpec:
    """Resolve shard lists and run the preflight checks (clear errors before training starts)."""
    d = cfg.data
    srcs = sources if sources is not None else [(s.shards, s.weight) for s in d.sources]
    if not srcs:
        raise DataError("data.sources is empty: give at least one {shards: /path/{00000..00009}.tar}")
    resolved = []
    for i, (pattern, weight) in enumerate(srcs):
        if pattern in (None, "???", ""):
            raise DataError(f"data.sources[{i}].shards is not set")
        urls = expand_shards(pattern)
        if not urls:
            raise DataError(f"data.sources[{i}].shards={pattern!r} expands to no shard")
        missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"data.sources[{i}]: shard not found: {missing[0]}{more}")
        resolved.append((tuple(urls), float(weight)))
    resampled = d.resampled if resampled is None else resampled
    slots = max(1, d.workers)
    total = sum(len(u) for u, _ in resolved)
    if finite:
        # one pass for evaluation: no more worker slots than this rank has shards, none is an error
        slots = max(1, min(slots, -(-total // world_size)))
        return StreamSpec(tuple(resolved), False, int(d.seed), int(rank), int(world_size), slots, 1, False)
    if not resampled and len({w for _, w in resolved}) > 1:
        warnings.warn("data.sources weights apply in resampled mode only; epoch mode visits every shard "
                      "of every source once per epoch", stacklevel=2)
    if not resampled and total < world_size * slots:
        raise DataError(f"epoch mode needs at least ranks x workers = {world_size} x {slots} = "
                        f"{world_size * slots} shards, found {total}; use fewer workers, more shards "
                        "or data.resampled=true")
    return StreamSpec(tuple(resolved), bool(resampled), int(d.seed), int(rank), int(world_size), slots,
                      int(d.shuffle_buffer), bool(d.shard_shuffle))


# ------------------------------------------------------------------------------- samples
@functools.lru_cache(maxsize=65536)
def concept_id(text: str) -> int:
    """int64 hash of the normalised concept text: lower case, no punctuation, no leading article."""
    t = re.sub(r"[^\w\s]", " ", text.lower())
    words = t.split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    h = hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=True)


class SampleProcessor:
    """Turns one raw sample into tensors, or returns the reason it must be skipped."""

    def __init__(self, cfg: Config, train: bool):
        from open_clip import image_transform

        d = cfg.data
        self.d = d
        self.geo = model_geometry(cfg)
        aug = {"scale": tuple(d.augment_scale)} if train else None
        self.transform = image_transform(self.geo.image_size, is_train=train, mean=self.geo.mean,
                                         std=self.geo.std, aug_cfg=aug)
        self.rng_only = is_seeded_by_rng(self.transform)
        self.tok = build_tokenizer(d.tokenizer, d.context_length)
        # grid of the stored patch-index regions: data.region_grid, or the model's own when null
        self.region_grid = d.region_grid if d.region_grid is not None else self.geo.grid
        self.L = d.context_length
        self.in_main = torch.utils.data.get_worker_info() is None  # workers own their RNG: no restore
        # annotation entries dropped from samples that are kept (``field_*`` counters, by reason)
        self.dropped: dict[str, int] = {}

    def _drop(self, reason: str, n: int = 1) -> None:
        if n > 0:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def image_buffers(self, n: int) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """(batch image tensor, its n slot views) to write transformed uint8 images into (saves the
        stack copy; the views are made once per buffer, indexing costs ~1 us each).

        In the main process (workers=0) every batch gets a fresh tensor. Inside a DataLoader worker
        a ring of data.prefetch_factor + RING_SPARE shared-memory buffers is recycled: allocating and
        page-faulting a fresh shared-memory tensor per batch cost about as much as decoding the
        images. The Loader (or DataLoader's pin-memory thread) copies the images out of the ring as
        soon as it receives a batch; a worker has at most prefetch_factor batches outstanding, so
        the buffer of a batch is not rewritten before that copy."""
        shape = (n, 3, self.geo.image_size, self.geo.image_size)
        if self.in_main:
            while True:
                images = torch.empty(shape, dtype=torch.uint8)
                yield images, images.unbind(0)
        ring_size = self.d.prefetch_factor + RING_SPARE
        ring = [torch.empty(shape, dtype=torch.uint8).share_memory_() for _ in range(ring_size)]
        ring_slots = [buf.unbind(0) for buf in ring]
        i = 0
        while True:
            yield ring[i % ring_size], ring_slots[i % ring_size]
            i += 1

    def __call__(self, sample: dict, seed: int, out: torch.Tensor | None = None) -> dict | str:
        """``out``: the batch slot the image should be written to (see ``image_buffers``)."""
        if ERROR_KEY in sample:
            return sample[ERROR_KEY]
        if "json" not in sample:
            return "missing_json"
        try:
            ann = orjson.loads(sample["json"])  # a third of json.loads' time, the same objects
            if not isinstance(ann, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return "bad_json"
        schema = ann.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA_SUPPORTED:
            return "unsupported_schema"
        caption = ann.get("caption")
        if caption is not None and not isinstance(caption, str):
            return "bad_annotation"
        if not caption and "txt" in sample:
            try:
                caption = sample["txt"].decode("utf-8")
            except UnicodeDecodeError:
                return "bad_caption"
        if not caption or not str(caption).strip():
            return "empty_caption"
        data = image_bytes(sample)
        if data is None:
            return "missing_image"
        try:
            img = decode_image(data, MAX_PIXELS)
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt bytes
            return "bad_image"
        rng = random.Random(seed)
        if self.rng_only:  # the crop is drawn from the sample's own rng
            image, window = apply_transform(self.transform, img, out, rng, uint8=True)
        else:
            # other random steps use torch's generator: seed it for this sample only (restored
            # after, so the trainer's RNG is untouched when workers=0)
            gen = torch.default_generator
            saved = gen.get_state() if self.in_main else None
            gen.manual_seed(seed)
            try:
                image, window = apply_transform(self.transform, img, out, uint8=True)
            finally:
                if saved is not None:
                    gen.set_state(saved)
        enc = self.tok.encode(caption)
        n_tok = len(enc.ids)
        if n_tok <= 2:
            return "empty_caption"  # nothing the tokenizer keeps
        patches = None
        if self.d.region_source == "patches":
            patches = self._patch_regions(sample, window, rng)
            if isinstance(patches, str):
                return patches
        try:
            return self._text_fields(sample, ann, caption, enc, image, window, rng, patches)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            return "bad_annotation"  # phrases/concepts/negatives/boxes of the wrong shape

    def _patch_regions(self, sample: dict, window, rng: random.Random) -> tuple[np.ndarray, int] | str:
        """(masks, dropped) from the sample's ``samlens.npy``/``samcat.npy`` pair, or a skip reason.

        An index beyond the configured grid is not a bad sample but a wrong setting for the whole
        shard (its regions were made on another grid): that stops the run with an error naming
        the shard, the sample and ``data.region_grid``."""
        if "samlens.npy" not in sample or "samcat.npy" not in sample:
            return "missing_regions"
        try:
            lens, cat = read_patch_sets(sample["samlens.npy"], sample["samcat.npy"])
        except PatchRegionError:
            return "bad_regions"
        g = self.region_grid
        if cat.size and int(cat.max()) >= g * g:
            raise DataError(f"{sample.get('__url__')}: sample {sample['__key__']!r} has patch index "
                            f"{int(cat.max())}, beyond the {g}x{g} grid (data.region_grid="
                            f"{self.d.region_grid}); set data.region_grid to the grid its samcat indices "
                            "refer to")
        return patch_region_masks(lens, cat, g, window, self.geo.grid, self.d.num_regions, rng)

    def _regions(self, boxes: list, window, rng: random.Random) -> list:
        """``region_cells``, counting stored boxes it does not use (cut away by the crop, or beyond
        ``data.num_regions``)."""
        if self.d.region_source == "precomputed" and boxes:
            inside = sum(1 for b in boxes if map_box(b, window) is not None)
            self._drop("field_box_outside_crop", len(boxes) - inside)
            self._drop("field_box_over_max", inside - self.d.num_regions)
        return region_cells(boxes, window, self.geo.grid, self.d.num_regions, self.d.region_source, rng)

    def _text_fields(self, sample: dict, ann: dict, caption: str, enc, image: torch.Tensor, window,
                     rng: random.Random, patches: tuple[np.ndarray, int] | None = None) -> dict:
        n_tok = len(enc.ids)
        # phrase nodes: root first (all real tokens), then tree nodes (or single tokens), deduplicated
        root = list(range(1, n_tok - 1))
        nodes = [root]
        seen = {tuple(root)}
        if self.d.phrase_unit == "token":
            cand = [[i] for i in range(1, n_tok - 1)]
        else:
            cand = []
            for p in ann.get("phrases", []):
                if p.get("label") in PHRASE_LABELS and p.get("label") != "ROOT":
                    pos = span_positions(enc, int(p["start"]), int(p["end"]))
                    if pos is not None:
                        cand.append(pos)
                    else:  # a span outside the caption or cut by the context length
                        self._drop("field_phrase_span")
        for i, pos in enumerate(cand):
            if len(nodes) >= self.d.max_phrases:
                self._drop("field_phrase_over_max", len(cand) - i)
                break
            if tuple(pos) not in seen:
                seen.add(tuple(pos))
                nodes.append(pos)
        out = {
            "key": sample["__key__"], "image": image, "text": enc.ids, "n_tok": n_tok,
            "phrases": nodes,
            "regions": patches[0] if patches is not None else self._regions(ann.get("boxes") or [], window, rng),
            "regions_dropped": patches[1] if patches is not None else 0,
            "meta": {"caption": caption, "label": ann.get("label"),
                     "eval_negatives": ann.get("eval_negatives") or {}, "url": sample.get("__url__")},
        }
        if self.d.concepts:
            raw_concepts = ann.get("concepts", [])
            texts = [c["text"] for c in raw_concepts if c.get("text", "").strip()]
            self._drop("field_concept_empty", len(raw_concepts) - len(texts))
            if self.d.max_concepts_per_caption is not None:
                self._drop("field_concept_over_max", len(texts) - self.d.max_concepts_per_caption)
                texts = texts[: self.d.max_concepts_per_caption]
            texts = texts or [caption]  # METHODS 3: a caption with no concept uses the whole caption
            out["concepts"] = [self.tok.ids(t) for t in texts]
            out["concept_ids"] = [concept_id(t) for t in texts]
        if self.d.num_negatives > 0:
            raw_negs = ann.get("negatives", [])
            negs = [n["text"] for n in raw_negs if n.get("text", "").strip()]
            self._drop("field_negative_empty", len(raw_negs) - len(negs))
            if len(negs) > self.d.num_negatives:
                self._drop("field_negative_over_max", len(negs) - self.d.num_negatives)
                negs = [negs[i] for i in sorted(rng.sample(range(len(negs)), self.d.num_negatives))]
            out["negatives"] = [self.tok.ids(t) for t in negs]
        return out


def _rows(id_lists: list[list[int]], length: int) -> torch.Tensor:
    """Token id lists (each <= length) → one zero-padded [n, length] long tensor, in one allocation."""
    out = np.zeros((len(id_lists), length), dtype=np.int64)  # numpy row writes: ~1 us each
    for i, ids in enumerate(id_lists):
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)


def _stack_images(images: list[torch.Tensor], into: torch.Tensor | None) -> torch.Tensor:
    """The batch image tensor: ``into`` when every image was already written into its slot."""
    if into is not None and all(img.data_ptr() == into[i].data_ptr() for i, img in enumerate(images)):
        return into[: len(images)]
    return torch.stack(images)


def collate(samples: list[dict], cfg: Config, grid: int, images: torch.Tensor | None = None) -> Batch:
    """Pad and stack processed samples; ``grid``: patches per side (region masks are [M, grid*grid]);
    ``images`` is the buffer their images were written into."""
    d = cfg.data
    B, L = len(samples), d.context_length
    text = _rows([s["text"] for s in samples], L)
    n_tok = torch.tensor([s["n_tok"] for s in samples])
    ar = torch.arange(L)
    token_valid = (ar[None, :] >= 1) & (ar[None, :] < (n_tok - 1)[:, None])
    K = max(len(s["phrases"]) for s in samples)
    pt = np.zeros((B, K, L), dtype=np.bool_)
    pv = np.zeros((B, K), dtype=np.bool_)
    for b, s in enumerate(samples):
        for k, pos in enumerate(s["phrases"]):
            if pos[-1] - pos[0] + 1 == len(pos):  # a phrase is a contiguous token run: slice, not fancy index
                pt[b, k, pos[0]: pos[-1] + 1] = True
            else:
                pt[b, k, pos] = True
        pv[b, : len(s["phrases"])] = True
    phrase_tokens, phrase_valid = torch.from_numpy(pt), torch.from_numpy(pv)
    regions = stack_regions([s["regions"] for s in samples], grid)
    batch = Batch(
        keys=[s["key"] for s in samples], images=_stack_images([s["image"] for s in samples], images), text=text,
        token_valid=token_valid, phrase_tokens=phrase_tokens, phrase_valid=phrase_valid,
        region_masks=regions, region_valid=torch.ones(regions.shape[:2], dtype=torch.bool),
        meta=[s["meta"] for s in samples],
    )
    if d.concepts:
        batch.concept_text = _rows([r for s in samples for r in s["concepts"]], L)
        batch.concept_owner = torch.tensor([b for b, s in enumerate(samples) for _ in s["concepts"]],
                                           dtype=torch.long)
        batch.concept_ids = torch.tensor([i for s in samples for i in s["concept_ids"]], dtype=torch.long)
    if d.num_negatives > 0:
        N = d.num_negatives
        rows = [(s["negatives"] + [[]] * N)[:N] for s in samples]
        batch.neg_text = _rows([r for sample_rows in rows for r in sample_rows], L).view(B, N, L)
        batch.neg_valid = torch.tensor([[len(r) > 0 for r in sample_rows] for sample_rows in rows],
                                       dtype=torch.bool).view(B, N)
    return batch


# ------------------------------------------------------------------------------- dataset
class BarrenWatch:
    """Tells when an infinite slot stream will never yield a valid sample.

    Fires after three *rounds* without a valid sample, a round being a stretch in which a shard
    visit of every shard the slot can draw ended (its ``SHARD_END`` item was emitted), each round
    after the first starting at a shuffle-block boundary. Shuffling mixes items of neighbouring
    shard visits inside a block, so one round could still count a visit whose valid sample came out
    just before the last reset; a visit counted in the third round starts after the block holding
    that reset, so all of its samples were seen and skipped.
    """

    ROUNDS = 3

    def __init__(self, universe: frozenset[str]) -> None:
        self.universe = universe
        self.ended: set[str] = set()
        self.rounds = 0
        self.waiting_boundary = False

    def valid(self) -> None:
        if self.rounds or self.ended:
            self.ended.clear()
            self.rounds, self.waiting_boundary = 0, False

    def skipped(self, raw: dict, cursor: dict) -> bool:
        if not self.waiting_boundary and raw.get(SHARD_END):
            self.ended.add(raw.get("__url__", "?"))
            if len(self.ended) >= len(self.universe) and self.ended >= self.universe:
                self.rounds += 1
                self.ended.clear()
                self.waiting_boundary = True
                if self.rounds >= self.ROUNDS:
                    return True
        if self.waiting_boundary and cursor.get("taken") == 0:
            self.waiting_boundary = False  # the next round starts with the next block
        return False


class SkipLog:
    """Logs the first ``SKIP_LOG_FIRST`` skipped samples per reason (key and shard), then one line
    saying the rest are only counted: enough to find the bad files, never a flood."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.seen: dict[str, int] = {}

    def __call__(self, reason: str, raw: dict) -> None:
        n = self.seen[reason] = self.seen.get(reason, 0) + 1
        if n <= SKIP_LOG_FIRST:
            detail = raw.get("__detail__")
            log.warning("skipped sample %s of %s: %s%s", raw.get("__key__", "-"), raw.get("__url__", "?"), reason,
                        f" ({detail})" if detail else "")
        elif n == SKIP_LOG_FIRST + 1:
            log.warning("more samples skipped for %s in worker slot %d: counted, no longer logged", reason,
                        self.slot)


class BatchStream(torch.utils.data.IterableDataset):
    """Yields (Batch | None, slot, cursor, counters) from the slot that this worker plays."""

    def __init__(self, cfg: Config, spec: StreamSpec, slots: dict[int, dict], offset: int, train: bool):
        super().__init__()
        self.cfg, self.spec, self.slots, self.offset, self.train = cfg, spec, slots, offset, train

    @staticmethod
    def _out(batch: Batch) -> Batch:
        """Inside a worker, small tensors travel as numpy arrays: pickled inline, they avoid one
        shared-memory segment per tensor per batch (the images already sit in shared memory)."""
        if torch.utils.data.get_worker_info() is None:
            return batch
        for f in fields(batch):
            v = getattr(batch, f.name)
            if isinstance(v, torch.Tensor) and f.name != "images":
                setattr(batch, f.name, v.numpy())
        return batch

    def __iter__(self) -> Iterator[tuple[Batch, int, dict, dict]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        slot = (wid + self.offset) % self.spec.workers
        state = self.slots.get(slot) or {"cursor": initial_cursor(), "counters": {}}
        cursor, counters = dict(state["cursor"]), dict(state["counters"])
        proc = SampleProcessor(self.cfg, self.train)
        B = self.cfg.data.batch_size
        buf: list[dict] = []
        buffers = proc.image_buffers(B)
        images, slots = next(buffers)
        unreported = False
        barren = BarrenWatch(slot_universe(self.spec, slot)) if self.train else None
        skip_log = SkipLog(slot)
        for raw, cur, seed in slot_samples(self.spec, slot, cursor, finite=not self.train):
            result = proc(raw, seed, slots[len(buf)])
            cursor = cur
            if proc.dropped:
                for k, n in proc.dropped.items():
                    counters[k] = counters.get(k, 0) + n
                proc.dropped.clear()
            if isinstance(result, str):
                counters[result] = counters.get(result, 0) + 1
                skip_log(result, raw)
                unreported = True
                if barren is not None and barren.skipped(raw, cur):  # infinite, never yields: fail, do not spin
                    raise DataError(no_valid_sample_message(self.spec, slot, barren.universe, counters))
                continue
            if result["regions_dropped"]:  # stored regions that left the crop: counted, not skips
                counters[REGIONS_DROPPED] = counters.get(REGIONS_DROPPED, 0) + result["regions_dropped"]
            if barren is not None:
                barren.valid()
            buf.append(result)
            if len(buf) == B:
                yield self._out(collate(buf, self.cfg, proc.geo.grid, images)), slot, dict(cursor), dict(counters)
                buf, unreported = [], False
                images, slots = next(buffers)
        # finite (evaluation) streams end with a partial batch, or with a bare report of the skips
        # that followed the last batch (the Loader records it and yields nothing)
        if buf or unreported:
            yield (self._out(collate(buf, self.cfg, proc.geo.grid, images)) if buf else None), slot, dict(cursor), dict(counters)


def no_valid_sample_message(spec: StreamSpec, slot: int, shards: frozenset[str], counters: dict) -> str:
    listed = sorted(shards)
    more = f" (and {len(listed) - 8} more)" if len(listed) > 8 else ""
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(counters.items()))
    return (f"no valid sample in {BarrenWatch.ROUNDS} passes over the {len(listed)} shards of rank {spec.rank} worker slot "
            f"{slot}: {', '.join(listed[:8])}{more}; skipped samples by reason: {reasons}")


class Loader:
    """Iterable of Batch with ``state_dict()`` / ``counters()``; iterating again continues."""

    def __init__(self, cfg: Config, spec: StreamSpec, state: dict | None, train: bool):
        self.cfg, self.spec, self.train = cfg, spec, train
        self._batches = 0
        self._slots: dict[int, dict] = {}
        if state is not None:
            self.load_state_dict(state)

    def state_dict(self) -> dict:
        spec = self.spec
        return {"version": STATE_VERSION, "batches": self._batches, "workers": spec.workers,
                "rank": spec.rank, "world_size": spec.world_size,
                "slots": {str(k): copy.deepcopy(v) for k, v in self._slots.items()},
                # what a resume on another layout needs to rebuild this rank's streams (remap.py)
                "shards": shards_fingerprint(spec), "seed": spec.seed, "resampled": spec.resampled,
                "shuffle_buffer": spec.shuffle_buffer, "shard_shuffle": spec.shard_shuffle,
                "salts": list(spec.salts), "rest_epoch": spec.rest_epoch,
                "rest": None if spec.rest is None else [[[u, a, b, list(o)] for u, a, b, o in slot]
                                                        for slot in spec.rest]}

    def load_state_dict(self, state: dict) -> None:
        """``state``: this rank's own saved state (exact resume, same layout), or
        ``{"elastic_from": [every old rank's state], "salt": int}`` for a resume on any layout."""
        if "elastic_from" in state:
            old = state["elastic_from"]
            for s in old:
                self._check_version(s)
            same = (len(old) == self.spec.world_size
                    and all(int(s["workers"]) == self.spec.workers for s in old))
            if not same:
                try:
                    self.spec, self._slots = remap(old, self.spec, int(state["salt"]))
                except RemapError as e:
                    raise DataError(str(e)) from e
                self._batches = 0
                return
            state = old[self.spec.rank]
        self._check_version(state)
        for key in ("workers", "world_size", "rank"):
            if state[key] != getattr(self.spec, key):
                raise DataError(f"cannot resume the data stream exactly: checkpoint has {key}="
                                f"{state[key]}, this run has {getattr(self.spec, key)}")
        try:
            check_compatible(state, self.spec)
        except RemapError as e:
            raise DataError(str(e)) from e
        self.spec = dataclasses.replace(self.spec, rest=pieces_from_json(state.get("rest")),
                                        rest_epoch=int(state.get("rest_epoch", -1)),
                                        salts=tuple(int(x) for x in state.get("salts", ())))
        self._batches = int(state["batches"])
        self._slots = {int(k): copy.deepcopy(v) for k, v in state["slots"].items()}

    @staticmethod
    def _check_version(state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state version {state.get('version')} != {STATE_VERSION}")

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for v in self._slots.values():
            for reason, n in v["counters"].items():
                total[reason] = total.get(reason, 0) + n
        return total

    def __iter__(self) -> Iterator[Batch]:
        W = self.spec.workers if self.cfg.data.workers > 0 else 0
        ds = BatchStream(self.cfg, self.spec, copy.deepcopy(self._slots), self._batches % self.spec.workers,
                         self.train)
        # pinned host batches (Batch.pin_memory, in DataLoader's pin thread) make the copy to the GPU
        # asynchronous; without CUDA there is nothing to pin for
        pin = bool(self.cfg.data.pin_memory) and torch.cuda.is_available()
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=W, persistent_workers=False,
                                         prefetch_factor=self.cfg.data.prefetch_factor if W > 0 else None,
                                         pin_memory=pin)
        if W > 0:
            # Fork the workers with the parent's objects frozen out of the garbage collector: else
            # each worker's first full collection touches every inherited object and copies the
            # whole parent heap page by page (copy-on-write), CPU the workers then lack.
            gc.collect()
            gc.freeze()
            try:
                batches = iter(dl)  # forks the workers
            finally:
                gc.unfreeze()
        else:
            batches = iter(dl)
        for batch, slot, cursor, counters in batches:
            if W > 0 and batch is not None and not batch.images.is_pinned():
                batch.images = batch.images.clone()  # out of the worker's ring (see image_buffers)
                for f in fields(batch):  # numpy arrays back to tensors (see BatchStream._out)
                    v = getattr(batch, f.name)
                    if isinstance(v, np.ndarray):
                        setattr(batch, f.name, torch.from_numpy(v))
            self._slots[slot] = {"cursor": cursor, "counters": counters}
            if batch is None:  # end-of-pass report (finite streams only)
                continue
            self._batches += 1
            yield batch


def build_loader(cfg: Config, rank: int, world_size: int, state: dict | None = None, *,
                 shards: str | None = None, train: bool = True) -> Loader:
    """The training stream (``train=True``: infinite, shuffled, augmented, resumable from ``state``)
    or an evaluation pass over ``shards`` (``train=False``: one finite pass in shard order, eval
    transform, last batch partial). ``shards`` overrides data.sources with one brace pattern."""
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be > 0, got {cfg.data.batch_size}")
    sources = [(shards, 1.0)] if shards is not None else None
    spec = make_spec(cfg, rank, world_size, sources, finite=not train)
    if not train:
        state = None
    return Loader(cfg, spec, state, train)
