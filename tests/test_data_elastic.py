"""Elastic data resume: the cursor of W ranks x V workers continued on W' x V' (powerclip.data.remap).

Epoch mode: 2 ranks -> 1 rank -> 3 ranks (workers changing too) over one epoch of 6 real shards
delivers every key of the epoch exactly once, and the next epoch again exactly once. Resampled mode:
slots present in both layouts continue their own stream exactly."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from powerclip.config import load_config
from powerclip.data import build_loader
from powerclip.data.loader import DataError

TINY = ("model.config={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1}, "
        "text_cfg: {context_length: 32, width: 32, heads: 2, layers: 1}}")
SHARDS, PER_SHARD = 6, 16


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory) -> Path:
    from powerclip.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("elastic")
    make_synthetic(root, train_shards=SHARDS, val_shards=1, heldout_shards=1, per_shard=PER_SHARD,
                   image_size=32, seed=1)
    return root


def _cfg(root: Path, batch: int, workers: int, *extra: str, shards: str = "{00000..00005}"):
    return load_config(None, [f"data.sources=[{{shards: '{root}/train/{shards}.tar'}}]", TINY,
                              "data.context_length=32", f"data.batch_size={batch}", f"data.workers={workers}",
                              "data.shuffle_buffer=10", "data.seed=3", "data.resampled=false", *extra])


def _phase(cfg, world: int, batches: int, old: list[dict] | None, salt: int) -> tuple[list[str], list[dict]]:
    """``batches`` batches on each of ``world`` ranks; the keys and every rank's state (via JSON)."""
    keys, states = [], []
    for rank in range(world):
        state = None if old is None else {"elastic_from": old, "salt": salt}
        loader = build_loader(cfg, rank, world, state=state)
        keys += [k for b in islice(iter(loader), batches) for k in b.keys]
        states.append(json.loads(json.dumps(loader.state_dict())))
    return keys, states


def test_epoch_mode_two_one_three_ranks_every_key_once(six_shards: Path):
    epoch = {f"train_{i:08d}" for i in range(SHARDS * PER_SHARD)}
    # 2 ranks x 1 worker, 2 batches of 6 each: stops mid-shard and mid shuffle block (10)
    a, states = _phase(_cfg(six_shards, 6, 1), 2, 2, None, 0)
    # 1 rank x 2 workers: its 72 left are split 36/36 over its two slots; 4 batches of 6
    b, states = _phase(_cfg(six_shards, 6, 2), 1, 4, states, 3)
    # 3 ranks x 2 workers: the 48 left, 8 per slot = 2 batches of 4 per slot, 4 per rank
    c, states = _phase(_cfg(six_shards, 4, 2), 3, 4, states, 7)
    consumed = a + b + c
    assert len(a) == 24 and len(b) == 24 and len(c) == 48
    assert set(consumed) <= epoch, set(consumed) - epoch
    assert Counter(consumed) == Counter(epoch)  # every key exactly once, none missing
    # the next epoch follows the new layout: 6 slots x one shard of 16 = 4 batches of 4 per slot (a
    # shuffle block of 16 now, so that no block of this epoch reaches into the one after it; every
    # slot's rest ended on a block boundary, so the blocks can change here)
    nxt, _ = _phase(_cfg(six_shards, 4, 2, "data.shuffle_buffer=16"), 3, 8, states, 7)
    assert Counter(nxt) == Counter(epoch)


def test_epoch_mode_save_right_after_a_remap(six_shards: Path):
    """A remapped cursor saved before any batch maps again (the rest pieces are part of the state)."""
    a, states = _phase(_cfg(six_shards, 6, 1), 2, 3, None, 0)
    _, states = _phase(_cfg(six_shards, 6, 1), 3, 0, states, 1)
    b, _ = _phase(_cfg(six_shards, 6, 1), 1, 10, states, 2)  # 60 left: 10 batches of 6 on one rank
    assert Counter(a + b) == Counter(f"train_{i:08d}" for i in range(SHARDS * PER_SHARD))


def test_resampled_slots_continue_their_stream(six_shards: Path):
    cfg = _cfg(six_shards, 4, 1, "data.resampled=true")
    straight = [b.keys for b in islice(iter(build_loader(cfg, 1, 2)), 6)]
    _, states = _phase(cfg, 2, 3, None, 0)
    three = load_config(None, [f"data.sources=[{{shards: '{six_shards}/train/{{00000..00005}}.tar'}}]", TINY,
                               "data.context_length=32", "data.batch_size=4", "data.workers=1",
                               "data.shuffle_buffer=10", "data.seed=3", "data.resampled=true"])
    cont = build_loader(three, 1, 3, state={"elastic_from": states, "salt": 3})
    assert [b.keys for b in islice(iter(cont), 3)] == straight[3:]  # rank 1 goes on exactly
    fresh = build_loader(three, 2, 3, state={"elastic_from": states, "salt": 3})
    plain = build_loader(three, 2, 3)
    assert [b.keys for b in islice(iter(fresh), 3)] != [b.keys for b in islice(iter(plain), 3)]


def test_changed_shard_list_cannot_be_mapped(six_shards: Path):
    _, states = _phase(_cfg(six_shards, 6, 1), 2, 1, None, 0)
    other = _cfg(six_shards, 6, 1, shards="{00000..00004}")
    with pytest.raises(DataError, match="data.sources changed since the checkpoint"):
        build_loader(other, 0, 3, state={"elastic_from": states, "salt": 1})
    with pytest.raises(DataError, match="data.sources changed since the checkpoint"):
        build_loader(other, 0, 2, state=states[0])
