"""tools/compare_methods.py: the statistics against scipy/hand values, and a tiny end-to-end run
(every arm, 2 seeds, 2 steps each) whose report and results hold every arm, split and metric."""

from __future__ import annotations

import json
import math
import re
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
    arms = set(cm.ALL_ARMS)
    wino = ("", "-text", "-image", "-group", "-caption-cos", "-image-cos", "-term", "-caption-prior", "-image-prior")
    kinds = {"swap-att", "swap-obj", "replace-att", "replace-obj", "replace-rel", "add-obj", "zeroshot_acc1",
             "retrieval_i2t_R@1", "retrieval_t2i_R@1"} | {f"{s}{w}" for s in cm.WINOGROUND_SETS.values() for w in wino}
    # each seed's CLIP and SigLIP starts are evaluated too
    assert set(res["results"]) == arms | {cm.PRETRAINED, cm.PRETRAINED_SIGLIP}
    for arm in [*arms, cm.PRETRAINED, cm.PRETRAINED_SIGLIP]:
        assert set(res["results"][arm]) == {"0", "1"}, arm  # two seeds
        for r in res["results"][arm].values():
            assert {k.split("/", 1)[1] for k in r["metrics"]} <= kinds
            for split in cm.SPLITS:
                assert {f"{split}/swap-att", f"{split}/relation-twins-group"} <= set(r["metrics"])
            # the binding pairs and the single-object zero-shot cases exist for the generator's own
            # splits: 32 per split in the smoke
            for split in cm.PRIMARY_SPLITS:
                assert len(r["items"][f"{split}/binding-pairs"]) == 32
                assert len(r["items"][f"{split}/zeroshot_acc1"]) == 32
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
    for head in ("powerclip − clip", "powerclip − clip_mean", "powerclip − powerclip_random", "concept − siglip_ft",
                 "negclip − clip_ft", "degla − clip_ft"):
        assert head in text
    # zeta: fitted per seed with that seed's CLIP start, and what both PowerCLIP arms of the seed train with
    import yaml

    for seed in (0, 1):
        zeta = json.loads((out / "zeta" / f"seed{seed}" / "compare_done.json").read_text())["zeta"]
        assert 0.0 <= zeta <= 1.0 and f"seed {seed}: {zeta:.4f}" in text
        for arm in cm.ZETA_ARMS:
            cfg = yaml.safe_load((out / "runs" / arm / f"seed{seed}" / "config.yaml").read_text())
            assert cfg["loss"]["powerset"]["zeta"] == pytest.approx(zeta, abs=1e-6), arm
    assert "## Checks of the benchmark" in text and "shapes legible" in text
    assert "27 colours" in text and "holds a binding twin" in text  # the data's twin rate is stated
    assert "-group 1/6" in text and "binding-pairs and relation-twins (pair choice)" in text  # chance levels
    assert "## Primary endpoints" in text and "**" not in text
    # the "seen" split is the first train shard itself: scenes every arm trained on
    assert (out / "synth" / "seen" / "00000.tar").resolve() == (out / "synth" / "train" / "00000.tar").resolve()
    assert "### seen split" in text and "### val split" in text and "### heldout split" in text
    # the data under --out is reused only with the settings it was written with
    with pytest.raises(SystemExit, match="--colours"):
        cm.main(["--out", str(out), "--smoke", "--colours", "7"])
    # a second call reuses every finished run; its report keeps the first call's wall time and machine,
    # and --doc puts that report between the doc's markers, leaving the prose around them
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/compare_done.json")}
    meta = json.loads((out / "results.json").read_text())["meta"]
    doc = tmp_path / "doc.md"
    doc.write_text(f"# prose\n\nbefore\n\n{cm.DOC_BEGIN}\nold\n{cm.DOC_END}\n\nafter\n")
    assert cm.main(["--out", str(out), "--smoke", "--jobs", "1", "--doc", str(doc)]) == 0
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/compare_done.json")} == before
    again_meta = json.loads((out / "results.json").read_text())["meta"]
    assert all(again_meta[k] == meta[k] for k in cm.INVOCATION_META) and "report regenerated" in again_meta
    text = doc.read_text()
    assert text.startswith("# prose\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "\nold\n" not in text
    assert "\n### Primary endpoints\n" in cm.doc_section(text)  # the report's headings, one level down
    # --reevaluate evaluates the runs of the arms asked for (two here, with their CLIP starts) again from their
    # kept weights, without training: the same numbers; the other runs are left as they are
    first = json.loads((out / "results.json").read_text())["results"]
    assert cm.main(["--out", str(out), "--smoke", "--reevaluate", "--arms", "clip_ft,negclip"]) == 0
    after = {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/compare_done.json")}
    redone = {p for p in before if p.parent.parent.name in ("clip_ft", "negclip", "pretrain")}
    assert len(redone) == 6 and all(after[p] > before[p] for p in redone)
    assert all(after[p] == before[p] for p in before if p not in redone)
    again = json.loads((out / "results.json").read_text())["results"]
    assert set(again) == {"clip_ft", "negclip", cm.PRETRAINED}
    for arm in again:
        assert set(again[arm]) == set(first[arm]), arm
        for seed in first[arm]:
            _assert_metrics_close(again[arm][seed]["metrics"], first[arm][seed]["metrics"])
    # --starts-from: another fine-tuning lr on the same SigLIP starts, copied (not pretrained again): the
    # starts' weights and per-item outcomes are the first comparison's; refused before anything is copied
    # when a start's settings or the data differ
    other = tmp_path / "lr"
    assert cm.main(["--out", str(other), "--smoke", "--jobs", "1", "--arms", "siglip_ft", "--ft-lr", "1e-4",
                    "--starts-from", str(out)]) == 0
    copied = json.loads((other / "results.json").read_text())
    assert set(copied["results"]) == {"siglip_ft", cm.PRETRAINED_SIGLIP} and not (other / "pretrained").exists()
    for seed in ("0", "1"):
        assert copied["results"][cm.PRETRAINED_SIGLIP][seed]["items"] == first[cm.PRETRAINED_SIGLIP][seed]["items"]
        weights = f"{cm.PRETRAINED_SIGLIP}/seed{seed}/open_clip_model.safetensors"
        assert (other / weights).read_bytes() == (out / weights).read_bytes()
        ft = yaml.safe_load((other / "runs" / "siglip_ft" / f"seed{seed}" / "config.yaml").read_text())
        assert ft["model"]["pretrained"] == str((other / cm.PRETRAINED_SIGLIP / f"seed{seed}").resolve())
        assert ft["optim"]["lr"] == pytest.approx(1e-4)
    assert f"copied from {out}" in (other / "report.md").read_text()
    for extra, match in ((["optim.weight_decay=0.5"], "optim.weight_decay=0.1 there, 0.5 here"),
                         (["--relation-prob", "0.5"], "relation_prob")):
        refused = tmp_path / f"refused{len(extra)}"
        with pytest.raises(SystemExit, match=match):
            cm.main(["--out", str(refused), "--smoke", "--arms", "siglip_ft", "--starts-from", str(out), *extra])
        assert not (refused / cm.PRETRAINED_SIGLIP).exists() and not (refused / "runs").exists()


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


def _jobs(tmp_path, *extra: str) -> dict[str, cm.Job]:
    args = cm.build_parser().parse_args(["--out", str(tmp_path), *extra])
    cm.apply_device_defaults(args, list(extra))
    return {j.name: j for j in cm.plan(args, tmp_path)}


def test_each_arm_is_planned_in_its_papers_setting(tmp_path):
    """PowerCLIP on the objects' boxes (its ablation on random boxes) with the zeta its seed's CLIP start
    calibrates; C2LIP's arms as sigmoid fine-tunes of the seed's SigLIP start; DeGLA's distillation at
    the released strength; and every planned job's overrides make a valid config."""
    from powerclip.config import load_config

    jobs = _jobs(tmp_path, "--seeds", "2")
    for seed in (0, 1):
        zeta = jobs[f"zeta/seed{seed}"]
        assert zeta.kind == "zeta" and zeta.after == [f"pretrained/seed{seed}"] and not zeta.evaluate
        assert f"model.pretrained={tmp_path.resolve() / 'pretrained' / f'seed{seed}'}" in zeta.overrides
        assert "data.region_source=precomputed" in zeta.overrides
        for arm, source in (("powerclip", "precomputed"), ("powerclip_random", "random")):
            job = jobs[f"{arm}/seed{seed}"]
            assert job.zeta_from == f"zeta/seed{seed}" and job.after == [f"zeta/seed{seed}"]
            assert f"data.region_source={source}" in job.overrides and "loss.powerset.weight=0.2" in job.overrides
        siglip_start = jobs[f"pretrained_siglip/seed{seed}"]
        assert siglip_start.kind == "start" and "loss.global_loss=siglip" in siglip_start.overrides
        assert "loss.global_loss=siglip" not in jobs[f"pretrained/seed{seed}"].overrides
        for arm in ("siglip_ft", "concept"):
            job = jobs[f"{arm}/seed{seed}"]
            assert job.after == [f"pretrained_siglip/seed{seed}"] and "loss.global_loss=siglip" in job.overrides
            assert f"model.pretrained={tmp_path.resolve() / 'pretrained_siglip' / f'seed{seed}'}" in job.overrides
            assert "optim.lr=0.001" in job.overrides
        assert ("data.concepts=true" in jobs[f"concept/seed{seed}"].overrides
                and "data.concepts=true" not in jobs[f"siglip_ft/seed{seed}"].overrides)
        degla = jobs[f"degla/seed{seed}"].overrides
        assert "loss.degla.distill_reduction=mean" in degla and "loss.degla.ema_decay=0.9996" in degla
        assert "loss.degla.distill_weight=7.68" in degla
    for job in jobs.values():
        cfg = load_config(cm.ROOT / job.config, job.overrides + [f"train.run_dir={tmp_path / 'r'}"])
        assert cfg.train.seed in (0, 1), job.name


def test_degla_arm_distillation_is_the_released_sum_at_the_released_batch():
    """The per-vector mean weighted DEGLA_MEAN_WEIGHT equals the released summed MSE x 0.005 at batch 256
    with 4 negatives each (brute force), and keeps that strength per vector at batch 64."""
    import torch
    import torch.nn.functional as F

    from powerclip.config import DeglaLossConfig
    from powerclip.data.batch import Batch
    from powerclip.losses.degla import degla_losses
    from powerclip.model.features import Features

    def term(b: int, reduction: str, seed: int = 0) -> tuple[float, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)

        def unit(*shape):
            return F.normalize(torch.randn(*shape, 16, generator=g, dtype=torch.float64), dim=-1)

        s_img, s_txt, s_neg = unit(b), unit(b), unit(b, 4)
        t_img, t_txt, t_neg = unit(b), unit(b), unit(b, 4)
        scale = torch.tensor(1 / 0.07, dtype=torch.float64)
        student = Features(image=s_img, text=s_txt, logit_scale=scale, negatives=s_neg)
        teacher = Features(image=t_img, text=t_txt, logit_scale=scale, negatives=t_neg)
        batch = Batch(keys=[str(i) for i in range(b)], images=torch.zeros(b, 3, 2, 2),
                      text=torch.zeros(b, 4, dtype=torch.long), neg_valid=torch.ones(b, 4, dtype=torch.bool))
        out = degla_losses(student, teacher, batch, DeglaLossConfig(enabled=True, distill_reduction=reduction))
        brute = (F.mse_loss(s_img, t_img, reduction="sum") + F.mse_loss(s_txt, t_txt, reduction="sum")
                 + F.mse_loss(s_neg, t_neg, reduction="sum"))
        return float(out["degla_distill"]), brute

    mean256, brute = term(256, "mean")
    assert cm.DEGLA_MEAN_WEIGHT * mean256 == pytest.approx(0.005 * float(brute), rel=1e-5)
    mean64, brute64 = term(64, "mean", seed=1)
    assert cm.DEGLA_MEAN_WEIGHT * mean64 == pytest.approx(0.005 * float(brute64) * 256 / 64, rel=1e-5)


def test_cuda_mode_sizes_the_gpu_run_and_refuses_without_a_gpu(tmp_path):
    jobs = _jobs(tmp_path, "--device", "cuda", "--seeds", "1")
    clip = jobs["clip/seed0"].overrides
    assert "train.precision=amp_bf16" in clip and "model.config.vision_cfg.image_size=112" in clip
    assert set(cm.CUDA_MODEL) <= set(clip) and "train.steps=1200" in clip
    args = cm.build_parser().parse_args(["--out", str(tmp_path), "--device", "cuda"])
    cm.apply_device_defaults(args, ["--device", "cuda"])
    assert args.budget_minutes == 8 and args.jobs == len(cm.ALL_ARMS)  # sized to the window on the GPU itself
    # an option given on the command line wins over the mode's default
    assert "train.steps=50" in _jobs(tmp_path, "--device", "cuda", "--seeds", "1", "--scratch-steps", "50")[
        "clip/seed0"].overrides
    from powerclip.config import load_config

    for job in jobs.values():
        load_config(cm.ROOT / job.config, job.overrides + [f"train.run_dir={tmp_path / 'r'}"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            cm.main(["--out", str(tmp_path / "gpu"), "--device", "cuda"])
        assert not (tmp_path / "gpu").exists()


def test_a_doc_without_its_marked_section_is_refused_before_any_run(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# hand-written prose, no marked section\n")
    with pytest.raises(SystemExit, match="no single"):
        cm.main(["--out", str(tmp_path / "cmp"), "--smoke", "--doc", str(doc)])
    assert not (tmp_path / "cmp").exists() and doc.read_text() == "# hand-written prose, no marked section\n"


# a result-like number: digits, a decimal point, digits (settings said as integers, like "3 seeds", are
# not results); a leading sign is part of how the report prints a difference, so it is dropped
_DECIMAL = re.compile(r"(?<![\w.])[+\-−]?(\d+\.\d+)(?![\w.]*\d)")


def _decimals(text: str) -> set[str]:
    return set(_DECIMAL.findall(text))


def test_method_comparison_doc_and_readme_cite_only_numbers_the_tool_printed():
    """docs/method_comparison.md is prose around the report the tool wrote (between its markers); every
    decimal number in the prose, and in the README's evidence section, is one the report prints."""
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "method_comparison.md").read_text()
    generated = cm.doc_section(doc)
    assert "### Primary endpoints" in generated and "Holm" in generated
    rows = [line for line in generated.splitlines() if line.startswith("| ") and " − " in line.split("|")[1]
            and line.split("|")[3].strip() in {e.metric for e in cm.PRIMARY_ENDPOINTS}
            and line.split("|")[2].strip() in cm.PRIMARY_SPLITS]
    assert len(rows) >= len(cm.PRIMARY_ENDPOINTS) * len(cm.PRIMARY_SPLITS)
    printed = _decimals(generated)
    prose = doc.replace(generated, "")
    assert not (_decimals(prose) - printed), f"docs/method_comparison.md prose numbers the report does not print: " \
                                            f"{sorted(_decimals(prose) - printed)}"
    readme = (root / "README.md").read_text()
    evidence = readme.split("## Does each method work? (evidence)", 1)[1].split("\n## ", 1)[0]
    assert not (_decimals(evidence) - printed), f"README evidence numbers the report does not print: " \
                                               f"{sorted(_decimals(evidence) - printed)}"


def test_decimal_pattern_reads_numbers_as_printed():
    assert _decimals("+0.041 [−0.012, +0.095], p 0.0123; 1e-3; v0.19.8; 3 seeds; 36.5 s") == {
        "0.041", "0.012", "0.095", "0.0123", "36.5"}


def test_checks_read_the_controls_interval_against_chance():
    """Shapes legible where clip's replace-obj interval is above 0.5; binding pairs 'at chance' where
    its interval holds 0.5; zero-shot against 1 / #classes."""
    rng = __import__("random").Random(1)

    def items(p):
        return [[float(rng.random() < p) for _ in range(400)] for _ in range(3)]

    keys = {"val/replace-obj": 0.8, "val/binding-pairs": 0.5, "val/zeroshot_acc1": 0.004}
    runs = {s: {"metrics": {}, "items": {}} for s in range(3)}
    for key, p in keys.items():
        for s, row in enumerate(items(p)):
            runs[s]["items"][key], runs[s]["metrics"][key] = row, sum(row) / len(row)
    text = "\n".join(cm.checks_section({"clip": runs}, zeroshot_chance=1 / 135))
    line = {k: next(x for x in text.splitlines() if x.startswith(f"| {w}")) for k, w in
            (("obj", "shapes legible"), ("pairs", "binding pairs"), ("zs", "single-object"))}
    assert "legible: above chance" in line["obj"] and "| 0.5 |" in line["obj"]
    assert "at chance: the pairs need a binding" in line["pairs"]
    assert line["zs"].endswith("| at chance |") and "| 0.007407 |" in line["zs"]


def test_method_comparison_doc_is_the_report_of_its_stored_results():
    """The doc's generated section is exactly the report recomputed from the stored per-item outcomes
    (docs/method_comparison_results.json.gz: every run's items; the bootstrap is seeded)."""
    root = Path(__file__).resolve().parents[1]
    saved = cm.load_results(root / "docs" / "method_comparison_results.json.gz")
    doc = (root / "docs" / "method_comparison.md").read_text()
    text = cm.report_from_results(saved)
    demoted = "\n".join(("#" + x) if x.startswith("#") else x for x in text.rstrip("\n").split("\n"))
    assert cm.doc_section(doc) == demoted, "docs/method_comparison.md: regenerate its report with " \
        "python tools/compare_methods.py --report-from docs/method_comparison_results.json.gz --doc docs/method_comparison.md"
    # and every run of every arm is in it, with its per-item outcomes for the primary endpoints
    assert set(saved["results"]) >= set(cm.ALL_ARMS)
    for e in cm.PRIMARY_ENDPOINTS:
        for split in cm.PRIMARY_SPLITS:
            for arm in (e.arm, e.control):
                assert all(len(r["items"][f"{split}/{e.metric}"]) >= 2000 for r in saved["results"][arm].values())


@pytest.mark.slow
def test_cuda_plan_trains_and_evaluates_on_cpu(tmp_path):
    """The --device cuda plan's run settings (the wider model at 112 px, amp_bf16 at ZeRO-0) train, export
    and evaluate: a seed's start, 2 steps on tiny data, in a spawned worker as main runs it (here on the
    CPU: the wiring is checked before a GPU window, not the speed)."""
    import concurrent.futures as cf
    import multiprocessing

    from powerclip.data.synthetic import make_synthetic

    synth = tmp_path / "synth"
    make_synthetic(synth, train_shards=1, val_shards=1, heldout_shards=1, per_shard=16, image_size=112,
                   num_colours=27, binding_pairs=8, single_objects=8)
    (synth / "seen").mkdir()
    (synth / "seen" / "00000.tar").symlink_to(synth / "train" / "00000.tar")
    argv = ["--device", "cuda", "--seeds", "1", "--scratch-steps", "2", "--pretrain-steps", "2", "--ft-steps", "2",
            "--batch", "8", "--train-shards", "1"]
    args = cm.build_parser().parse_args(["--out", str(tmp_path), *argv])
    cm.apply_device_defaults(args, argv)
    jobs = {j.name: j for j in cm.plan(args, synth)}
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=cm._worker_init,
                                initargs=(1,)) as pool:
        res = pool.submit(cm.run_job, jobs["pretrained/seed0"], str(synth), str(tmp_path)).result(timeout=600)
    assert len(res["items"]["val/binding-pairs"]) == 8 and len(res["items"]["heldout/zeroshot_acc1"]) == 8
    assert (tmp_path / "pretrained" / "seed0" / "open_clip_config.json").is_file()  # the fine-tuning arms' start
    import yaml

    cfg = yaml.safe_load((tmp_path / "runs" / "pretrain" / "seed0" / "config.yaml").read_text())
    assert cfg["train"]["precision"] == "amp_bf16" and cfg["model"]["config"]["vision_cfg"]["width"] == 256
    assert cfg["model"]["config"]["vision_cfg"]["image_size"] == 112


def test_starts_from_refuses_what_would_not_be_the_starts_asked_for(tmp_path):
    """One line, nothing trained: with --pretrained or a budget (both decide the starts otherwise), or a
    folder that is not a comparison's --out."""
    for extra in (["--pretrained", str(tmp_path)], ["--budget-minutes", "5"]):
        with pytest.raises(SystemExit, match="--starts-from fixes each seed's starts"):
            cm.main(["--out", str(tmp_path / "a"), "--starts-from", str(tmp_path), *extra])
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit, match=r"not a comparison's --out \(.*synth/manifest.json not found\)"):
        cm.main(["--out", str(tmp_path / "b"), "--smoke", "--arms", "clip_ft", "--starts-from", str(tmp_path / "c")])
    assert not (tmp_path / "b" / "runs").exists()
