"""tools/compare_methods.py: the statistics against scipy/hand values, and a tiny end-to-end run
(every arm, 2 seeds, 2 steps each) whose report and results hold every arm, split and metric."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

# a plain import (not a spec loader): the tool's spawned workers unpickle its functions by module name
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_methods as cm  # noqa: E402


def test_mean_ci_is_the_student_t_interval():
    mu, ci = cm.mean_ci([1.0, 2.0, 3.0])
    assert mu == 2.0
    assert ci == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n), sd = 1
    mu, ci = cm.mean_ci([0.5])
    assert mu == 0.5 and math.isnan(ci)


def test_report_pairs_each_arm_with_its_control_by_seed():
    def run(vals):
        return {s: {"metrics": {"heldout/swap-att": v, "val/swap-att": v}} for s, v in enumerate(vals)}

    # negclip beats clip_ft by exactly 0.1 on every seed: the paired CI is 0 and the row is bold,
    # although the unpaired spreads overlap
    results = {"clip_ft": run([0.5, 0.7, 0.9]), "negclip": run([0.6, 0.8, 1.0])}
    text = cm.report(results, None, {"seeds": 3})
    assert "| swap-att | **+0.100 ± 0.000** |" in text
    assert "negclip − clip_ft" in text and "## val split" in text and "## heldout split" in text


def test_report_adds_the_ablation_pair_beside_the_control():
    def run(vals):
        return {s: {"metrics": {"val/zeroshot_acc1": v}} for s, v in enumerate(vals)}

    # powerclip − clip = +0.30 on every seed, powerclip − clip_mean = +0.05 on every seed: the term's own
    # share is the second column, paired by seed with the arm that has the same pooling
    results = {"clip": run([0.1, 0.2, 0.3]), "clip_mean": run([0.35, 0.45, 0.55]),
               "powerclip": run([0.4, 0.5, 0.6])}
    text = cm.report(results, None, {"seeds": 3})
    header = next(line for line in text.splitlines() if "powerclip − clip" in line)
    assert header == "| metric | clip_mean − clip | powerclip − clip | powerclip − clip_mean |"
    assert "| zeroshot_acc1 | **+0.250 ± 0.000** | **+0.300 ± 0.000** | **+0.050 ± 0.000** |" in text
    # without the reference arm there is no ablation column
    text = cm.report({"clip": results["clip"], "powerclip": results["powerclip"]}, None, {"seeds": 3})
    assert "clip_mean" not in text and "| zeroshot_acc1 | **+0.300 ± 0.000** |" in text


# Re-evaluation runs in another process (other thread count, other batch split of the matmuls), so its
# float32 similarities round differently: means of cosines then differ in the 7th-8th digit on some CPUs.
# 1e-5 absolute is far below any effect the comparison reports (its smallest printed digit is 1e-3).
METRIC_ABS_TOL = 1e-5


def _assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=METRIC_ABS_TOL, nan_ok=True), key


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    assert cm.main(["--out", str(out), "--smoke", "--jobs", "2", "--keep-models"]) == 0
    res = json.loads((out / "results.json").read_text())
    arms = {*cm.SCRATCH_ARMS, *cm.FT_ARMS}
    assert set(res["results"]) == arms
    kinds = {"swap-att", "swap-obj", "replace-att", "replace-obj", "replace-rel", "add-obj", "zeroshot_acc1",
             "retrieval_i2t_R@1", "retrieval_t2i_R@1", "binding-text", "binding-image", "binding-group",
             "binding-caption-cos", "binding-image-cos", "binding-term", "binding-caption-prior",
             "binding-image-prior"}
    for arm in arms:
        assert set(res["results"][arm]) == {"0", "1"}, arm  # two seeds
        for r in res["results"][arm].values():
            assert {k.split("/", 1)[1] for k in r["metrics"]} <= kinds
            for split in cm.SPLITS:
                assert {f"{split}/swap-att", f"{split}/zeroshot_acc1", f"{split}/binding-group"} <= set(r["metrics"])
    # --keep-models: each run's weights stay as an open_clip export that evaluates to the reported metrics
    kept = out / "runs" / "negclip" / "seed1" / "model"
    assert not (kept.parent / "checkpoints").exists()
    _assert_metrics_close(cm.evaluate_model(kept, str(out / "synth")), res["results"]["negclip"]["1"]["metrics"])
    # the fine-tuning arms start from the pretrained export, whose metrics are reported next to them
    assert (out / "pretrained" / "open_clip_config.json").is_file() and res["pretrained"]
    text = (out / "report.md").read_text()
    for head in ("powerclip − clip", "powerclip − clip_mean", "concept − clip", "negclip − clip_ft",
                 "degla − clip_ft"):
        assert head in text
    assert "27 colours" in text and "holds a binding twin" in text  # the data's twin rate is stated
    assert "binding-group 1/6" in text  # the chance level of every metric is stated
    # the "seen" split is the first train shard itself: scenes every arm trained on
    assert (out / "synth" / "seen" / "00000.tar").resolve() == (out / "synth" / "train" / "00000.tar").resolve()
    assert "## seen split" in text and "## val split" in text and "## heldout split" in text
    # the data under --out is reused only with the settings it was written with
    with pytest.raises(SystemExit, match="--colours"):
        cm.main(["--out", str(out), "--smoke", "--colours", "7"])
    # a second call reuses every finished run
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/compare_done.json")}
    assert cm.main(["--out", str(out), "--smoke", "--jobs", "1"]) == 0
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/compare_done.json")} == before
    # --reevaluate evaluates every run again from its kept weights, without training: the same numbers
    first = json.loads((out / "results.json").read_text())["results"]
    assert cm.main(["--out", str(out), "--smoke", "--jobs", "1", "--reevaluate"]) == 0
    after = {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/compare_done.json")}
    assert all(after[p] > before[p] for p in before)
    again = json.loads((out / "results.json").read_text())["results"]
    assert set(again) == set(first)
    for arm in first:
        assert set(again[arm]) == set(first[arm]), arm
        for seed in first[arm]:
            _assert_metrics_close(again[arm][seed]["metrics"], first[arm][seed]["metrics"])


def test_twin_summary_counts_the_tools_own_data():
    args = cm.build_parser().parse_args(["--out", "x", "--per-shard", "640", "--train-shards", "5"])
    many = cm.twin_summary(args)  # the tool's default vocabulary
    args.colours = 7
    few = cm.twin_summary(args)
    assert "over the 3200 train scenes" in few and "batch of 64" in few

    def pairs(text: str) -> float:
        return float(text.split("twin pairs per batch ")[1].split(",")[0])

    assert pairs(few) > 5 * pairs(many) and pairs(few) > 0.3


def test_every_fine_tuning_arm_gets_the_same_lr(tmp_path):
    """--ft-lr sets the lr of the control and of both methods alike (default 1e-3); 0 keeps the preset's."""
    def lrs(extra: list[str]) -> dict[str, list[str]]:
        args = cm.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "1",
                                             "--arms", "clip_ft,negclip,degla,clip", *extra])
        return {j.name: [o for o in j.overrides if o.startswith("optim.lr=")] for j in cm.plan(args, tmp_path)}

    assert lrs([]) == {"pretrain": [], "clip/seed0": [], "clip_ft/seed0": ["optim.lr=0.001"],
                       "negclip/seed0": ["optim.lr=0.001"], "degla/seed0": ["optim.lr=0.001"]}
    assert all(v == [] for v in lrs(["--ft-lr", "0"]).values())
