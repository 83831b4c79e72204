"""How the configured sources are mixed: per-source probabilities or open_clip's per-shard factors.

Two ways to say it, one per source list (mixing them would leave the scale between the two open):

* ``data.sources[i].weight``: the probability of drawing from source i (normalised over sources),
  whatever its shard count. Unset weights count as 1.0.
* ``data.sources[i].upsampling_factors``: open_clip's ``--train-data-upsampling-factors``, with its
  syntax: as many ``::``-separated numbers as the source's ``shards`` has ``::``-separated patterns
  (or one number for all of them). Every shard of a pattern weighs its factor, so a source's share
  grows with its shard count, exactly as open_clip draws ``--train-data 'a::b'``.

Both reduce to a weight per shard. Resampled mode draws a source by the sum of its shards' weights,
then a shard of it by weight. Epoch mode makes the epoch the weighted *multiset*: shard s appears
``m_s = w_s / min(w)`` times, which must be a whole number (within 1e-6), so that every epoch
realises the shares exactly and "exactly once per epoch" becomes "exactly ``m_s`` times per epoch".
With no weight and no factor set, every shard appears once (the plain epoch).
"""

from __future__ import annotations

from dataclasses import dataclass

from braceexpand import braceexpand

from powerclip.errors import UserError

WHOLE_TOL = 1e-6  # how far a repeat count may lie from a whole number (float weights such as 0.1)


class MixingError(UserError, ValueError):
    """The source weights or upsampling factors cannot be used (message names the key)."""


@dataclass(frozen=True)
class Mix:
    """The resolved mix: per source its shard urls, its draw weight and its shards' relative weights."""

    urls: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]  # resampled mode: probability of a source, up to normalisation
    factors: tuple[tuple[float, ...], ...]  # per source: each shard's weight inside it; () = uniform
    repeats: tuple[int, ...]  # epoch mode: copies of each shard (all sources' shards in order); () = once


def expand_parts(pattern: str) -> list[list[str]]:
    """The shard urls of each '::'-separated part of a pattern, brace-expanded (empty urls dropped)."""
    return [[u for u in braceexpand(part.strip()) if u] for part in pattern.split("::")]


def parse_factors(key: str, text: str, n_parts: int) -> list[float]:
    """open_clip's factor string ('1::2::0.5', or one number for every part) -> one factor per part."""
    raw = [t.strip() for t in str(text).split("::")]
    if len(raw) == 1:
        raw = raw * n_parts
    if len(raw) != n_parts:
        raise MixingError(f"{key}={text!r} gives {len(raw)} factors for {n_parts} '::'-separated shard "
                          "patterns; give one per pattern (open_clip's syntax) or a single number")
    try:
        values = [float(t) for t in raw]
    except ValueError:
        raise MixingError(f"{key}={text!r} is not a '::'-separated list of numbers (e.g. '1::2')") from None
    if any(not v > 0 for v in values):
        raise MixingError(f"{key}={text!r}: every factor must be > 0 (leave a pattern out to drop it)")
    return values


def resolve_mix(sources: list[tuple[list[list[str]], float | None, str | None]], resampled: bool) -> Mix:
    """The mix of sources given as (urls per '::' part, weight or None, factor string or None)."""
    with_factors = [i for i, (_, _, f) in enumerate(sources) if f is not None]
    with_weight = [i for i, (_, w, _) in enumerate(sources) if w is not None]
    if with_factors and with_weight:
        i = with_weight[0]
        raise MixingError(f"data.sources[{i}].weight is set while data.sources[{with_factors[0]}]."
                          "upsampling_factors is set too; use per-source weights or per-shard "
                          "upsampling_factors for all sources, not both")
    if with_factors and len(with_factors) != len(sources):
        i = next(i for i in range(len(sources)) if i not in with_factors)
        raise MixingError(f"data.sources[{i}].upsampling_factors is not set while other sources set it; "
                          "give every source its factors (1 keeps a shard's weight as open_clip's default)")
    urls = tuple(tuple(u for part in parts for u in part) for parts, _, _ in sources)
    shard_w: list[list[float]] = []
    if with_factors:
        for i, (parts, _, text) in enumerate(sources):
            fs = parse_factors(f"data.sources[{i}].upsampling_factors", text, len(parts))
            shard_w.append([f for part, f in zip(parts, fs) for _ in part])
        weights = tuple(sum(w) for w in shard_w)
        factors = tuple(tuple(w) if len(set(w)) > 1 else () for w in shard_w)
    else:
        for i, (_, w, _) in enumerate(sources):
            if w is not None and not w > 0:
                raise MixingError(f"data.sources[{i}].weight must be > 0, got {w}")
        weights = tuple(1.0 if w is None else float(w) for _, w, _ in sources)
        shard_w = [[w / len(u)] * len(u) for w, u in zip(weights, urls)]
        factors = tuple(() for _ in sources)
    repeats: tuple[int, ...] = ()
    if not resampled and (with_factors or with_weight):
        repeats = _repeats(shard_w, "upsampling_factors" if with_factors else "weight")
    return Mix(urls, weights, factors, repeats)


def _repeats(shard_w: list[list[float]], key: str) -> tuple[int, ...]:
    """Copies of each shard per epoch: its weight over the smallest weight, a whole number."""
    low = min(w for ws in shard_w for w in ws)
    out: list[int] = []
    for i, ws in enumerate(shard_w):
        for w in ws:
            m = w / low
            if abs(m - round(m)) > WHOLE_TOL * m:
                raise MixingError(
                    f"data.sources[{i}].{key}: epoch mode (data.resampled=false) repeats each shard a whole "
                    f"number of times per epoch, and these {key} ask for {m:.4g} copies of this source's "
                    "shards per copy of the lightest shard; choose values whose per-shard weights are whole "
                    "multiples of each other (a source weight is shared by its shards) or set data.resampled=true")
            out.append(round(m))
    return tuple(out) if any(m != 1 for m in out) else ()
