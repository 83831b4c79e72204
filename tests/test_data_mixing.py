"""Source mixing (powerclip.data.mixing): open_clip's per-shard upsampling factors beside per-source
weights, in resampled mode (realised shares within a binomial tolerance) and in epoch mode (every
sample delivered exactly its multiplicity times per epoch, across an elastic resume too), and the
one-line errors of a mix that cannot run. Real tar shards throughout."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from powerclip.config import ConfigError, load_config
from powerclip.data import build_loader
from powerclip.data.loader import DataError, make_spec
from powerclip.data.mixing import resolve_mix
from powerclip.data.stream import SHARD_END, initial_cursor, slot_samples

TINY = ("model.config={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 1}, "
        "text_cfg: {context_length: 32, width: 32, heads: 2, layers: 1}}")
SHARDS, PER_SHARD = 6, 16


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory) -> Path:
    from powerclip.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("mixing")
    make_synthetic(root, train_shards=SHARDS, val_shards=1, heldout_shards=1, per_shard=PER_SHARD,
                   image_size=32, seed=2)
    return root


def _cfg(sources: str, *extra: str):
    return load_config(None, [f"data.sources={sources}", TINY, "data.context_length=32", *extra])


def _shard(root: Path, i: int) -> str:
    return f"{root}/train/{i:05d}.tar"


def test_resampled_shares_follow_the_upsampling_factors(six_shards: Path):
    """open_clip's meaning: each shard weighs its pattern's factor, so a source's share grows with its
    shard count. Source 0 = shard 0 (factor 1) :: shards 1-2 (factor 3); source 1 = shards 3-5 (factor 1):
    shard weights 1,3,3,1,1,1 - source 0 draws 7/10 of the shard visits, shard 0 1/10."""
    r = six_shards
    cfg = _cfg(f"[{{shards: '{_shard(r, 0)}::{r}/train/{{00001..00002}}.tar', upsampling_factors: '1::3'}}, "
               f"{{shards: '{r}/train/{{00003..00005}}.tar', upsampling_factors: 1}}]",
               "data.shuffle_buffer=1", "data.workers=1", "data.seed=11")
    spec = make_spec(cfg, 0, 1)
    n = 1200
    visits = Counter(raw["__url__"] for raw, _, _ in islice(
        (s for s in slot_samples(spec, 0, initial_cursor()) if s[0].get(SHARD_END)), n))
    assert sum(visits.values()) == n
    expected = {_shard(r, i): w / 10 for i, w in enumerate((1, 3, 3, 1, 1, 1))}
    for url, p in expected.items():
        tol = 4 * math.sqrt(n * p * (1 - p))  # 4 binomial standard deviations
        assert abs(visits[url] - n * p) <= tol, (url, visits[url], n * p, tol)
    src0 = sum(visits[_shard(r, i)] for i in range(3))
    assert abs(src0 - 0.7 * n) <= 4 * math.sqrt(n * 0.7 * 0.3), src0


def test_resampled_source_weight_ignores_shard_counts(six_shards: Path):
    """Per-source probabilities keep their meaning: 1 shard at weight 1 against 5 shards at weight 1 is
    half the visits each, whatever the shard counts."""
    r = six_shards
    cfg = _cfg(f"[{{shards: '{_shard(r, 0)}', weight: 1}}, {{shards: '{r}/train/{{00001..00005}}.tar'}}]",
               "data.shuffle_buffer=1", "data.workers=1", "data.seed=4")
    n = 800
    visits = Counter(raw["__url__"] for raw, _, _ in islice(
        (s for s in slot_samples(make_spec(cfg, 0, 1), 0, initial_cursor()) if s[0].get(SHARD_END)), n))
    assert abs(visits[_shard(r, 0)] - n / 2) <= 4 * math.sqrt(n / 4), visits


# the same weighted epoch written both ways: shards 0-3 once, shards 4-5 twice (8 shard visits, 128 samples)
WAYS = {
    "upsampling_factors": lambda r: (f"[{{shards: '{r}/train/{{00000..00003}}.tar::{r}/train/{{00004..00005}}.tar',"
                                     " upsampling_factors: '1::2'}]"),
    "weight": lambda r: (f"[{{shards: '{r}/train/{{00000..00003}}.tar', weight: 1.0}}, "
                         f"{{shards: '{r}/train/{{00004..00005}}.tar', weight: 1.0}}]"),
}


def _epoch(root: Path) -> Counter:
    return Counter({f"train_{i:08d}": 1 if i < 4 * PER_SHARD else 2 for i in range(SHARDS * PER_SHARD)})


def _ecfg(root: Path, way: str, batch: int, workers: int, *extra: str):
    return _cfg(WAYS[way](root), f"data.batch_size={batch}", f"data.workers={workers}", "data.shuffle_buffer=10",
                "data.seed=3", "data.resampled=false", *extra)


def _phase(cfg, world: int, batches: int, old: list[dict] | None, salt: int) -> tuple[list[str], list[dict]]:
    keys, states = [], []
    for rank in range(world):
        state = None if old is None else {"elastic_from": old, "salt": salt}
        loader = build_loader(cfg, rank, world, state=state)
        keys += [k for b in islice(iter(loader), batches) for k in b.keys]
        states.append(json.loads(json.dumps(loader.state_dict())))
    return keys, states


@pytest.mark.parametrize("way", sorted(WAYS))
def test_weighted_epoch_delivers_each_sample_its_multiplicity(six_shards: Path, way: str):
    # 1 rank x 2 workers: 4 of the 8 shard visits each = 64 samples = 8 batches of 8 per worker
    keys, _ = _phase(_ecfg(six_shards, way, 8, 2, "data.shuffle_buffer=16"), 1, 16, None, 0)
    assert Counter(keys) == _epoch(six_shards)


def test_weighted_epoch_resumes_exactly_on_the_same_layout(six_shards: Path):
    """Same ranks and workers: the resumed stream is the uninterrupted one, batch for batch."""
    cfg = _ecfg(six_shards, "upsampling_factors", 8, 2, "data.shuffle_buffer=16")
    straight = [b.keys for b in islice(iter(build_loader(cfg, 0, 1)), 16)]
    first = build_loader(cfg, 0, 1)
    head = [b.keys for b in islice(iter(first), 7)]  # odd: mid round over workers, mid shuffle block
    state = json.loads(json.dumps(first.state_dict()))
    tail = [b.keys for b in islice(iter(build_loader(cfg, 0, 1, state=state)), 9)]
    assert head + tail == straight
    assert Counter(k for keys in straight for k in keys) == _epoch(six_shards)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_weighted_epoch_exact_across_elastic_resume(six_shards: Path, way: str):
    """2 ranks x 1 worker -> 1 rank x 2 workers -> 2 ranks x 2 workers, stopping mid-shard and mid
    shuffle block: over the epoch each sample comes exactly its multiplicity times."""
    a, states = _phase(_ecfg(six_shards, way, 6, 1), 2, 2, None, 0)  # 24
    b, states = _phase(_ecfg(six_shards, way, 6, 2), 1, 4, states, 3)  # 24
    c, _ = _phase(_ecfg(six_shards, way, 4, 2), 2, 10, states, 7)  # the 80 left: 20 per slot
    assert len(a) == len(b) == 24 and len(c) == 80
    assert Counter(a + b + c) == _epoch(six_shards)


def test_changed_weights_refuse_an_epoch_cursor(six_shards: Path):
    """The multiset is what cursor positions count, so repeats that changed cannot be mapped."""
    _, states = _phase(_ecfg(six_shards, "upsampling_factors", 6, 1), 2, 1, None, 0)
    other = _cfg(WAYS["upsampling_factors"](six_shards).replace("'1::2'", "'1::3'"), "data.batch_size=6",
                 "data.workers=1", "data.shuffle_buffer=10", "data.seed=3", "data.resampled=false")
    with pytest.raises(DataError, match="data.sources changed since the checkpoint"):
        build_loader(other, 0, 2, state=states[0])


def test_epoch_repeats_scale_to_the_lightest_shard():
    parts = [[["a0", "a1"], ["b0"]]]
    mix = resolve_mix([(parts[0], None, "0.5::1")], resampled=False)
    assert mix.repeats == (1, 1, 2)
    assert resolve_mix([(parts[0], None, "0.5::1")], resampled=True).repeats == ()
    assert resolve_mix([(parts[0], None, "0.5::1")], resampled=True).factors == ((0.5, 0.5, 1.0),)


@pytest.mark.parametrize("sources, key", [
    ("[{shards: '{a}::{b}', upsampling_factors: '1::2::3'}]", "data.sources[0].upsampling_factors"),
    ("[{shards: '{a}', upsampling_factors: 'x'}]", "data.sources[0].upsampling_factors"),
    ("[{shards: '{a}', upsampling_factors: '0'}]", "data.sources[0].upsampling_factors"),
    ("[{shards: '{a}', upsampling_factors: 2}, {shards: '{b}'}]", "data.sources[1].upsampling_factors"),
    ("[{shards: '{a}', upsampling_factors: 2}, {shards: '{b}', weight: 2}]", "data.sources[1].weight"),
])
def test_bad_mix_is_one_line_naming_the_key(six_shards: Path, sources: str, key: str):
    s = sources.replace("{a}", _shard(six_shards, 0)).replace("{b}", _shard(six_shards, 1))
    with pytest.raises(DataError) as e:
        make_spec(_cfg(s), 0, 1)
    assert str(e.value).startswith(key) and "\n" not in str(e.value), str(e.value)


def test_epoch_weights_needing_fractional_repeats_are_refused(six_shards: Path):
    """Weight 1 over 3 shards against weight 1 over 2 shards would need 1.5 copies of a shard."""
    r = six_shards
    cfg = _cfg(f"[{{shards: '{r}/train/{{00000..00002}}.tar', weight: 1}}, "
               f"{{shards: '{r}/train/{{00003..00004}}.tar', weight: 1}}]", "data.resampled=false", "data.workers=1")
    with pytest.raises(DataError, match=r"^data\.sources\[1\]\.weight: epoch mode .*1\.5 copies") as e:
        make_spec(cfg, 0, 1)
    assert "\n" not in str(e.value)
    make_spec(load_config(None, [f"data.sources=[{{shards: '{r}/train/{{00000..00002}}.tar', weight: 1}}, "
                                 f"{{shards: '{r}/train/{{00003..00004}}.tar', weight: 1}}]", TINY,
                                 "data.context_length=32"]), 0, 1)  # resampled: any weights


def test_weight_and_factors_on_one_source_is_a_config_error(six_shards: Path):
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\] sets both weight and upsampling_factors"):
        _cfg(f"[{{shards: '{_shard(six_shards, 0)}', weight: 2, upsampling_factors: '2'}}]")
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.weight must be > 0"):
        _cfg(f"[{{shards: '{_shard(six_shards, 0)}', weight: 0}}]")


def test_check_reports_the_mix_and_refuses_a_bad_one_in_one_line(six_shards: Path, tmp_path: Path, capsys):
    from powerclip.cli import main as cli_main

    r = six_shards
    config = tmp_path / "c.yaml"
    config.write_text(f"train: {{run_dir: {tmp_path}/run}}\ndata: {{resampled: false, context_length: 32}}\n")
    base = ["-c", str(config), TINY.replace("layers: 1}, text", "layers: 1, head_width: 16}, text")]
    good = (f"data.sources=[{{shards: '{r}/train/{{00000..00003}}.tar::{r}/train/{{00004..00005}}.tar', "
            "upsampling_factors: '1::2'}]")
    assert cli_main(["check", good, *base]) == 0
    assert "ok: data mix: an epoch visits 8 shards (copies included); per source [0] 100.0 %" in \
        capsys.readouterr().out
    bad = (f"data.sources=[{{shards: '{r}/train/{{00000..00002}}.tar', weight: 1}}, "
           f"{{shards: '{r}/train/{{00003..00004}}.tar', weight: 1}}]")
    assert cli_main(["check", bad, *base]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("powerclip check: error: data.sources[1].weight: epoch mode") and "\n" not in err, err
    assert cli_main(["check", bad.replace("weight: 1}]", "weight: 2}]"), *base]) == 0  # 1/3 and 2/2: 3 copies
    assert "ok: data mix: an epoch visits 9 shards (copies included); per source [0] 33.3 %, [1] 66.7 %" in \
        capsys.readouterr().out
