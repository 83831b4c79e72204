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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the marker to group
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the Slurm cluster runs on the same pytest-xdist worker (``--dist
    loadgroup``): one cluster, started once, and never two tests' jobs competing for its nodes."""
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))


class _GroupingCheck:
    """Fails the collection when pytest-xdist did not group the Slurm tests.

    Why: xdist groups by appending ``@group`` to each test id, which pytest 9.2 no longer lets it
    do; the tests then ran on both workers at once, their jobs competed for the cluster's nodes and
    a wrong-port rank joined another job's rendezvous. A silent loss of grouping shows as rare
    Slurm flakes, so it is made loud here (constraints.txt pins a pytest where grouping works).
    """

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if not getattr(config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
            return
        lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(f"pytest-xdist did not apply xdist_group to {len(lost)} test(s) "
                                    f"(first: {lost[0]}); pytest {pytest.__version__} and this pytest-xdist "
                                    "do not work together, see constraints.txt")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_GroupingCheck(), "powerclip-xdist-grouping-check")


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
                   per_shard=SYNTH_PER_SHARD, image_size=SYNTH_IMAGE_SIZE, seed=0, binding_pairs=24,
                   single_objects=24)
    return root
