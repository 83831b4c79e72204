"""``build_loader``: webdataset shards → typed ``Batch`` objects, resumable at the exact sample.

Pipeline per DataLoader worker (one *slot* of ``stream.slot_samples``): raw sample →
``samples.SampleProcessor`` (decode, transform, tokenize, regions, concepts, negatives) →
``collate.collate`` of ``batch_size`` samples into one Batch. Each worker builds whole batches (as
open_clip does), so the main process only unwraps them (``Batch.received``).

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
import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import Config, ConfigError
from .batch import Batch
from .collate import CollateContext, collate
from .mixing import MixingError, expand_parts, resolve_mix
from .remap import RemapError, check_compatible, pieces_from_json, remap, shards_fingerprint
from .samples import DataError, SampleProcessor, concept_id
from .stream import SHARD_END, StreamSpec, expand_shards, initial_cursor, slot_samples, slot_universe

__all__ = ["DataError", "Loader", "SampleProcessor", "build_loader", "concept_id", "expand_shards", "make_spec"]

STATE_VERSION = 1
# counter of stored regions dropped because the crop left nothing of them: not a skipped sample
# (counters named "regions_*" are logged apart from the skips)
REGIONS_DROPPED = "regions_dropped"
SKIP_LOG_FIRST = 5  # skipped samples logged per reason and worker slot (all are counted)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ shard lists
def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def make_spec(cfg: Config, rank: int, world_size: int, sources: list[tuple[str, float]] | None = None,
              resampled: bool | None = None, finite: bool = False) -> StreamSpec:
    """Resolve shard lists and run the preflight checks (clear errors before training starts)."""
    d = cfg.data
    srcs = ([(pattern, weight, None) for pattern, weight in sources] if sources is not None
            else [(s.shards, s.weight, s.upsampling_factors) for s in d.sources])
    if not srcs:
        raise DataError("data.sources is empty: give at least one {shards: /path/{00000..00009}.tar}")
    resolved = []
    for i, (pattern, weight, factors) in enumerate(srcs):
        if pattern in (None, "???", ""):
            raise DataError(f"data.sources[{i}].shards is not set")
        parts = expand_parts(pattern)
        urls = [u for part in parts for u in part]
        if not urls:
            raise DataError(f"data.sources[{i}].shards={pattern!r} expands to no shard")
        missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"data.sources[{i}]: shard not found: {missing[0]}{more}")
        resolved.append((parts, weight, factors))
    resampled = d.resampled if resampled is None else resampled
    slots = max(1, d.workers)
    if finite:
        # one pass for evaluation: no more worker slots than this rank has shards, none is an error
        urls = tuple(tuple(u for part in parts for u in part) for parts, _, _ in resolved)
        total = sum(len(u) for u in urls)
        slots = max(1, min(slots, -(-total // world_size)))
        return StreamSpec(tuple((u, 1.0) for u in urls), False, int(d.seed), int(rank), int(world_size), slots, 1,
                          False)
    try:
        mix = resolve_mix(resolved, bool(resampled))
    except MixingError as e:
        raise DataError(str(e)) from None
    spec = StreamSpec(tuple(zip(mix.urls, mix.weights)), bool(resampled), int(d.seed), int(rank), int(world_size),
                      slots, int(d.shuffle_buffer), bool(d.shard_shuffle), factors=mix.factors,
                      repeats=mix.repeats)
    total = len(spec.epoch_shards)
    if not resampled and total < world_size * slots:
        raise DataError(f"epoch mode needs at least ranks x workers = {world_size} x {slots} = "
                        f"{world_size * slots} shards, found {total} (per epoch, copies included); use fewer "
                        "workers, more shards or data.resampled=true")
    return spec


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
        """Inside a worker, the batch as it crosses to the main process (``Batch.for_wire``)."""
        return batch if torch.utils.data.get_worker_info() is None else batch.for_wire()

    def __iter__(self) -> Iterator[tuple[Batch, int, dict, dict]]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        slot = (wid + self.offset) % self.spec.workers
        state = self.slots.get(slot) or {"cursor": initial_cursor(), "counters": {}}
        cursor, counters = dict(state["cursor"]), dict(state["counters"])
        proc = SampleProcessor(self.cfg, self.train)
        B = self.cfg.data.batch_size
        buf: list[dict] = []
        grid, length = proc.geo.grid, self.cfg.data.context_length
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
                yield self._out(collate(buf, CollateContext(length, grid, images))), slot, dict(cursor), dict(counters)
                buf, unreported = [], False
                images, slots = next(buffers)
        # finite (evaluation) streams end with a partial batch, or with a bare report of the skips
        # that followed the last batch (the Loader records it and yields nothing)
        if buf or unreported:
            yield (self._out(collate(buf, CollateContext(length, grid, images))) if buf else None), slot, dict(cursor), dict(counters)


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
            if W > 0 and batch is not None:
                batch.received()  # out of the worker's ring (see SampleProcessor.image_buffers)
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
