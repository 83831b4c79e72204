"""Statistics of a comparison over seeds and items: a hierarchical bootstrap and Holm's correction.

Why a bootstrap over both: a method comparison trains each arm on a few seeds and scores every seed
on the SAME evaluation items, so a mean has two sources of error, the seeds (training noise) and the
items (which scenes happened to be drawn). A Student-t interval over seed means sees the first only;
resampling items as well sees both, and needs no normality of a handful of seed means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BootstrapResult:
    mean: float  # the statistic on the data: the mean over seeds of each seed's mean over items
    low: float  # percentile interval at the asked level
    high: float
    p: float  # two-sided bootstrap p-value of "the mean is 0" (meaningful for a paired difference)


def hierarchical_bootstrap(values: np.ndarray | Sequence[Sequence[float]], n_boot: int = 10000,
                           level: float = 0.95, seed: int = 0, chunk: int = 500) -> BootstrapResult:
    """Bootstrap of the grand mean of ``values[seed, item]`` (every seed scored on the same items).

    Each replicate draws the seeds with replacement, then the items with replacement, and takes the
    mean of the drawn seeds' means over the drawn items. The item draw is shared by the drawn seeds
    because the items are: each seed scores the same items, so an item that is hard for one seed is
    hard for all, and drawing the items anew per seed would average that item effect away (the item
    variance would shrink by the number of seeds). With one seed it is the ordinary bootstrap over
    items; with one item, the ordinary bootstrap over seeds.

    The p-value is 2 x the smaller share of replicates on either side of 0, counted as (k + 1) /
    (n_boot + 1) so that it is never 0. With few seeds the seed level understates its variance by the
    factor (S - 1) / S, like any bootstrap of S values.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"hierarchical_bootstrap needs a [seeds, items] array, got shape {x.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n_seeds, n_items = x.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        items = rng.integers(0, n_items, size=(b, n_items))
        seeds = rng.integers(0, n_seeds, size=(b, n_seeds))
        # per replicate, every seed's mean over the drawn items: [b, n_seeds]
        per_seed = np.stack([x[s][items].mean(axis=1) for s in range(n_seeds)], axis=1)
        stats[start:start + b] = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    alpha = 1 - level
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    below, above = int((stats <= 0).sum()), int((stats >= 0).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (n_boot + 1))
    return BootstrapResult(float(x.mean(axis=1).mean()), float(low), float(high), p)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sort ascending, multiply the k-th
    smallest (1-based) by m - k + 1, keep the running maximum, cap at 1. Rejecting every hypothesis
    whose adjusted p is <= alpha controls the family-wise error rate at alpha for any dependence."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        adjusted[i] = running
    return adjusted
