"""Map the data cursors of W ranks x V workers onto W' ranks x V' workers (an elastic resume).

A cursor of ``stream.slot_samples`` is tied to its slot: slot g of S = W*V reads the shards g, g+S,
... of each epoch's permutation. After a resume on another layout the old slots no longer exist,
so the position is translated into *what is left*:

* epoch mode: E = the newest epoch any old slot has consumed a sample of (at least the epoch the
  old layout was itself finishing). Everything of epochs <= E that no old slot has consumed yet -
  the unemitted items of each slot's current shuffle block, the rest of its current shard, its
  remaining shards of those epochs - becomes a list of *pieces* (shard, index range or explicit
  indices). The pieces are cut into S' runs of equal sample count (shard sizes read from the tar
  headers), one per new slot, which delivers its run (shuffled in blocks as usual) and then
  continues with its own shards of epoch E+1 in the new layout, drawn from the seed as usual.
  Every sample of every epoch is therefore delivered exactly once (a shard an epoch holds m copies
  of, ``data.sources`` weights or upsampling factors: exactly m times); what differs from an
  uninterrupted run is the order (and so the batch composition and the augmentation seeds) from
  the resume to the end of epoch E. A remap can follow a remap: the pieces are part of the cursor.
* resampled mode: a slot that exists in both layouts (same rank and worker number) continues its
  own stream from its saved position; a slot new to the layout starts a stream salted with the
  checkpoint step, so it never replays a stream an earlier slot with that number produced. The
  streams of slots that no longer exist simply end. The stream is a different random draw from an
  uninterrupted run's, with the same distribution.

Skip counters are summed into rank 0's first slot (they are only ever reported as sums).
A checkpoint whose shard list differs from the configured one cannot be mapped: the positions
would name other shards, so that is an error.
"""

from __future__ import annotations

import dataclasses
import hashlib

from powerclip.errors import UserError

from .stream import (
    Piece,
    StreamSpec,
    block_order,
    epoch_end,
    epoch_of,
    initial_cursor,
    piece_at,
    raw_stream,
    shard_len,
    take_block,
)


class RemapError(UserError, ValueError):
    """A saved data cursor cannot be translated to this run (message names the cause)."""


def shards_fingerprint(spec: StreamSpec) -> str:
    """Identifies the ordered shard list that cursor positions refer to (an epoch's weighted multiset:
    changing the repeats of a shard moves the positions as much as changing the list)."""
    return hashlib.blake2b("\n".join(spec.epoch_shards).encode(), digest_size=8).hexdigest()


def pieces_from_json(rest) -> tuple[tuple[Piece, ...], ...] | None:
    if rest is None:
        return None
    return tuple(tuple((str(u), int(a), int(b), tuple(int(o) for o in offs)) for u, a, b, offs in slot)
                 for slot in rest)


def check_compatible(state: dict, spec: StreamSpec) -> None:
    """Refuse a saved cursor whose positions would name other shards than this run's."""
    saved = state.get("shards")
    if saved is not None and saved != shards_fingerprint(spec):
        raise RemapError(f"the data cursor in the checkpoint refers to another shard list (fingerprint "
                         f"{saved}, this run's data.sources give {shards_fingerprint(spec)} over "
                         f"{len(spec.epoch_shards)} shards per epoch): data.sources changed since the checkpoint, so "
                         "the saved position cannot be mapped; restore the shard list or start the data "
                         "stream afresh with a new run")
    if "resampled" in state and bool(state["resampled"]) != spec.resampled:
        raise RemapError(f"the checkpoint was written with data.resampled={bool(state['resampled'])}, this "
                         f"run has data.resampled={spec.resampled}; the data cursor cannot be mapped")


def old_spec(state: dict, spec: StreamSpec) -> StreamSpec:
    """The stream spec the rank that saved ``state`` ran with (keys missing in older states: ours)."""
    return dataclasses.replace(spec, seed=int(state.get("seed", spec.seed)), rank=int(state["rank"]),
                               world_size=int(state["world_size"]), workers=int(state["workers"]),
                               shuffle_buffer=int(state.get("shuffle_buffer", spec.shuffle_buffer)),
                               shard_shuffle=bool(state.get("shard_shuffle", spec.shard_shuffle)),
                               rest=pieces_from_json(state.get("rest")), rest_epoch=int(state.get("rest_epoch", -1)),
                               salts=tuple(int(s) for s in state.get("salts", ())))


def remap(old: list[dict], spec: StreamSpec, salt: int) -> tuple[StreamSpec, dict[int, dict]]:
    """This rank's spec and slot states for a run laid out as ``spec``, from every old rank's state.

    Deterministic: every new rank computes the same global plan and keeps its own slots."""
    if not old:
        raise RemapError("the checkpoint holds no data cursor")
    world = int(old[0]["world_size"])
    if len(old) != world or [int(s["rank"]) for s in old] != list(range(world)):
        raise RemapError(f"the checkpoint holds data cursors of ranks {[s.get('rank') for s in old]}, "
                         f"expected 0..{world - 1}")
    for s in old:
        check_compatible(s, spec)
    counters: dict[str, int] = {}
    for s in old:
        for v in s["slots"].values():
            for reason, n in v["counters"].items():
                counters[reason] = counters.get(reason, 0) + int(n)
    if spec.resampled:
        new_spec, slots = _remap_resampled(old, spec, salt)
    else:
        new_spec, slots = _remap_epoch(old, spec, salt)
    if spec.rank == 0:
        slots.setdefault(0, {"cursor": initial_cursor(), "counters": {}})["counters"] = counters
    return new_spec, slots


def _remap_resampled(old: list[dict], spec: StreamSpec, salt: int) -> tuple[StreamSpec, dict[int, dict]]:
    salts, slots = [], {}
    prev = old[spec.rank] if spec.rank < len(old) else None
    for w in range(spec.workers):
        if prev is not None and w < int(prev["workers"]):
            saved_salts = prev.get("salts", [])
            salts.append(int(saved_salts[w]) if w < len(saved_salts) else 0)
            if str(w) in prev["slots"]:
                slots[w] = {"cursor": dict(prev["slots"][str(w)]["cursor"]), "counters": {}}
        else:
            salts.append(salt)
    return dataclasses.replace(spec, salts=tuple(salts)), slots


def _consumed(spec: StreamSpec, slot: int, cursor: dict) -> tuple[int, list[tuple[int, int]], tuple[int, int]]:
    """(newest epoch consumed or an upper bound of it, -1 if nothing; unemitted (k, i) of the current
    block; first position after the block) for one old slot."""
    block, k, off, taken = cursor["block"], cursor["k"], cursor["off"], cursor["taken"]
    if taken > 0:
        block_items, _ = take_block(spec, slot, raw_stream(spec, slot, k, off), max(1, spec.shuffle_buffer), [])
        items = [(kk, i) for kk, i, _ in block_items]
        order = block_order(spec, slot, block, len(items)) if spec.shuffle_buffer > 1 else [0]
        done = [items[int(order[j])] for j in range(taken)]
        pending = [items[int(order[j])] for j in range(taken, len(items))]
        return max(epoch_of(spec, slot, kk) for kk, _ in done), pending, (items[-1][0], items[-1][1] + 1)
    if off > 0:
        last = epoch_of(spec, slot, k)
    elif k > 0:
        last = epoch_of(spec, slot, k - 1)  # >= the epoch of the last consumed item
    else:
        last = -1
    return last, [], (k, off)


def _remap_epoch(old: list[dict], spec: StreamSpec, salt: int) -> tuple[StreamSpec, dict[int, dict]]:
    per_slot = []
    newest = -1
    for s in old:
        o = old_spec(s, spec)
        if o.rest is not None:
            newest = max(newest, o.rest_epoch)
        for w in range(o.workers):
            cursor = s["slots"].get(str(w), {}).get("cursor") or initial_cursor()
            last, pending, start = _consumed(o, w, cursor)
            newest = max(newest, last)
            per_slot.append((o, w, pending, start))
    pieces: list[Piece] = []
    for o, w, pending, (k0, off0) in per_slot:
        by_k: dict[int, list[int]] = {}
        for k, i in pending:
            if epoch_of(o, w, k) <= newest:  # later epochs come from the new layout
                by_k.setdefault(k, []).append(i)
        pieces.extend((piece_at(o, w, k)[0], 0, -1, tuple(sorted(ix))) for k, ix in by_k.items())
        for k in range(k0, epoch_end(o, w, newest)):
            url, start, stop, offs = piece_at(o, w, k)
            if k == k0:
                start = max(start, off0)
                offs = tuple(i for i in offs if i >= off0) if offs else ()
                if piece_at(o, w, k)[3] and not offs:
                    continue
            pieces.append((url, start, stop, offs))
    runs = _split(pieces, spec.world_size * spec.workers)
    mine = tuple(tuple(runs[spec.rank * spec.workers + w]) for w in range(spec.workers))
    new_spec = dataclasses.replace(spec, rest=mine, rest_epoch=newest, salts=(salt,) * spec.workers)
    return new_spec, {}


def _split(pieces: list[Piece], n: int) -> list[list[Piece]]:
    """Cut the pieces into n runs whose sample counts differ by at most one, in order."""
    sized: list[tuple[Piece, int]] = []
    lengths: dict[str, int] = {}
    for url, start, stop, offs in pieces:
        if offs:
            sized.append(((url, start, stop, offs), len(offs)))
            continue
        if stop < 0:
            if url not in lengths:
                lengths[url] = shard_len(url)
            stop = lengths[url]
        if stop > start:
            sized.append(((url, start, stop, ()), stop - start))
    total = sum(c for _, c in sized)
    quotas = [total // n + (1 if r < total % n else 0) for r in range(n)]
    runs: list[list[Piece]] = [[] for _ in range(n)]
    r = 0
    for (url, start, _stop, offs), count in sized:
        while count > 0:
            while quotas[r] == 0:
                r += 1
            take = min(count, quotas[r])
            if offs:
                runs[r].append((url, 0, -1, offs[:take]))
                offs = offs[take:]
            else:
                runs[r].append((url, start, start + take, ()))
                start += take
            quotas[r] -= take
            count -= take
    return runs
