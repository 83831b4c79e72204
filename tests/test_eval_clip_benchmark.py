"""Agreement with the reference tool: clip_benchmark (real CLI, in-process) and ``powerclip eval`` give the
same zero-shot, retrieval and SugarCrepe numbers on the same export folder and the same wds / json data;
and ``clip_benchmark build`` aggregates powerclip's result files."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import clip_benchmark.cli as clip_benchmark_cli  # dev dependency: a missing reference fails, never skips
import pytest

from powerclip.cli import main as powerclip_main
from tests.test_eval_support import (
    make_export,
    write_sugarcrepe,
    write_wds_classification,
    write_wds_retrieval,
)


def _topk_accuracy_numpy24(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy`` with its one numpy>=2.4 incompatibility removed.

    Upstream does ``float(tensor.sum(0, keepdim=True).cpu().numpy())``: a shape-[1] array, which numpy
    2.4 (our pinned version) refuses to convert ("only 0-dimensional arrays can be converted to Python
    scalars"). Same formula, summed to a 0-dim value; everything else in the run stays clip_benchmark's.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum().item()) / n for k in topk]


def _clip_benchmark(monkeypatch, *args: str) -> None:
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _topk_accuracy_numpy24)
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *args])
    clip_benchmark_cli.main()


def _reference(monkeypatch, export: Path, dataset: str, root: Path, task: str, out: Path) -> dict:
    _clip_benchmark(monkeypatch, "eval", "--model", f"local-dir:{export}", "--pretrained", str(export),
                    "--dataset", dataset, "--dataset_root", str(root), "--task", task, "--no_amp",
                    "--num_workers", "0", "--batch_size", "64", "--recall_k", "1", "5", "10",
                    "--output", str(out), "--quiet")
    return json.loads(out.read_text())


def _same(ours: dict, theirs: dict) -> None:
    assert set(theirs) <= set(ours), (sorted(theirs), sorted(ours))
    for k, v in theirs.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(ours[k]), k
        else:
            assert ours[k] == pytest.approx(v, abs=1e-6), (k, ours[k], v)  # theirs: float32 means


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cb")
    export = make_export(tmp / "export", seed=3, train_steps=5)  # briefly trained: not chance
    write_wds_classification(tmp / "colors", n=30, shards=2)
    write_wds_retrieval(tmp / "captions", n=14, caps_per_image=2)
    write_sugarcrepe(tmp / "sugarcrepe", tasks=("swap_att",), n=8)
    return tmp, export


def test_zero_shot_and_retrieval_match_clip_benchmark(setup, monkeypatch, capsys):
    tmp, export = setup
    ours_dir = tmp / "ours"
    rc = powerclip_main(["eval", "--model", str(export), "--task", "zeroshot_classification", "--data",
                         str(tmp / "colors"), "--task", "zeroshot_retrieval", "--data", str(tmp / "captions"),
                         "--task", "sugar_crepe", "--data", str(tmp / "sugarcrepe"), "--out", str(ours_dir)])
    assert rc == 0
    ours = {(r["dataset"], r["task"]): r for r in map(json.loads, (p.read_text() for p in ours_dir.glob("*.json")))}
    assert set(ours) == {("wds/colors", "zeroshot_classification"), ("wds/captions", "zeroshot_retrieval"),
                         ("sugar_crepe/swap_att", "image_caption_selection")}

    ref_dir = tmp / "ref"
    ref_dir.mkdir()
    cls = _reference(monkeypatch, export, "wds/colors", tmp / "colors", "zeroshot_classification", ref_dir / "c.json")
    ret = _reference(monkeypatch, export, "wds/captions", tmp / "captions", "zeroshot_retrieval", ref_dir / "r.json")
    sc = _reference(monkeypatch, export, "sugar_crepe/swap_att", tmp / "sugarcrepe", "image_caption_selection",
                    ref_dir / "s.json")
    _same(ours[("wds/colors", "zeroshot_classification")]["metrics"], cls["metrics"])
    _same(ours[("wds/captions", "zeroshot_retrieval")]["metrics"], ret["metrics"])
    assert set(ret["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert ours[("sugar_crepe/swap_att", "image_caption_selection")]["metrics"]["acc"] == pytest.approx(
        sc["metrics"]["acc"], abs=1e-9)
    # metrics strictly between 0 and 1: the comparison is not trivially saturated
    assert 0 < ret["metrics"]["image_retrieval_recall@1"] < 1 and 0 < cls["metrics"]["acc1"] < 1

    # schema: clip_benchmark's own record keys, and `clip_benchmark build` aggregates our files with its own
    for rec in ours.values():
        assert set(rec) == set(cls)
    csv_path = tmp / "bench.csv"
    _clip_benchmark(monkeypatch, "build", str(ours_dir), str(ref_dir / "c.json"), "--output", str(csv_path))
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4
    by = {(r["dataset"], r["model_fullname"]): r for r in rows}
    mine = by[("wds/colors", f"local-dir:{export.resolve()} {export.resolve()}")]
    theirs = by[("wds/colors", f"local-dir:{export} {export}")]
    assert float(mine["acc1"]) == pytest.approx(float(theirs["acc1"]), abs=1e-9)
    assert float(mine["mean_per_class_recall"]) == pytest.approx(float(theirs["mean_per_class_recall"]), abs=1e-9)
