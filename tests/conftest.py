"""Shared pytest fixtures.

``debug_checks``: the value-reading checks of ``powerclip.checks`` on (``train.debug_checks``) for one
test, as training turns them on; the previous setting comes back afterwards.

``synthetic_root``: one small synthetic dataset (powerclip.data.synthetic) built once per test
session, for every test that reads shards: OUT/train/{00000..00002}.tar (3 x 64 samples),
OUT/val/00000.tar and OUT/heldout/00000.tar (64 each), 32 px PNG, plus sizes.json per split,
manifest.json and classes.json. Treat it as read-only; tests that need to damage shards copy them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

SYNTH_TRAIN_SHARDS = 3
SYNTH_PER_SHARD = 64
SYNTH_IMAGE_SIZE = 32


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the Slurm cluster runs on the same pytest-xdist worker (``--dist
    loadgroup``): one cluster, started once, and never two tests' jobs competing for its nodes."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture
def debug_checks() -> Iterator[None]:
    from powerclip import checks

    before = checks.enabled()
    checks.set_enabled(True)
    yield
    checks.set_enabled(before)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from powerclip.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, train_shards=SYNTH_TRAIN_SHARDS, val_shards=1, heldout_shards=1,
                   per_shard=SYNTH_PER_SHARD, image_size=SYNTH_IMAGE_SIZE, seed=0)
    return root
