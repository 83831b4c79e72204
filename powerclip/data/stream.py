"""Deterministic, resumable sample streams over webdataset tar shards.

Why not ``wds.WebDataset(...).shuffle(n)``: a rolling shuffle buffer's content depends on the
whole history, so a checkpoint could only resume at a shard boundary. Here the stream of each
*slot* (seed, rank, worker) is a pure function of its inputs:

* shard order: resampled mode draws shard k with ``rng(seed, rank, slot, k)`` (source chosen by
  weight, then a shard of that source, uniformly or by its upsampling factor); epoch mode permutes
  the epoch's shard multiset (every shard once, or ``repeats`` copies of it: ``powerclip.data.mixing``)
  with ``rng(seed, epoch)`` and gives slot g = rank*workers + worker the entries g, g+S, g+2S, ...
  (S = world*workers). Both streams are infinite: epoch e+1 follows epoch e inside each slot.
* shuffle: the raw sample stream is cut into blocks of ``shuffle_buffer`` samples; each block is
  permuted with ``rng(seed, rank, slot, block)``. (Block shuffling mixes about as well as a rolling
  buffer of the same size and, unlike it, can be restored.)
* the cursor after any sample is ``{block, k, off, taken}``: the block number, where the block
  starts (shard sequence index k, raw sample offset off inside it) and how many of its permuted
  samples were already emitted. Restoring re-reads the block's raw bytes (no decoding) and
  continues at ``taken``: the next samples are exactly those of the uninterrupted run.
* after a resume on another number of ranks or workers, a slot's sequence starts with *rest
  pieces* (what the old slots had left of the epoch, see ``remap``), then its own shards from the
  next epoch on; cursors count positions in that sequence.

Bad input never stops the stream. Unreadable or truncated shards become *marker* items in the
raw stream (so their counts are part of the deterministic stream and are not double counted on
resume); per-sample problems are found when the sample is processed. Both are counted by reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .mixing import expand_parts

ERROR_KEY = "__error__"
SHARD_END = "__shard_end__"
META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: such members are not sample files
# webdataset's base_plus_ext: the sample key ends at the first dot of the file name. Kept here rather than
# imported so that reading a local shard (``powerclip check``) does not import webdataset, and torch with it
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str | None, str | None]:
    """(sample key, extensions) of a member name, as webdataset splits it; (None, None) for no extension."""
    m = KEY_EXT.match(path)
    return (m.group(1), m.group(2)) if m else (None, None)


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a pattern; several patterns may be joined with '::' (open_clip's convention)."""
    return [u for part in expand_parts(pattern) for u in part]


@dataclass(frozen=True)
class StreamSpec:
    """Everything a slot stream depends on (picklable: it travels to DataLoader workers)."""

    sources: tuple[tuple[tuple[str, ...], float], ...]  # ((shard urls), weight) per source
    resampled: bool
    seed: int
    rank: int
    world_size: int
    workers: int  # slots per rank (max(1, data.workers))
    shuffle_buffer: int
    shard_shuffle: bool
    # Set after a resume on another layout (see ``powerclip.data.remap``): per slot, the *pieces*
    # of epochs <= rest_epoch this slot still has to deliver; its own epoch-mode shards follow from
    # epoch rest_epoch + 1. ``salts`` (per slot, 0 = none) keep a slot that starts afresh after such
    # a resume from replaying the shuffles and resampled draws of an earlier slot with its number.
    rest: tuple[tuple[Piece, ...], ...] | None = None
    rest_epoch: int = -1
    salts: tuple[int, ...] = ()
    # per source, each shard's weight inside it (resampled draw); () or an empty entry: uniform
    factors: tuple[tuple[float, ...], ...] = ()
    # epoch mode: copies of each shard of ``all_shards`` per epoch; (): every shard once
    repeats: tuple[int, ...] = ()

    @property
    def all_shards(self) -> tuple[str, ...]:
        return tuple(u for urls, _ in self.sources for u in urls)

    @property
    def epoch_shards(self) -> tuple[str, ...]:
        """One epoch's shard multiset: each shard of ``all_shards`` ``repeats`` times, copies adjacent."""
        if not self.repeats:
            return self.all_shards
        return tuple(u for u, m in zip(self.all_shards, self.repeats) for _ in range(m))

    def salt(self, slot: int) -> tuple[int, ...]:
        s = self.salts[slot] if slot < len(self.salts) else 0
        return (s,) if s else ()  # no salt: the seeds of a run that was never remapped


# (url, start, stop, offsets): the raw samples of shard ``url`` with index in [start, stop) (stop -1:
# to its end), or only those listed in ``offsets`` when it is not empty
Piece = tuple[str, int, int, tuple[int, ...]]


def _rng(*ints: int) -> np.random.Generator:
    return np.random.default_rng([int(i) & 0xFFFFFFFF for i in ints])


def mix_seed(*ints: int) -> int:
    """A 62-bit seed from integers (blake2b: cheap per sample, unlike building a numpy SeedSequence)."""
    data = b"".join(int(i).to_bytes(8, "little", signed=True) for i in ints)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 2


def per_epoch(spec: StreamSpec, slot: int) -> int:
    """How many shards slot ``slot`` reads per epoch (epoch mode)."""
    n = len(range(spec.rank * spec.workers + slot, len(spec.epoch_shards), spec.world_size * spec.workers))
    if n == 0:
        raise ValueError(f"slot {spec.rank * spec.workers + slot} has no shards: {len(spec.epoch_shards)} "
                         f"shards < {spec.world_size * spec.workers} ranks x workers")
    return n


def n_rest(spec: StreamSpec, slot: int) -> int:
    """How many rest pieces precede the slot's own epoch-mode shards."""
    return len(spec.rest[slot]) if spec.rest is not None and slot < len(spec.rest) else 0


def epoch_of(spec: StreamSpec, slot: int, k: int) -> int:
    """The epoch that position k of a slot's sequence belongs to (rest pieces: ``rest_epoch``)."""
    p = n_rest(spec, slot)
    if spec.rest is None:
        return k // per_epoch(spec, slot)
    return spec.rest_epoch if k < p else spec.rest_epoch + 1 + (k - p) // per_epoch(spec, slot)


def epoch_end(spec: StreamSpec, slot: int, epoch: int) -> int:
    """The first position of a slot's sequence after epoch ``epoch``."""
    if spec.rest is None:
        return (epoch + 1) * per_epoch(spec, slot)
    return n_rest(spec, slot) + max(0, epoch - spec.rest_epoch) * per_epoch(spec, slot)


def piece_at(spec: StreamSpec, slot: int, k: int) -> Piece:
    """The k-th piece of a slot's infinite sequence: a rest piece or a whole shard."""
    p = n_rest(spec, slot)
    if k < p:
        return spec.rest[slot][k]
    if spec.rest is not None:
        k = k - p + (spec.rest_epoch + 1) * per_epoch(spec, slot)
    return shard_at(spec, slot, k), 0, -1, ()


def shard_at(spec: StreamSpec, slot: int, k: int) -> str:
    """The k-th shard of a slot's infinite shard sequence (rest pieces not counted)."""
    if spec.resampled:
        r = _rng(spec.seed, spec.rank, slot, k, 1, *spec.salt(slot))
        weights = np.array([w for _, w in spec.sources], dtype=np.float64)
        s = int(r.choice(len(spec.sources), p=weights / weights.sum()))
        urls = spec.sources[s][0]
        within = spec.factors[s] if s < len(spec.factors) else ()
        if not within:
            return urls[int(r.integers(len(urls)))]
        f = np.array(within, dtype=np.float64)
        return urls[int(r.choice(len(urls), p=f / f.sum()))]
    shards = spec.epoch_shards
    n_slots = spec.world_size * spec.workers
    g = spec.rank * spec.workers + slot
    per_epoch = len(range(g, len(shards), n_slots))
    if per_epoch == 0:
        raise ValueError(f"slot {g} has no shards: {len(shards)} shards < {n_slots} ranks x workers")
    epoch, i = divmod(k, per_epoch)
    order = _rng(spec.seed, epoch, 2).permutation(len(shards)) if spec.shard_shuffle else np.arange(len(shards))
    return shards[int(order[g + i * n_slots])]


def slot_universe(spec: StreamSpec, slot: int) -> frozenset[str]:
    """Every shard a slot's infinite sequence can visit (for detecting a stream with no valid sample)."""
    if spec.resampled:
        return frozenset(u for urls, w in spec.sources if w > 0 for u in urls)
    shards = spec.epoch_shards
    if spec.shard_shuffle:  # each epoch's permutation deals every shard to some slot position
        return frozenset(shards)
    return frozenset(shards[i] for i in range(spec.rank * spec.workers + slot, len(shards),
                                              spec.world_size * spec.workers))


def _open(url: str):
    if url.startswith("pipe:") or "://" in url:
        from webdataset import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def _members(f, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file of an opened tar, in order.

    A local uncompressed tar is read in tarfile's random-access mode, which costs a loader worker less
    per sample than the streaming mode of webdataset's ``tar_file_iterator`` (tools/bench_loader.py
    measures the pipeline); the iterator still serves remote, piped and compressed shards.
    Members are not kept (webdataset does the same), so memory stays flat on shards of any size."""
    if not isinstance(f, io.BufferedReader) or url.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
        from webdataset.tariterators import tar_file_iterator

        for item in tar_file_iterator(f):
            yield item["fname"], item["data"]
        return
    tf = tarfile.open(fileobj=f, mode="r:*")  # plain tar first; a compressed one with any name still opens
    while (m := tf.next()) is not None:
        tf.members = []
        if m.isreg() and not (m.name.startswith("__") and META.match(m.name)):
            yield m.name, tf.extractfile(m).read()


def starts_sample(prefix: str, suffix: str, current_key: str | None, current_suffixes) -> bool:
    """Whether a member (``prefix``.``suffix``) starts a new raw item: another key than the current
    sample's, or a file the current sample already has (its key written again: webdataset would
    merge the two samples into one)."""
    return prefix != current_key or suffix in current_suffixes


def read_shard(url: str) -> Iterator[dict]:
    """Samples of one tar in order; a truncated or unreadable tar ends with an error marker, and a
    tar without any sample is one ``empty_shard`` marker (so a stream of only empty shards still
    hands control back, and the training loader can tell it will never yield a sample). The last
    item of every shard carries ``SHARD_END`` (the training loader counts completed shard visits).

    A key that occurs again in the shard (right after itself or later) makes a ``duplicate_key``
    marker of the repeat: the first sample with the key is kept whole, the repeat is skipped and
    counted, never merged into its neighbour. The incomplete sample at a truncation point is dropped
    with the rest of the shard."""
    try:
        f = _open(url)
    except OSError as e:
        yield {ERROR_KEY: "unreadable_shard", "__url__": url, "__detail__": str(e), SHARD_END: True}
        return
    current: dict | None = None
    keys: set[str] = set()
    try:
        with f:
            for name, data in _members(f, url):
                prefix, suffix = base_plus_ext(name)
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if current is None or starts_sample(prefix, suffix, current["__key__"], current):
                    if current is not None:
                        yield current
                    current = {"__key__": prefix, "__url__": url}
                    if prefix in keys:
                        current.update({ERROR_KEY: "duplicate_key", "__detail__": f"key {prefix!r} occurs again "
                                        "in this shard; the first sample with it is kept"})
                    keys.add(prefix)
                current[suffix] = data
        if current is not None:
            current[SHARD_END] = True
            yield current
        else:
            yield {ERROR_KEY: "empty_shard", "__url__": url, SHARD_END: True}
    except Exception as e:  # noqa: BLE001 - any read failure ends this shard, counted by reason
        yield {ERROR_KEY: "truncated_tar", "__url__": url, "__detail__": f"{type(e).__name__}: {e}",
               SHARD_END: True}


def raw_stream(spec: StreamSpec, slot: int, k: int, off: int, finite: bool = False) -> Iterator[tuple[int, int, dict]]:
    """(k, offset, raw sample) from sequence index k, skipping the raw samples of it before ``off``."""
    n_finite = len(range(spec.rank * spec.workers + slot, len(spec.epoch_shards),
                         spec.world_size * spec.workers))
    while True:
        if finite and k >= n_finite:
            return
        url, start, stop, offsets = piece_at(spec, slot, k)
        first, last = max(off, start), (max(offsets) + 1 if offsets else stop)
        wanted = set(offsets) if offsets else None
        if last < 0 or first < last:
            for i, sample in enumerate(read_shard(url)):
                if 0 <= last <= i:
                    break
                if i >= first and (wanted is None or i in wanted):
                    yield k, i, sample
        k, off = k + 1, 0


def shard_len(url: str) -> int:
    """Raw items ``read_shard`` yields for a shard (an error marker counts as one).

    A local uncompressed tar is counted from its headers alone (tarfile seeks over the member data);
    anything else, or a tar whose last member runs past the end of the file, is read through."""
    if not (url.startswith("pipe:") or "://" in url or url.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst"))):
        try:
            with open(url, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                tf = tarfile.open(fileobj=f, mode="r:")
                n, prev, suffixes, end = 0, None, set(), 0
                while (m := tf.next()) is not None:
                    tf.members = []
                    end = max(end, m.offset_data + m.size)
                    if not m.isreg() or (m.name.startswith("__") and META.match(m.name)):
                        continue
                    prefix, suffix = base_plus_ext(m.name)
                    if prefix is None:
                        continue
                    suffix = suffix.lower()
                    if starts_sample(prefix, suffix, prev, suffixes):
                        n, prev, suffixes = n + 1, prefix, set()
                    suffixes.add(suffix)
                if end <= size:
                    return n
        except (OSError, tarfile.TarError):
            pass
    return sum(1 for _ in read_shard(url))


def block_order(spec: StreamSpec, slot: int, block: int, n: int) -> np.ndarray:
    """The order in which the ``n`` raw items of a shuffle block are emitted."""
    return _rng(spec.seed, spec.rank, slot, block, 3, *spec.salt(slot)).permutation(n)


def initial_cursor() -> dict:
    return {"block": 0, "k": 0, "off": 0, "taken": 0}


def take_block(spec: StreamSpec, slot: int, raw: Iterator[tuple[int, int, dict]], size: int,
               carry: list[tuple[int, int, dict]]) -> tuple[list[tuple[int, int, dict]], list[tuple[int, int, dict]]]:
    """The next shuffle block of up to ``size`` raw items (``carry``: an item read ahead, first).

    A block never mixes a slot's rest pieces with the shards that follow them, so the epoch the
    pieces finish is complete before the next one starts (a block may otherwise span two epochs)."""
    p = n_rest(spec, slot) if spec.rest is not None else 0
    items = list(carry)
    for item in raw:
        if p and items and items[-1][0] < p <= item[0]:
            return items, [item]
        items.append(item)
        if len(items) == size:
            break
    return items, []


def slot_samples(spec: StreamSpec, slot: int, cursor: dict, finite: bool = False) -> Iterator[tuple[dict, dict, int]]:
    """Yield (raw sample, cursor after it, per-sample seed) for one slot, starting at ``cursor``.

    The per-sample seed (for augmentation and random regions) is a function of the stream position
    only, so a restored stream re-creates the same crops and regions."""
    block, k, off, taken = cursor["block"], cursor["k"], cursor["off"], cursor["taken"]
    raw = raw_stream(spec, slot, k, off, finite)
    size = max(1, spec.shuffle_buffer) if not finite else 1
    carry: list[tuple[int, int, dict]] = []
    while True:
        items, carry = take_block(spec, slot, raw, size, carry)
        if not items:
            return
        order = block_order(spec, slot, block, len(items)) if size > 1 else [0]
        next_k, next_off = items[-1][0], items[-1][1] + 1
        for j in range(taken, len(items)):
            sample = items[int(order[j])][2]
            if j + 1 < len(items):
                cur = {"block": block, "k": k, "off": off, "taken": j + 1}
            else:
                cur = {"block": block + 1, "k": next_k, "off": next_off, "taken": 0}
            seed = mix_seed(spec.seed, spec.rank, slot, block, j, *spec.salt(slot))
            yield sample, cur, seed
        block, k, off, taken = block + 1, next_k, next_off, 0


def image_bytes(sample: dict) -> bytes | None:
    for ext in ("jpg", "jpeg", "png", "webp"):
        if ext in sample:
            return sample[ext]
    return None
