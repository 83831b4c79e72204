"""PowerCLIP's published shards read as published: their ``.njson`` phrases placed on the caption's
tokens, their region indices in either base (``data.region_index_base``) giving the same regions,
the check telling the base from the first samples, caption-only samples counted and warned about,
and the tool that prints one sample decoded. Fixtures: tests/published.py, in both index bases."""

from __future__ import annotations

import logging

import pytest
import torch

from powerclip.data import samples as samples_mod
from powerclip.data.published import IndexEvidence, NjsonError, find_run, read_njson
from powerclip.data.samples import CAPTION_ONLY, DataError, SampleProcessor
from powerclip.data.stream import read_shard
from powerclip.train.preflight import CheckError, preflight
from tests import published as pub
from tests.tiny import tiny_config


def _cfg(shards, *extra: str):
    return tiny_config([f'data.sources=[{{shards: "{shards}"}}]', "data.region_source=patches", "data.num_regions=4",
                        "loss.powerset.weight=0.2", "data.workers=0", *extra])


def _first(path):
    return next(iter(read_shard(str(path))))


def test_njson_is_csr_lengths_and_clip_ids():
    assert read_njson(pub.njson()) == [tuple(pub.clip_ids(p)) for p in pub.PHRASES]
    assert read_njson(pub.njson(with_sot_eot=True)) == read_njson(pub.njson())  # SOT/EOT inside are ignored
    assert read_njson(b'[[1, 2], [320, 736, 1615]]') == [(320,), (736, 1615)]
    for bad, why in ((b'{"lens": [2], "ids": [1]}', "sum to 2"), (b'{"phrases": []}', "expected"),
                     (b"not json", "not JSON")):
        with pytest.raises(NjsonError, match=why):
            read_njson(bad)


@pytest.mark.parametrize("base", [0, 1])
def test_njson_phrases_become_the_samples_phrase_nodes(tmp_path, base):
    shard = pub.write_shard(tmp_path / "cc12m-train-0000.tar", n=1, base=base)
    proc = SampleProcessor(_cfg(shard, f"data.region_index_base={base}"), train=False)
    out = proc(_first(shard), seed=0)
    assert not isinstance(out, str), out
    ids = out["text"]
    nodes = out["phrase_tokens"]
    assert nodes[0] == list(range(1, len(ids) - 1))  # the whole caption first
    assert [[ids[i] for i in pos] for pos in nodes[1:]] == [pub.clip_ids(p) for p in pub.PHRASES]
    assert find_run(ids, tuple(pub.clip_ids("a small house"))) == nodes[2]
    assert CAPTION_ONLY not in proc.dropped


def test_both_index_bases_give_the_same_region_masks(tmp_path):
    masks = []
    for base in (0, 1):
        shard = pub.write_shard(tmp_path / f"b{base}" / "cc12m-train-0000.tar", n=1, base=base)
        proc = SampleProcessor(_cfg(shard, f"data.region_index_base={base}", "data.region_grid=14"), train=True)
        masks.append(torch.as_tensor(proc(_first(shard), seed=7)["region_masks"]))
    assert masks[0].shape == (4, 16) and masks[0].any(1).all()
    assert torch.equal(masks[0], masks[1])


def test_a_wrong_base_stops_the_loader_naming_region_index_base(tmp_path):
    one = pub.write_shard(tmp_path / "one" / "s.tar", n=1, base=1)
    with pytest.raises(DataError, match=r"patch index 196, .* set data.region_index_base=1"):
        SampleProcessor(_cfg(one), train=True)(_first(one), seed=0)
    zero = pub.write_shard(tmp_path / "zero" / "s.tar", n=1, base=0)
    with pytest.raises(DataError, match=r"patch index 0, the CLS token .* set data.region_index_base=0"):
        SampleProcessor(_cfg(zero, "data.region_index_base=1"), train=True)(_first(zero), seed=0)


@pytest.mark.parametrize("base", [0, 1])
def test_check_tells_the_base_and_refuses_the_other(tmp_path, base):
    shard = pub.write_shard(tmp_path / "cc12m-train-0000.tar", n=8, base=base)
    report = preflight(_cfg(shard, f"data.region_index_base={base}", f"train.run_dir={tmp_path / 'run'}"))
    assert any("the first 8 samples" in line for line in report.passed)
    with pytest.raises(CheckError) as err:
        preflight(_cfg(shard, f"data.region_index_base={1 - base}", f"train.run_dir={tmp_path / 'run'}"))
    msg = str(err.value)
    assert msg.startswith(f"data.region_index_base={1 - base} but the region indices of the first 8 samples")
    assert msg.endswith(f"set data.region_index_base={base}")
    assert ("equals 196" in msg) if base == 1 else ("index 0 occurs" in msg)


def test_index_evidence_no_zero_means_one_based_and_beyond_both_means_wrong_grid():
    import numpy as np

    ev = IndexEvidence()
    ev.add(np.array([20, 30, 40]), 14)  # no 0 (the top-left patch of 0-based data) and nothing at 196
    assert ev.base(14) == 1 and "no index is 0" in ev.describe(14)
    ev.add(np.array([0, 5]), 14)
    assert ev.base(14) == 0
    ev.add(np.array([400]), 14)
    assert ev.base(14) is None and "beyond both bases" in ev.describe(14)


def test_caption_only_samples_are_counted_and_warned_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(samples_mod, "_WARNED", [])
    shard = pub.write_shard(tmp_path / "s.tar", n=3, base=0, with_njson=False)
    proc = SampleProcessor(_cfg(shard), train=False)
    with caplog.at_level(logging.WARNING, logger="powerclip.data.samples"):
        outs = [proc(s, seed=i) for i, s in enumerate(read_shard(str(shard)))]
    assert all(len(o["phrase_tokens"]) == 1 for o in outs)  # the whole caption only
    assert proc.dropped[CAPTION_ONLY] == 3
    warned = [r.getMessage() for r in caplog.records if "no phrase beyond the whole caption" in r.getMessage()]
    assert len(warned) == 1 and "tools/annotate_shards.py" in warned[0]


def test_unreadable_njson_is_counted_not_fatal(tmp_path):
    shard = pub.write_shard(tmp_path / "s.tar", n=1, base=0)
    raw = _first(shard)
    raw["njson"] = b'{"spans": []}'
    proc = SampleProcessor(_cfg(shard), train=False)
    out = proc(raw, seed=0)
    assert len(out["phrase_tokens"]) == 1
    assert proc.dropped == {"field_njson_unreadable": 1, CAPTION_ONLY: 1}


def test_show_sample_prints_the_njson_phrases_and_the_index_base(tmp_path, capsys):
    from tools.show_sample import main

    shard = pub.write_shard(tmp_path / "cc12m-train-0000.tar", n=2, base=1)
    assert main([str(shard), "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert "key      000000001" in out and repr(pub.CAPTION) in out
    assert "njson   3 ids 'a red car': token positions 1..3" in out
    assert "suggests 1-based (an index equals 196 = 14²" in out
    assert main([str(shard), "--index", "5"]) == 2
