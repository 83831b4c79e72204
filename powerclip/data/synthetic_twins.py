"""Binding twins in the synthetic data: how often a batch makes the contrastive loss teach binding.

Two scenes are binding twins when they hold the same colours and the same shapes but bound
differently ("a red circle and a blue square" vs "a blue circle and a red square"). Their captions
have the same bag of words, so a batch holding both can only be solved by binding colours to
shapes; a batch without twins is solved by matching the bag of words, which is what CLIP learns
from web data. How often twins meet in a batch decides whether plain CLIP trained on this data
binds at all, and so whether the swap kinds of the benchmark can show a method adding binding.
"""

from __future__ import annotations

import random
from collections import Counter

from powerclip.data.synthetic import DEFAULT_COLOURS, Obj, colour_vocabulary, heldout_pairs, sample_scene

Key = tuple[tuple[tuple[str, ...], tuple[str, ...]], tuple[tuple[str, str], ...]]


def scene_key(objs: list[Obj]) -> Key:
    """(bag, binding): the sorted colours and shapes, and the sorted (colour, shape) pairs."""
    bag = (tuple(sorted(o.colour for o in objs)), tuple(sorted(o.shape for o in objs)))
    return bag, tuple(sorted((o.colour, o.shape) for o in objs))


def are_twins(a: Key, b: Key) -> bool:
    return a[0] == b[0] and a[1] != b[1]


def count_twin_pairs(keys: list[Key]) -> int:
    """Unordered pairs of the list that are binding twins (counted, not estimated)."""
    bags = Counter(k[0] for k in keys)
    same = Counter(keys)
    same_bag = sum(n * (n - 1) // 2 for n in bags.values())
    same_binding = sum(n * (n - 1) // 2 for n in same.values())
    return same_bag - same_binding


def train_scene_keys(n: int, seed: int = 0, num_colours: int = DEFAULT_COLOURS,
                     relation_prob: float = 1.0) -> list[Key]:
    """Keys of the first ``n`` train scenes exactly as make_sample draws them (same rng stream)."""
    colours = colour_vocabulary(num_colours)
    held = heldout_pairs(seed, colours=colours)
    keys = []
    for i in range(n):
        objs, _ = sample_scene(random.Random(f"{seed}-train-{i}"), "train", held, relation_prob, colours)
        keys.append(scene_key(objs))
    return keys


def twin_rates(keys: list[Key], batch: int) -> dict[str, float]:
    """Rates of a batch of ``batch`` scenes drawn at random from the distribution ``keys`` samples.

    ``pair``: P(two random scenes are twins); ``scene_has_twin``: mean over scenes of P(at least one
    of the batch's other scenes is its twin) = 1 - (1 - q_i)^(batch - 1), q_i the share of the other
    sampled scenes that are scene i's twins; ``pairs_per_batch``: expected twin pairs in a batch;
    ``batch_has_twin``: share of the disjoint batches of ``keys`` (in order) holding at least one pair.
    """
    if len(keys) < 2 or batch < 2:
        raise ValueError(f"twin_rates needs >= 2 keys and batch >= 2, got {len(keys)} keys, batch {batch}")
    bags = Counter(k[0] for k in keys)
    same = Counter(keys)
    n = len(keys)
    q = [(bags[k[0]] - same[k]) / (n - 1) for k in keys]
    pair = sum(q) / n
    batches = [keys[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return {"pair": pair,
            "scene_has_twin": sum(1 - (1 - qi) ** (batch - 1) for qi in q) / n,
            "pairs_per_batch": pair * batch * (batch - 1) / 2,
            "batch_has_twin": (sum(count_twin_pairs(b) > 0 for b in batches) / len(batches)) if batches else float("nan")}
