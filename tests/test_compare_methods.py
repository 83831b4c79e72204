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


def _runs(per_seed_items: list[list[float]], keys=("heldout/swap-att", "val/swap-att")) -> dict[int, dict]:
    """Runs whose metrics are the means of the given per-item outcomes (one list per seed)."""
    return {s: {"metrics": {k: sum(v) / len(v) for k in keys}, "items": {k: list(v) for k in keys}}
            for s, v in enumerate(per_seed_items)}


def test_report_pairs_each_arm_with_its_control_by_seed_and_item():
    # on every seed negclip gets 10 of the 40 items right that clip_ft gets wrong and none the other way:
    # the paired difference is +0.25 and its interval excludes 0 although both arms vary over the seeds;
    # exploratory cells are never bold
    control = [[float((j + s) % 2) for j in range(40)] for s in range(3)]
    arm = [[1.0 if (v == 0 and j < 20) else v for j, v in enumerate(row)] for row in control]
    results = {"clip_ft": _runs(control), "negclip": _runs(arm)}
    text = cm.report(results, {"seeds": 3}, n_boot=500)
    row = next(line for line in text.splitlines() if line.startswith("| swap-att | +0.250 ["))
    low = float(row.split("[")[1].split(",")[0])
    assert low > 0 and "**" not in text
    assert "negclip − clip_ft" in text and "### val split" in text and "### heldout split" in text
    assert "## Exploratory cells (no correction for multiplicity" in text


def test_report_adds_the_ablation_pair_beside_the_control():
    def run(vals):
        return {s: {"metrics": {"val/zeroshot_acc1": v}} for s, v in enumerate(vals)}

    # powerclip − clip = +0.30 on every seed, powerclip − clip_mean = +0.05 on every seed: the term's own
    # share is the second column, paired by seed with the arm that has the same pooling (no per-item
    # outcomes here: the cells fall back to the Student-t interval over seeds, marked t)
    results = {"clip": run([0.1, 0.2, 0.3]), "clip_mean": run([0.35, 0.45, 0.55]),
               "powerclip": run([0.4, 0.5, 0.6])}
    text = cm.report(results, {"seeds": 3})
    header = next(line for line in text.splitlines() if "powerclip − clip" in line)
    assert header == "| metric | clip_mean − clip | powerclip − clip | powerclip − clip_mean |"
    assert "| zeroshot_acc1 | +0.250 ± 0.000 t | +0.300 ± 0.000 t | +0.050 ± 0.000 t |" in text
    # without the reference arm there is no ablation column
    text = cm.report({"clip": results["clip"], "powerclip": results["powerclip"]}, {"seeds": 3})
    assert "clip_mean" not in text and "| zeroshot_acc1 | +0.300 ± 0.000 t |" in text


def test_primary_endpoints_are_the_declared_ones_with_holm():
    """One row per declared endpoint (arm, split) whose arm and control ran, with the bootstrap's p and
    Holm's adjustment across exactly those rows; the decision follows the adjusted p."""
    rng = __import__("random").Random(0)
    n = 300

    def items(p):
        return [[float(rng.random() < p) for _ in range(n)] for _ in range(3)]

    keys = ("val/binding-pairs", "heldout/binding-pairs", "val/zeroshot_acc1", "heldout/zeroshot_acc1")
    results = {"clip_ft": _runs(items(0.5), keys), "negclip": _runs(items(0.8), keys),
               "degla": _runs(items(0.5), keys), "clip": _runs(items(0.3), keys)}
    rows = cm.primary_endpoints(results, n_boot=2000)
    declared = {(e.arm, e.metric) for e in cm.PRIMARY_ENDPOINTS}
    assert {(r["arm"], r["metric"]) for r in rows} == {("negclip", "binding-pairs"), ("degla", "binding-pairs")}
    assert all((r["arm"], r["metric"]) in declared and r["split"] in cm.PRIMARY_SPLITS for r in rows)
    assert len(rows) == 4  # powerclip and concept did not run: not in the family
    from powerclip.eval.stats import holm

    assert [r["p_holm"] for r in rows] == holm([r["p"] for r in rows])
    for r in rows:
        if r["arm"] == "negclip":  # +0.3 on 300 items x 3 seeds
            assert r["estimate"] > 0.2 and r["ci95"][0] > 0 and r["result"] == "shown: above the control"
        else:
            assert r["result"] == ("not shown" if r["p_holm"] > cm.ALPHA else r["result"])
    text = cm.report(results, {"seeds": 3}, n_boot=2000, endpoints=rows)
    assert "## Primary endpoints" in text and "Holm's correction across the 4 endpoints" in text
    assert "| negclip − clip_ft | val | binding-pairs | +0." in text


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
    wino = ("", "-text", "-image", "-group", "-caption-cos", "-image-cos", "-term", "-caption-prior", "-image-prior")
    kinds = {"swap-att", "swap-obj", "replace-att", "replace-obj", "replace-rel", "add-obj", "zeroshot_acc1",
             "retrieval_i2t_R@1", "retrieval_t2i_R@1"} | {f"{s}{w}" for s in cm.WINOGROUND_SETS.values() for w in wino}
    assert set(res["results"]) == arms | {cm.PRETRAINED}  # each seed's pretrained start is evaluated too
    for arm in [*arms, cm.PRETRAINED]:
        assert set(res["results"][arm]) == {"0", "1"}, arm  # two seeds
        for r in res["results"][arm].values():
            assert {k.split("/", 1)[1] for k in r["metrics"]} <= kinds
            for split in cm.SPLITS:
                assert {f"{split}/swap-att", f"{split}/zeroshot_acc1", f"{split}/relation-twins-group"} <= set(r["metrics"])
            # the binding pairs exist for the generator's own splits: 32 per split in the smoke
            for split in cm.PRIMARY_SPLITS:
                assert len(r["items"][f"{split}/binding-pairs"]) == 32
                assert r["metrics"][f"{split}/binding-pairs"] == pytest.approx(
                    sum(r["items"][f"{split}/binding-pairs"]) / 32)
            # every per-item outcome averages to its metric
            for key, values in r["items"].items():
                assert r["metrics"][key] == pytest.approx(sum(values) / len(values), abs=1e-12), key
    # one row per declared endpoint and primary split, Holm-adjusted
    assert len(res["primary_endpoints"]) == len(cm.PRIMARY_ENDPOINTS) * len(cm.PRIMARY_SPLITS)
    # --keep-models: each run's weights stay as an open_clip export that evaluates to the reported metrics
    kept = out / "runs" / "negclip" / "seed1" / "model"
    assert not (kept.parent / "checkpoints").exists()
    _assert_metrics_close(cm.evaluate_model(kept, str(out / "synth"))[0], res["results"]["negclip"]["1"]["metrics"])
    # each seed fine-tunes from its own pretrained start (pretrained with that seed), reported beside the arms
    for seed in (0, 1):
        assert (out / "pretrained" / f"seed{seed}" / "open_clip_config.json").is_file()
    text = (out / "report.md").read_text()
    for head in ("powerclip − clip", "powerclip − clip_mean", "concept − clip", "negclip − clip_ft",
                 "degla − clip_ft"):
        assert head in text
    assert "27 colours" in text and "holds a binding twin" in text  # the data's twin rate is stated
    assert "-group 1/6" in text and "binding-pairs and relation-twins (pair choice)" in text  # chance levels
    assert "## Primary endpoints" in text and "**" not in text
    # the "seen" split is the first train shard itself: scenes every arm trained on
    assert (out / "synth" / "seen" / "00000.tar").resolve() == (out / "synth" / "train" / "00000.tar").resolve()
    assert "### seen split" in text and "### val split" in text and "### heldout split" in text
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

    assert lrs([]) == {"pretrained/seed0": [], "clip/seed0": [], "clip_ft/seed0": ["optim.lr=0.001"],
                       "negclip/seed0": ["optim.lr=0.001"], "degla/seed0": ["optim.lr=0.001"]}
    assert all(v == [] for v in lrs(["--ft-lr", "0"]).values())


def test_each_seed_fine_tunes_from_its_own_pretrained_start(tmp_path):
    """Seed s of every fine-tuning arm waits for and starts from the start pretrained with seed s;
    --pretrained gives one start to every seed and pretrains nothing."""
    args = cm.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "3", "--arms", "clip_ft,degla"])
    jobs = {j.name: j for j in cm.plan(args, tmp_path)}
    for seed in range(3):
        start = jobs[f"pretrained/seed{seed}"]
        assert f"train.seed={seed}" in start.overrides and f"data.seed={seed}" in start.overrides
        for arm in ("clip_ft", "degla"):
            job = jobs[f"{arm}/seed{seed}"]
            assert job.after == [f"pretrained/seed{seed}"]
            assert f"model.pretrained={tmp_path.resolve() / 'pretrained' / f'seed{seed}'}" in job.overrides
    args = cm.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "2", "--arms", "degla",
                                         "--pretrained", str(tmp_path / "start")])
    jobs = {j.name: j for j in cm.plan(args, tmp_path)}
    assert set(jobs) == {"degla/seed0", "degla/seed1"}
    assert all(f"model.pretrained={(tmp_path / 'start').resolve()}" in j.overrides for j in jobs.values())
