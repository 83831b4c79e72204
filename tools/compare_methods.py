#!/usr/bin/env python
"""Every method against its control on the synthetic benchmark, over seeds, with 95% confidence intervals.

The data: powerclip.data.synthetic with 27 colours by default (--colours), so that two scenes with the
same colours and shapes bound differently rarely share a batch and plain CLIP is not taught binding
by its own loss (the report states the counted rate); --colours 7 is the demo's data.

Arms (each trained once per seed; seed s fixes the initialisation AND the data order of every arm,
so the arms of one seed are paired), each in its paper's setting as far as this scale allows:

  from random weights (configs/tiny_cpu.yaml), control ``clip``:
    clip              the plain CLIP loss
    clip_mean         the plain CLIP loss with the PowerCLIP preset's mean pooling (no powerset term)
    powerclip         + the powerset term (weight 0.2) and mean pooling, the objects' boxes as its regions
                      (data.region_source=precomputed: the generator knows every box, the analogue of the
                      paper's SAM regions) and zeta calibrated per seed by tools/calibrate_zeta.py with the
                      seed's CLIP start (job ``zeta/seedS``)
    powerclip_random  the same on random boxes (ablation of the regions), the same zeta
  from each seed's CLIP start (a plain CLIP pretraining with that seed, exported), configs/degla_tiny_cpu.yaml,
  control ``clip_ft``:
    clip_ft     fine-tuned with the plain CLIP loss (more training, no negatives)
    negclip     NegCLIP alone (the DeGLA base term: the grammar's hard negatives in the softmax)
    degla       DeGLA: NegCLIP + 0.1 IGC + 0.1 TGC + distillation at the released strength relative to the
                base loss at any batch (a per-vector mean weighted 0.005 x 256 x 6 = 7.68, the released
                summed MSE x 0.005 at its batch 256 with 4 negatives), EMA 0.9996 as released
  from each seed's SigLIP start (pretrained with the sigmoid loss), control ``siglip_ft``:
    siglip_ft   fine-tuned with the sigmoid loss (C2LIP fine-tunes SigLIP)
    concept     + the C2LIP concept terms NPC 1.0 + XAC 0.01 in their sigmoid form
  Every fine-tuning arm and control runs at --ft-lr (1e-3): the papers' lr x steps over 150 steps
  (C2LIP 1e-5 x 14,160 = 0.14); at DeGLA's preset 1e-4, 150 steps barely move NegCLIP's own
  image-grounded loss. Each start is evaluated like a run (columns ``pretrained``, ``pretrained_siglip``).

Every run is evaluated on the seen split (the first train shard: scenes it trained on), the val split
(seen colour-shape pairs, new scenes) and the heldout split (scenes with a pair never named in
training): seen against val tells memorising the training scenes from learning what carries to new ones.
Per split: accuracy per hard-negative kind, retrieval R@1, zero-shot top-1 on single-object images drawn
by the generator (one object, so its class is the only true label; heldout: the held pairs), and on val
and heldout the binding pairs (powerclip.data.synthetic_pairs: two shapes, two colours, equal size, the
same layout with the colours exchanged, captions without relation, position or size words; only binding
solves them): ``binding-pairs`` (the matched pairs outscore the crossed ones, chance 0.5) and their
Winoground text / image / group scores; and, labelled ``relation-twins``, the older twins (each scene
with a swap-att negative against its colour-swapped twin), whose relation word and colour positions
solve them without binding. Every accuracy is kept per item in results.json, so any figure can be
recomputed.

The report opens with the primary endpoints, declared in code (``PRIMARY_ENDPOINTS``): per method the one
metric its paper claims, paired to its control, on val and heldout, with 95% intervals and p-values from a
hierarchical bootstrap over seeds and items (powerclip.eval.stats) and Holm's correction across them.
A checks section measures on the control what the benchmark needs (shapes legible: clip's replace-obj
above chance; the binding pairs not solved without binding). Every other cell is exploratory: mean
[95% bootstrap CI] per arm and paired difference, never bold. The fine-tuning arms train on the
generator's own negatives (the rule backend of tools/make_negatives.py would name heldout pairs in
negatives, a shortcut the heldout split punishes).

  python tools/compare_methods.py --out runs/compare            # the full comparison (see --help)
  python tools/compare_methods.py --out /tmp/cmp --smoke        # 2-minute end-to-end check (CI)
  python tools/compare_methods.py --out runs/gpu --device cuda  # GPU window: every arm of a seed at once,
                                                                # 112 px, a wider model, more steps, 8 min

Runs already finished under --out are reused (a rerun only does what is missing); --starts-from
OTHER_OUT copies the per-seed starts of another comparison (same data, same start settings). --jobs runs that
many trainings at once, each with --threads torch threads. --budget-minutes (8 with --device cuda)
sizes the run to a wall time: a short probe measures every workload on this machine, and the steps
are scaled down until the simulated schedule fits (tools/compare_budget.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRATCH_CONTROL, FT_CONTROL, SIGLIP_CONTROL = "clip", "clip_ft", "siglip_ft"
PRETRAINED = "pretrained"  # the CLIP fine-tuning arms' starts, one per seed: a column beside them
PRETRAINED_SIGLIP = "pretrained_siglip"  # the SigLIP starts of the concept arms, one per seed
ZETA = "zeta"  # per seed: loss.powerset.zeta calibrated by tools/calibrate_zeta.py with that seed's CLIP start
SIGLIP = ["loss.global_loss=siglip", "model.init_logit_bias=-10", "model.init_logit_scale=2.302585"]  # log(10)
# the PowerCLIP preset: powerset term 0.2, mean pooling; its regions are the objects' boxes (the analogue
# of the paper's SAM regions: the generator knows every object's box) and its zeta is calibrated per seed
POWERCLIP = ["loss.powerset.weight=0.2", "model.pool=mean"]
SCRATCH_ARMS: dict[str, list[str]] = {
    "clip": [],
    "clip_mean": ["model.pool=mean"],
    "powerclip": [*POWERCLIP, "data.region_source=precomputed"],
    "powerclip_random": [*POWERCLIP, "data.region_source=random"],  # ablation: random boxes, same zeta
}
ZETA_ARMS = ("powerclip", "powerclip_random")
# DeGLA's released distillation: squared L2 SUMMED over the batch's G images, G captions and G*K negatives,
# weighted 0.005, at G = 256 and K = 4; as a per-vector mean its weight is 0.005 x 256 x (2 + 4) = 7.68,
# the released strength relative to the (mean) base loss at any batch. EMA: the released 0.9996.
DEGLA_RELEASED = {"batch": 256, "negatives": 4, "sum_weight": 0.005, "ema_decay": 0.9996}
DEGLA_MEAN_WEIGHT = DEGLA_RELEASED["sum_weight"] * DEGLA_RELEASED["batch"] * (2 + DEGLA_RELEASED["negatives"])
FT_ARMS: dict[str, list[str]] = {
    "clip_ft": ["loss.degla.enabled=false", "data.num_negatives=0"],
    "negclip": ["loss.degla.igc_weight=0", "loss.degla.tgc_weight=0", "loss.degla.distill_weight=0"],
    "degla": ["loss.degla.distill_reduction=mean", f"loss.degla.distill_weight={DEGLA_MEAN_WEIGHT:g}",
              f"loss.degla.ema_decay={DEGLA_RELEASED['ema_decay']}"],
}
# C2LIP fine-tunes SigLIP with the sigmoid loss: both arms start from a SigLIP start (pretrained here with
# the sigmoid loss, one per seed) and differ only in the concept terms (NPC 1.0 + XAC 0.01, sigmoid form)
SIGLIP_ARMS: dict[str, list[str]] = {
    "siglip_ft": [],
    "concept": ["data.concepts=true", "loss.concept.npc_weight=1.0", "loss.concept.xac_weight=0.01"],
}
# (arm, reference) pairs that differ in one part only, reported beside the control: the PowerCLIP
# preset changes the pooling AND adds the powerset term (against clip_mean the term is the only
# difference), and its regions are the objects' boxes (against powerclip_random the boxes are);
# DeGLA is NegCLIP plus its grounded contrasts and distillation (against negclip those are)
ABLATIONS: tuple[tuple[str, str], ...] = (("powerclip", "clip_mean"), ("powerclip", "powerclip_random"),
                                          ("degla", "negclip"))
# control, its arms, the column of their start (None: from random weights)
GROUPS: tuple[tuple[str, dict[str, list[str]], str | None], ...] = (
    (SCRATCH_CONTROL, SCRATCH_ARMS, None), (FT_CONTROL, FT_ARMS, PRETRAINED),
    (SIGLIP_CONTROL, SIGLIP_ARMS, PRETRAINED_SIGLIP))
ALL_ARMS = [*SCRATCH_ARMS, *FT_ARMS, *SIGLIP_ARMS]
# "seen": the first train shard, scenes every arm trained on; against val it tells memorising the
# training scenes from learning something that carries to new scenes
SPLITS = ("seen", "val", "heldout")
# --device cuda: all arms of a seed at once on one GPU, a wider model at 112 px and more steps
CUDA_MODEL = ["model.config.vision_cfg.width=256", "model.config.vision_cfg.layers=6",
              "model.config.vision_cfg.patch_size=16", "model.config.text_cfg.width=256",
              "model.config.text_cfg.layers=6", "model.config.embed_dim=256"]
CUDA_DEFAULTS = {"image_size": 112, "scratch_steps": 1200, "pretrain_steps": 1200, "ft_steps": 600, "batch": 128,
                 "jobs": len(ALL_ARMS), "threads": 1, "budget_minutes": 8.0}


@dataclass
class Job:
    name: str  # arm/seedN; pretrained*/seedN (a start: exported to OUT/<name>, evaluated); zeta/seedN
    config: str
    overrides: list[str]
    run_dir: Path
    evaluate: bool = True
    after: list[str] = field(default_factory=list)
    keep_model: bool = False  # export the trained weights to run_dir/model (for later evaluations)
    kind: str = "train"  # train | start (exported to OUT/<name>) | zeta (calibrates, trains nothing)
    zeta_from: str | None = None  # a zeta job's name: its fitted value is this run's loss.powerset.zeta
    zeta_batches: int = 4  # a zeta job: batches of the training stream it fits on


DOC_BEGIN = "<!-- BEGIN generated by tools/compare_methods.py: do not edit by hand -->"
DOC_END = "<!-- END generated by tools/compare_methods.py -->"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for data, runs, results and report.md (required unless --report-from)")
    p.add_argument("--report-from", default=None, metavar="RESULTS",
                   help="train nothing: print the report of an earlier comparison's results.json (or .json.gz, as "
                   "docs/method_comparison_results.json.gz), recomputed from its per-item outcomes; with --doc, "
                   "also write it there")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (>= 2 for a confidence interval)")
    p.add_argument("--scratch-steps", type=int, default=300, help="steps of the arms trained from random weights")
    p.add_argument("--pretrain-steps", type=int, default=300, help="steps of each seed's pretrained starts")
    p.add_argument("--ft-steps", type=int, default=150, help="steps of the fine-tuning arms")
    p.add_argument("--ft-lr", type=float, default=1e-3,
                   help="lr of every fine-tuning arm (controls included); 0: the presets' (DeGLA 1e-4, SigLIP arms "
                   "tiny_cpu's 1e-3). 1e-3 is the papers' lr x steps over this run's 150 steps: C2LIP 1e-5 x 14,160 "
                   "steps = 0.14 (9.4e-4 over 150); at DeGLA's preset 1e-4, 150 steps barely move NegCLIP's own "
                   "image-grounded loss")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=512, help="samples per shard (val/heldout: one shard each)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--relation-prob", type=float, default=1.0,
                   help="synthetic generator: share of multi-object captions with a relation (0: bag-of-words trap)")
    p.add_argument("--colours", type=int, default=27,
                   help="synthetic generator: colour vocabulary size (27: binding twins rare in a batch, so plain CLIP "
                        "is not taught binding, see powerclip.data.synthetic_twins; 7: the demo's data)")
    p.add_argument("--binding-pairs", type=int, default=2000,
                   help="binding pairs and single-object zero-shot cases per split (powerclip.data.synthetic_pairs): "
                   "the primary endpoints' items")
    p.add_argument("--zeta-batches", type=int, default=4,
                   help="batches of the training stream tools/calibrate_zeta.py fits each seed's zeta on")
    p.add_argument("--boot", type=int, default=10000,
                   help="hierarchical bootstrap replicates of each primary endpoint (powerclip.eval.stats)")
    p.add_argument("--pretrained", default=None,
                   help="reuse this export as the CLIP start of every seed (the CLIP fine-tuning arms and the zeta "
                   "calibration; default: each seed pretrains its own)")
    p.add_argument("--starts-from", default=None, metavar="OTHER_OUT",
                   help="copy each seed's CLIP and SigLIP starts (weights, metrics, per-item outcomes) from an "
                   "earlier comparison's --out instead of pretraining them again, e.g. to try another --ft-lr on the "
                   "same starts; refused unless that comparison's data and each start's settings are the ones this "
                   "run would train with. Not with --pretrained or --budget-minutes")
    p.add_argument("--arms", default=",".join(ALL_ARMS), help="comma-separated subset")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the GPU-window mode: every arm of a seed at once on one GPU (--jobs "
                   f"{CUDA_DEFAULTS['jobs']}), {CUDA_DEFAULTS['image_size']} px, a 256-wide 6-layer model, "
                   f"{CUDA_DEFAULTS['scratch_steps']}/{CUDA_DEFAULTS['ft_steps']} steps, batch {CUDA_DEFAULTS['batch']}, "
                   "amp_bf16 (options given on the command line win)")
    p.add_argument("--budget-minutes", type=float, default=0.0,
                   help="size the run to this wall time (0: run the plan as it is; --device cuda: "
                   f"{CUDA_DEFAULTS['budget_minutes']:g}): a probe trains every workload of the plan (each arm, "
                   "each kind of start, the zeta fit) --probe-steps steps, --jobs at once, on this machine; the "
                   "plan's steps (given or default) are then scaled down, never up, until its schedule simulated "
                   "with the measured costs ends inside 90%% of the budget, or refused in one line when a quarter "
                   "of them does not fit. The sizing is kept in OUT/budget.json: a resumed run keeps it. Not with "
                   "--smoke")
    p.add_argument("--probe-steps", type=int, default=30, help="steps of each workload's probe (--budget-minutes)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training")
    p.add_argument("--keep-models", action="store_true",
                   help="keep each run's exported weights (RUN/model, ~30 MB per run at the defaults) so it can be "
                   "evaluated again later; by default only the metrics are kept")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate the finished runs again from the weights --keep-models kept (and the pretrained "
                   "starts), e.g. after the benchmark gained a metric; runs without kept weights keep their metrics")
    p.add_argument("--doc", default=None,
                   help="also write the report into this markdown file, between its two marker lines "
                   f"({DOC_BEGIN!r} ... {DOC_END!r}; a new file gets them); the text around them is left as it is")
    p.add_argument("--smoke", action="store_true", help="tiny data and 2 steps per run: checks the tool only")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every run (key=value)")
    return p


def apply_device_defaults(args: argparse.Namespace, argv: list[str]) -> None:
    """--device cuda: the GPU mode's sizes wherever the command line did not set the option."""
    if args.device != "cuda":
        return
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for key, value in CUDA_DEFAULTS.items():
        if f"--{key.replace('_', '-')}" not in given:
            setattr(args, key, value)


def _steps(steps: int) -> list[str]:
    return [f"train.steps={steps}", f"checkpoint.every_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}"]


def plan(args: argparse.Namespace, synth: Path) -> list[Job]:
    out = Path(args.out)
    shards = f"{synth}/train/{{00000..{args.train_shards - 1:05d}}}.tar"
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ALL_ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown arm(s) {unknown}; known: {ALL_ARMS}")
    common = [f"data.sources=[{{shards: '{shards}'}}]", f"data.batch_size={args.batch}", "data.workers=0",
              "checkpoint.resume=none", "train.log_every=10"]
    if args.image_size != 64:
        common.append(f"model.config.vision_cfg.image_size={args.image_size}")
    if getattr(args, "device", "cpu") == "cuda":
        common += CUDA_MODEL + ["train.precision=amp_bf16", "train.zero_stage=0"]
    lr = [f"optim.lr={args.ft_lr}"] if args.ft_lr else []
    jobs: list[Job] = []
    starts: dict[str, Job] = {}

    def start(kind: str, seed: int) -> str:
        """The job name of seed's CLIP or SigLIP start (planned once), or nothing for --pretrained."""
        name = f"{kind}/seed{seed}"
        if kind == PRETRAINED and args.pretrained:
            return ""
        if name not in starts:
            extra = SIGLIP if kind == PRETRAINED_SIGLIP else []
            starts[name] = Job(name, "configs/tiny_cpu.yaml",
                               common + [f"train.seed={seed}", f"data.seed={seed}"] + _steps(args.pretrain_steps)
                               + extra + args.overrides, out / "runs" / kind.replace(PRETRAINED, "pretrain") / f"seed{seed}",
                               kind="start")
        return name

    zetas: dict[str, Job] = {}
    for arm in arms:
        for seed in range(args.seeds):
            seeded = [f"train.seed={seed}", f"data.seed={seed}"]
            run_dir = out / "runs" / arm / f"seed{seed}"
            if arm in SCRATCH_ARMS:
                job = Job(f"{arm}/seed{seed}", "configs/tiny_cpu.yaml",
                          common + seeded + _steps(args.scratch_steps) + SCRATCH_ARMS[arm] + args.overrides,
                          run_dir, keep_model=args.keep_models)
                if arm in ZETA_ARMS:  # zeta: calibrated with the seed's CLIP start on the boxes' regions
                    zname = f"{ZETA}/seed{seed}"
                    if zname not in zetas:
                        s = start(PRETRAINED, seed)
                        zetas[zname] = Job(zname, "configs/tiny_cpu.yaml",
                                           common + seeded + SCRATCH_ARMS["powerclip"] + args.overrides
                                           + [f"model.pretrained={pretrained_path(args, seed)}"],
                                           out / ZETA / f"seed{seed}", evaluate=False, after=[s] if s else [],
                                           kind="zeta", zeta_batches=args.zeta_batches)
                    job.after, job.zeta_from = [zname], zname
            elif arm in FT_ARMS:
                s = start(PRETRAINED, seed)
                job = Job(f"{arm}/seed{seed}", "configs/degla_tiny_cpu.yaml",
                          common + seeded + _steps(args.ft_steps) + [f"model.pretrained={pretrained_path(args, seed)}"]
                          + lr + FT_ARMS[arm] + args.overrides, run_dir, after=[s] if s else [],
                          keep_model=args.keep_models)
            else:
                s = start(PRETRAINED_SIGLIP, seed)
                job = Job(f"{arm}/seed{seed}", "configs/tiny_cpu.yaml",
                          common + seeded + _steps(args.ft_steps) + SIGLIP
                          + [f"model.pretrained={pretrained_path(args, seed, PRETRAINED_SIGLIP)}"]
                          + lr + SIGLIP_ARMS[arm] + args.overrides, run_dir, after=[s], keep_model=args.keep_models)
            jobs.append(job)
    # starts first (every later job waits for one), then the calibrations, then the arms in arm order
    return sorted(starts.values(), key=lambda j: (int(j.name.split("/seed")[1]), j.name)) + list(zetas.values()) + jobs


def _config_difference(ours: Job, theirs: Path) -> list[str]:
    """The settings on which the start ``ours`` would train differently from the finished run whose config
    is ``theirs``; the run folder and the shards' paths (under each comparison's own --out) aside."""
    import yaml

    from powerclip.config import dotted_items, load_config, to_yaml

    mine = dotted_items(yaml.safe_load(to_yaml(load_config(ROOT / ours.config, ours.overrides))))
    other = dotted_items(yaml.safe_load(to_yaml(load_config(theirs))))
    skip = {"train.run_dir", "data.sources"}
    return [f"{k}={other.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(set(mine) | set(other))
            if k not in skip and mine.get(k) != other.get(k)]


def adopt_starts(args: argparse.Namespace, jobs: list[Job], synth: Path) -> list[str]:
    """--starts-from: copy every planned start not finished here from the other comparison (its export,
    its run folder's records without checkpoints), so the start jobs are reused as if trained here.
    Everything is checked before anything is copied; returns the names copied."""
    import shutil

    from powerclip.eval_io.model_io import is_export_dir

    other, out = Path(args.starts_from).resolve(), Path(args.out).resolve()
    manifest = other / "synth" / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"error: --starts-from {other}: not a comparison's --out ({manifest} not found)")
    theirs, mine = json.loads(manifest.read_text()), json.loads((synth / "manifest.json").read_text())
    if theirs != mine:
        keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        raise SystemExit(f"error: --starts-from {other}: its data differs from this run's ({', '.join(keys)} in "
                         f"synth/manifest.json); give the data options that comparison was run with (--colours, "
                         "--train-shards, --per-shard, --image-size, --relation-prob, --binding-pairs)")
    todo = []
    for job in jobs:
        if job.kind != "start" or (job.run_dir / "compare_done.json").is_file():
            continue
        rel = job.run_dir.resolve().relative_to(out)
        if job.run_dir.exists() or (out / job.name).exists():
            raise SystemExit(f"error: --starts-from: {job.name} was begun in this --out ({job.run_dir}); finish it "
                             "here (leave --starts-from out) or use a new --out")
        src_run, src_export = other / rel, other / job.name
        if not (src_run / "compare_done.json").is_file() or not is_export_dir(src_export):
            raise SystemExit(f"error: --starts-from {other}: {job.name} is not finished there "
                             f"({src_run / 'compare_done.json'} or the export {src_export} missing)")
        diff = _config_difference(job, src_run / "config.yaml")
        if diff:
            raise SystemExit(f"error: --starts-from {other}: {job.name} was trained with other settings: "
                             f"{'; '.join(diff[:4])}; give that comparison's options (--pretrain-steps, --batch, "
                             "--image-size, extra overrides) or leave --starts-from out")
        todo.append((job, src_run, src_export))
    for job, src_run, src_export in todo:
        shutil.copytree(src_export, out / job.name)
        shutil.copytree(src_run, job.run_dir, ignore=shutil.ignore_patterns("checkpoints", ".powerclip.lock"))
        done = job.run_dir / "compare_done.json"
        done.write_text(json.dumps({**json.loads(done.read_text()), "copied_from": str(src_run)}))
    return [job.name for job, _, _ in todo]


def pretrained_path(args: argparse.Namespace, seed: int, kind: str = PRETRAINED) -> str:
    """The fine-tuning start of ``seed``: --pretrained (one CLIP start for every seed) or its own pretraining."""
    if args.pretrained and kind == PRETRAINED:
        return str(Path(args.pretrained).resolve())
    return str(Path(args.out).resolve() / kind / f"seed{seed}")


# ---------------------------------------------------------------------------------- one job
def _worker_init(threads: int) -> None:
    """Each worker process is its own single-rank 'world': its own rendezvous port, its own threads."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before torch (and free_port's module) is imported
    import torch

    from powerclip.train.dist_env import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    torch.set_num_threads(threads)


def run_job(job: Job, synth: str, out: str, reevaluate: bool = False) -> dict:
    """Train (unless already finished), export a start or evaluate every split; a zeta job fits
    ``loss.powerset.zeta`` instead. ``reevaluate``: evaluate a finished run again from its kept weights."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    from powerclip.config import load_config
    from powerclip.eval_io.model_io import is_export_dir
    from powerclip.train.loop import train

    done = job.run_dir / "compare_done.json"
    export = Path(out) / job.name if job.kind == "start" else job.run_dir / "model"
    if done.is_file():
        result = json.loads(done.read_text())
        if reevaluate and job.evaluate and is_export_dir(export):
            result["metrics"], result["items"] = evaluate_model(export, synth)
            done.write_text(json.dumps(result))
            return result
        return {**result, "reused": True}
    job.run_dir.mkdir(parents=True, exist_ok=True)
    if job.kind == "zeta":
        result = {"name": job.name, "train_s": 0.0, **calibrate_zeta(job)}
        done.write_text(json.dumps(result))
        return result
    overrides = list(job.overrides)
    if job.zeta_from is not None:
        zeta = json.loads((Path(out) / job.zeta_from / "compare_done.json").read_text())["zeta"]
        overrides.append(f"loss.powerset.zeta={zeta:.6f}")
    t0 = time.monotonic()
    trained = job.run_dir / "compare_trained.json"  # training done, evaluation not (yet)
    if trained.is_file():
        t_train = json.loads(trained.read_text())["train_s"]
    else:
        cfg = load_config(ROOT / job.config, overrides + [f"train.run_dir={job.run_dir}"])
        train(cfg)
        t_train = time.monotonic() - t0
        trained.write_text(json.dumps({"train_s": t_train}))
        t0 = time.monotonic() - t_train
    result: dict = {"name": job.name, "train_s": t_train, "losses": _loss_summary(job.run_dir)}
    from powerclip.export import export_checkpoint

    if job.kind == "start" or job.keep_model:
        if not is_export_dir(export):
            export_checkpoint(job.run_dir, export)
        model = export
    else:
        model = job.run_dir  # a run folder is exported on the fly
    if job.evaluate:
        result["metrics"], result["items"] = evaluate_model(model, synth)
    result["eval_s"] = time.monotonic() - t0 - t_train
    _cleanup(job.run_dir)
    done.write_text(json.dumps(result))
    return result


def calibrate_zeta(job: Job) -> dict[str, float]:
    """``loss.powerset.zeta`` fitted by tools/calibrate_zeta.py (least squares against the exact 2^M
    enumeration) on ``--zeta-batches`` batches of the training stream, with the seed's CLIP start and
    the objects' boxes as regions (the PowerCLIP arm's data); its printout goes to the job's zeta.log."""
    import contextlib
    import io

    sys.path.insert(0, str(ROOT / "tools"))
    from calibrate_zeta import collect, fit_least_squares, fit_zero_bias

    from powerclip.config import load_config

    cfg = load_config(ROOT / job.config, job.overrides + [f"train.run_dir={job.run_dir}"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        cal = collect(cfg, job.zeta_batches)
    if not cal.batches:
        raise RuntimeError(f"{job.name}: no batch came out of the training stream to calibrate zeta on")
    zeta, zero_bias = fit_least_squares(cal), fit_zero_bias(cal)
    (job.run_dir / "zeta.log").write_text(log.getvalue())
    return {"zeta": zeta, "zeta_zero_bias": math.nan if zero_bias is None else zero_bias,
            "pairs": sum(int(e.numel()) for e in cal.exact), "rms_over_tau": float(
                cal.residual(zeta).pow(2).mean().sqrt()) / cal.tau}


def _cleanup(run_dir: Path) -> None:
    """Drop the DeepSpeed checkpoints once evaluated (optimiser states: ~3x the weights per run);
    only of a run this tool trained (its ``compare_trained.json`` record), never another's."""
    import shutil

    ckpt = run_dir / "checkpoints"
    if ckpt.is_dir() and (run_dir / "compare_trained.json").is_file():
        shutil.rmtree(ckpt)


# ---------------------------------------------------------------------------------- sizing to a budget
_PROBE_DROP = ("model.pretrained=", "train.steps=", "checkpoint.every_steps=", "optim.warmup_steps=")


def workload(job: Job) -> str:
    """What a job's cost depends on: its arm, its kind of start, or the zeta fit (not its seed)."""
    return job.name.split("/seed")[0]


def _job_steps(job: Job) -> int:
    steps = [int(o.split("=", 1)[1]) for o in job.overrides if o.startswith("train.steps=")]
    return steps[-1] if steps else 0  # a zeta fit trains nothing


def planned(jobs: list[Job]) -> list:
    """The plan as compare_budget simulates it."""
    from compare_budget import PlannedJob

    return [PlannedJob(j.name, tuple(j.after), workload(j), _job_steps(j)) for j in jobs]


def probe_jobs(jobs: list[Job], out: Path, steps: int) -> dict[str, Job]:
    """One short job per workload of the plan, from random weights (a step costs the same whatever
    the weights, and the probe waits for no start): its first job's settings with ``steps`` steps."""
    probes: dict[str, Job] = {}
    for job in jobs:
        key = workload(job)
        if key in probes:
            continue
        overrides = [o for o in job.overrides if not o.startswith(_PROBE_DROP)]
        if job.kind != "zeta":
            overrides += _steps(steps) + ["loss.degla.require_pretrained=false"]
        probes[key] = Job(f"probe/{key}", job.config, overrides, out / "probe" / key, evaluate=job.evaluate,
                          kind="zeta" if job.kind == "zeta" else "train", zeta_batches=job.zeta_batches)
    return probes


def timed_run_job(job: Job, synth: str, out: str) -> dict[str, float]:
    """run_job, timed: ``setup_s`` the imports a worker's first job pays, ``wall_s`` the job itself."""
    t0 = time.monotonic()
    import open_clip  # noqa: F401

    import powerclip.eval  # noqa: F401
    import powerclip.export  # noqa: F401
    import powerclip.train.loop  # noqa: F401

    t1 = time.monotonic()
    run_job(job, synth, out)
    return {"setup_s": t1 - t0, "wall_s": time.monotonic() - t1}


def probe(args: argparse.Namespace, synth: Path, out: Path, jobs: list[Job]) -> dict:
    """Every workload's measured cost on this machine (OUT/probe.json, reused by a rerun)."""
    from compare_budget import step_time

    record = out / "probe.json"
    if record.is_file():
        return json.loads(record.read_text())
    probes = probe_jobs(jobs, out, args.probe_steps)
    print(f"probe: {len(probes)} workloads x {args.probe_steps} steps, {args.jobs} at once", flush=True)
    t0 = time.monotonic()
    ctx = __import__("multiprocessing").get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init, initargs=(args.threads,)) as pool:
        futures = {key: pool.submit(timed_run_job, job, str(synth), str(out)) for key, job in probes.items()}
        measured = {key: f.result() for key, f in futures.items()}
    costs = {}
    for key, m in measured.items():
        job = probes[key]
        if job.kind == "zeta":
            costs[key] = {"fixed_s": m["wall_s"], "step_s": 0.0}
            continue
        rows = [json.loads(x) for x in (job.run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        per_step = step_time([float(r["step_s"]) for r in rows])
        costs[key] = {"fixed_s": max(0.0, m["wall_s"] - len(rows) * per_step), "step_s": per_step}
    result = {"steps": args.probe_steps, "jobs": args.jobs, "probe_s": time.monotonic() - t0, "costs": costs,
              "setup_s": max(m["setup_s"] for m in measured.values())}
    record.write_text(json.dumps(result, indent=1))
    return result


def size_to_budget(args: argparse.Namespace, synth: Path, out: Path, t0: float) -> str:
    """Scale ``args``' steps so the run ends inside ``--budget-minutes`` (compare_budget); returns the
    report's line. The first invocation's sizing (OUT/budget.json) is kept by a resumed run."""
    import copy

    from compare_budget import BudgetError, Cost, choose_scale, scaled_steps

    record = out / "budget.json"
    names = ("scratch_steps", "pretrain_steps", "ft_steps")
    if record.is_file():
        saved = json.loads(record.read_text())
        for name in names:
            setattr(args, name, saved["steps"][name])
        print(f"steps kept from this comparison's first sizing ({record}): {saved['note']}", flush=True)
        return saved["note"]
    measured = probe(args, synth, out, plan(args, synth))
    costs = {k: Cost(**v) for k, v in measured["costs"].items()}

    def scaled(scale: float) -> argparse.Namespace:
        a = copy.copy(args)
        for name in names:
            setattr(a, name, scaled_steps(getattr(args, name), scale))
        return a

    budget_s = 60 * args.budget_minutes
    try:
        sizing = choose_scale(budget_s, time.monotonic() - t0, measured["setup_s"], args.jobs,
                              lambda scale: planned(plan(scaled(scale), synth)), costs)
    except BudgetError as e:
        slowest = max(costs, key=lambda k: costs[k].step_s)
        raise SystemExit(f"error: --budget-minutes {args.budget_minutes:g}: {e} (probe on this machine: "
                         f"{slowest} {1000 * costs[slowest].step_s:.0f} ms a step, {args.jobs} at once; the costs are "
                         f"in {out / 'probe.json'}). Give more minutes, fewer --seeds or --arms, fewer steps, or "
                         "--budget-minutes 0 to run the plan as it is") from None
    sized = scaled(sizing.scale)
    steps = {name: getattr(sized, name) for name in names}
    note = (f"{args.budget_minutes:g} min: a {measured['steps']}-step probe of each of the plan's "
            f"{len(costs)} workloads ({measured['jobs']} at once, {measured['probe_s']:.0f} s) measured this "
            f"machine; the plan's steps x{sizing.scale:g} ({steps['scratch_steps']} from scratch, "
            f"{steps['pretrain_steps']} pretraining, {steps['ft_steps']} fine-tuning) are predicted to end at "
            f"{sizing.predicted_s:.0f} s (the schedule simulated with the measured costs; the wall time below is "
            "what it took)")
    record.write_text(json.dumps({"budget_minutes": args.budget_minutes, "scale": sizing.scale,
                                  "predicted_s": sizing.predicted_s, "steps": steps, "note": note}, indent=1))
    for name in names:
        setattr(args, name, steps[name])
    print(f"sized to the budget: {note}", flush=True)
    return note


MARKER = ".compare_methods"  # written first into a new --out: the folder is this tool's


def _is_comparison(path: Path) -> bool:
    return (path / MARKER).is_file() or (path / "synth" / "manifest.json").is_file()


def prepare_out(out: str) -> Path:
    """``--out`` resolved and marked as this tool's: a new or empty folder, or an earlier
    comparison (resumed); any other folder is refused, so a rerun never overwrites others' files."""
    from powerclip.outputs import OutputFolderError, check_output_dir

    try:
        path = check_output_dir(out, _is_comparison, "an earlier tools/compare_methods.py output")
    except OutputFolderError as e:
        raise SystemExit(f"error: {e}") from None
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    return path


def _loss_summary(run_dir: Path) -> dict[str, list[float]]:
    """First and last logged value of every loss term (from the run's metrics.jsonl)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return {}
    keys = [k for k in rows[-1] if k == "loss" or k.startswith("loss/")]
    return {k: [float(rows[0].get(k, math.nan)), float(rows[-1][k])] for k in keys}


# evaluation set -> the flat metric names the report uses: (name in the report, metric, per-item key)
_WINOGROUND = (("", "pair_acc", "pair_acc"), ("-text", "text_acc", "text_acc"), ("-image", "image_acc", "image_acc"),
               ("-group", "acc", "acc"), ("-caption-cos", "caption_pair_cos", None),
               ("-image-cos", "image_pair_cos", None), ("-term", "binding_term", None),
               ("-caption-prior", "caption_prior", None), ("-image-prior", "image_prior", None))
# the binding pairs (only binding solves them) and the older relation-captioned twins (the colours'
# positions and the relation word solve them without binding): labelled for what they measure
WINOGROUND_SETS = {"synthetic/binding-pairs": "binding-pairs", "synthetic/binding": "relation-twins"}


def evaluate_model(model_path: Path | str, synth: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``({split/metric: value}, {split/metric: [value per item]})`` for every split: per-kind accuracy,
    zero-shot top-1, retrieval R@1, and the Winoground scores of the binding pairs and of the relation
    twins. Every accuracy keeps its per-item outcomes (their mean is the value), so that any figure
    can be recomputed, and resampled over items."""
    import torch

    from powerclip.eval import evaluate
    from powerclip.eval_io.model_io import load_model

    loaded = load_model(model_path, "cuda" if torch.cuda.is_available() else "cpu")
    flat: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    for split in SPLITS:
        res = evaluate(loaded.model, loaded.preprocess, loaded.tokenizer, "synthetic", synth, split=split)
        for ds, r in res.items():
            m, it = r["metrics"], r.get("items", {})
            if ds == "synthetic":
                continue  # the scenes' first-named object: ill-posed for a multi-object scene
            if ds == "synthetic/single-object":  # the well-posed zero-shot: one object, one true class
                flat[f"{split}/zeroshot_acc1"] = m["acc1"]
                items[f"{split}/zeroshot_acc1"] = it["acc1"]
            elif ds == "synthetic/retrieval":
                flat[f"{split}/retrieval_i2t_R@1"] = m["text_retrieval_recall@1"]
                flat[f"{split}/retrieval_t2i_R@1"] = m["image_retrieval_recall@1"]
                items[f"{split}/retrieval_i2t_R@1"] = [int(rank < 1) for rank in it["text_retrieval_rank"]]
                items[f"{split}/retrieval_t2i_R@1"] = [int(rank < 1) for rank in it["image_retrieval_rank"]]
            elif ds in WINOGROUND_SETS:
                # pair_acc (the matched pairs outscore the crossed ones, chance 0.5), Winoground's text /
                # image / group, then why: the pair cosines, the binding term and the priors
                # (text score <=> term > |caption prior|; powerclip.eval.metrics.winoground_terms)
                for suffix, metric, item_key in _WINOGROUND:
                    name = f"{split}/{WINOGROUND_SETS[ds]}{suffix}"
                    flat[name] = m[metric]
                    if item_key is not None:
                        items[name] = it[item_key]
            else:
                flat[f"{split}/{ds.split('/', 1)[1]}"] = m["acc"]
                items[f"{split}/{ds.split('/', 1)[1]}"] = it["acc"]
    return flat, items


# ---------------------------------------------------------------------------------- statistics
def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its two-sided 95% Student-t interval (nan for a single value)."""
    from scipy import stats

    n = len(values)
    mu = sum(values) / n
    if n < 2:
        return mu, math.nan
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1))
    return mu, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def _fmt(mu: float, ci: float, signed: bool = False) -> str:
    s = f"{mu:+.3f}" if signed else f"{mu:.3f}"
    return s if math.isnan(ci) else f"{s} ± {ci:.3f}"


@dataclass(frozen=True)
class Endpoint:
    arm: str
    control: str
    metric: str  # the metric name after "split/"
    claim: str  # what the method's paper claims, which this metric stands for here


# The primary endpoints, declared before the runs: per method, the one metric its paper claims, as the
# paired difference to its control, on new scenes of seen pairs (val) and on unseen pairs (heldout).
# Holm's correction runs across all of them; every other number of the report is exploratory.
PRIMARY_ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("powerclip", SCRATCH_CONTROL, "zeroshot_acc1",
             "PowerCLIP: zero-shot classification above CLIP (its headline: the 17-dataset zero-shot average)"),
    Endpoint("concept", SIGLIP_CONTROL, "binding-pairs",
             "C2LIP: concept (noun phrase: attribute + object) alignment, i.e. binding an attribute to its object"),
    Endpoint("negclip", FT_CONTROL, "binding-pairs",
             "NegCLIP: attribute binding (ARO VG-Attribution) above its CLIP start fine-tuned without negatives"),
    Endpoint("degla", FT_CONTROL, "binding-pairs",
             "DeGLA: SugarCrepe swap / replace above CLIP, from hard negatives"),
)
PRIMARY_SPLITS = ("val", "heldout")
ALPHA = 0.05
EXPLORATORY_BOOT = 1000  # replicates per exploratory cell (the primary endpoints use --boot)


def _seed_matrix(results: dict[str, dict[int, dict]], arm: str, key: str,
                 ref: str | None = None) -> np.ndarray | None:
    """[seeds, items] per-item outcomes of ``arm`` (minus ``ref``'s, paired by seed and item) over the
    seeds that have them; None where a run lacks per-item outcomes for ``key``."""
    runs = results.get(arm, {})
    seeds = [s for s in runs if ref is None or s in results.get(ref, {})]
    rows = []
    for s in sorted(seeds):
        a = runs[s].get("items", {}).get(key)
        b = None if ref is None else results[ref][s].get("items", {}).get(key)
        if a is None or (ref is not None and (b is None or len(b) != len(a))):
            return None
        rows.append(np.asarray(a, dtype=float) - (0.0 if b is None else np.asarray(b, dtype=float)))
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return np.stack(rows)


def _cell(results: dict[str, dict[int, dict]], arm: str, key: str, ref: str | None = None,
          n_boot: int = EXPLORATORY_BOOT) -> str:
    """Mean [95% CI] from the hierarchical bootstrap where per-item outcomes exist, else mean ± the
    Student-t half-width over seeds (marked t): the cosines and terms are not kept per item."""
    from powerclip.eval.stats import hierarchical_bootstrap  # not at import: workers set threads first

    signed = ref is not None
    m = _seed_matrix(results, arm, key, ref)
    if m is not None:
        r = hierarchical_bootstrap(m, n_boot=n_boot)
        mu = f"{r.mean:+.3f}" if signed else f"{r.mean:.3f}"
        return f"{mu} [{r.low:+.3f}, {r.high:+.3f}]" if signed else f"{mu} [{r.low:.3f}, {r.high:.3f}]"
    runs = results.get(arm, {})
    seeds = [s for s in runs if key in runs[s].get("metrics", {})
             and (ref is None or key in results.get(ref, {}).get(s, {}).get("metrics", {}))]
    if not seeds:
        return "–"
    vals = [runs[s]["metrics"][key] - (results[ref][s]["metrics"][key] if ref else 0.0) for s in seeds]
    mu, ci = mean_ci(vals)
    return _fmt(mu, ci, signed) + ("" if math.isnan(ci) else " t")


def primary_endpoints(results: dict[str, dict[int, dict]], n_boot: int = 10000) -> list[dict]:
    """Every declared endpoint whose arm and control ran: the paired estimate, its 95% interval and
    two-sided p from the hierarchical bootstrap, and the Holm-adjusted p across the family."""
    from powerclip.eval.stats import hierarchical_bootstrap, holm

    rows: list[dict] = []
    for split in PRIMARY_SPLITS:
        for e in PRIMARY_ENDPOINTS:
            if e.arm not in results or e.control not in results:
                continue
            key = f"{split}/{e.metric}"
            m = _seed_matrix(results, e.arm, key, e.control)
            if m is None:
                continue
            r = hierarchical_bootstrap(m, n_boot=n_boot)
            rows.append({"arm": e.arm, "control": e.control, "split": split, "metric": e.metric,
                         "claim": e.claim, "seeds": int(m.shape[0]), "items": int(m.shape[1]),
                         "estimate": r.mean, "ci95": [r.low, r.high], "p": r.p})
    for row, adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = adj
        row["result"] = ("shown: above the control" if adj <= ALPHA and row["estimate"] > 0 else
                         "opposite: below the control" if adj <= ALPHA else "not shown")
    return rows


def primary_section(rows: list[dict], n_boot: int) -> list[str]:
    lines = ["", "## Primary endpoints", "",
             f"Declared in code before the runs (tools/compare_methods.py `PRIMARY_ENDPOINTS`): per method the "
             "one metric its paper claims, as the paired difference to its control (same seed: same "
             "initialisation, data order and, for the fine-tuning arms, the same pretrained start), on new "
             f"scenes of seen pairs (val) and on unseen pairs (heldout). Estimate: mean over seeds of the "
             f"per-item paired difference. 95% CI and two-sided p: hierarchical bootstrap over seeds and items "
             f"({n_boot} replicates, powerclip.eval.stats). Holm's correction across the {len(rows)} endpoints "
             f"below, family-wise α = {ALPHA}; a method shows its paper's direction only where its Holm p ≤ "
             f"{ALPHA} and the estimate is above 0. With S seeds the bootstrap's seed level understates the seed "
             "variance by the factor (S − 1)/S, as any bootstrap of S values does.", "",
             "| arm − control | split | metric | estimate | 95% CI | p | Holm p | result | seeds × items |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} − {r['control']} | {r['split']} | {r['metric']} | {r['estimate']:+.3f} | "
                     f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {r['p']:.4f} | {r['p_holm']:.4f} | "
                     f"{r['result']} | {r['seeds']} × {r['items']} |")
    if not rows:
        lines.append("| (no endpoint: an arm or its control did not run) | | | | | | | | |")
    lines += ["", "What each endpoint stands for (the paper's claim):", ""]
    lines += [f"* {e.arm} ({e.metric}): {e.claim}" for e in PRIMARY_ENDPOINTS]
    return lines


def report(results: dict[str, dict[int, dict]], meta: dict, n_boot: int = 10000,
           endpoints: list[dict] | None = None, zeroshot_chance: float = 1 / 135) -> str:
    """The markdown report: the primary endpoints with Holm's correction, then every other cell as
    exploratory (per split, mean [95% CI] per arm and the paired difference to the control)."""
    if endpoints is None:
        endpoints = primary_endpoints(results, n_boot)
    lines = [f"# Method comparison on the synthetic benchmark ({meta['seeds']} seeds)", ""]
    lines += [f"* {k}: {v}" for k, v in meta.items()]
    lines += primary_section(endpoints, n_boot)
    lines += checks_section(results, zeroshot_chance)
    lines += ["", "## Exploratory cells (no correction for multiplicity: none of them is a finding)", "",
              "mean [95% CI from the hierarchical bootstrap over seeds and items, "
              f"{EXPLORATORY_BOOT} replicates]; cells marked t: mean ± the 95% Student-t half-width over seed "
              "values (metrics not kept per item). binding-pairs*: the binding pairs (only binding solves "
              "them; binding-pairs is the share of pairs whose matched image–caption pairs outscore the "
              "crossed ones, chance 0.5). relation-twins*: the older colour-swapped twins, whose captions say a "
              "relation between the swapped objects (solvable from the colours' positions and the relation "
              "word, without binding)."]
    groups = [(control, [a for a in arms if a in results], start) for control, arms, start in GROUPS]
    metrics = sorted({k for arm in results.values() for r in arm.values() for k in r.get("metrics", {})})
    for split in SPLITS:
        keys = [k for k in metrics if k.startswith(split + "/")]
        for control, arms, start in groups:
            if not arms:
                continue
            head = arms + ([start] if start in results else [])
            lines += ["", f"### {split} split — arms {', '.join(arms)} (control: {control})", "",
                      "| metric | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
            for k in keys:
                lines.append(f"| {k.split('/', 1)[1]} | " + " | ".join(_cell(results, a, k) for a in head) + " |")
            pairs = [(a, control) for a in arms if a != control and control in results]
            pairs += [(a, ref) for a, ref in ABLATIONS if a in arms and ref in arms]
            if not pairs:
                continue
            lines += ["", f"Paired difference to {control}"
                      + (" and of each ablation pair" if any(ref != control for _, ref in pairs) else "")
                      + " (same seed: same init and data order; same items).", "",
                      "| metric | " + " | ".join(f"{a} − {ref}" for a, ref in pairs) + " |",
                      "|---" * (len(pairs) + 1) + "|"]
            for k in keys:
                lines.append(f"| {k.split('/', 1)[1]} | "
                             + " | ".join(_cell(results, a, k, ref) for a, ref in pairs) + " |")
    lines += ["", "## Training losses (first → last logged value, mean over seeds)", ""]
    for arm, runs in results.items():
        terms = sorted({t for r in runs.values() for t in r.get("losses", {})})
        parts = []
        for t in terms:
            pairs = [r["losses"][t] for r in runs.values() if t in r.get("losses", {})]
            parts.append(f"{t} {sum(p[0] for p in pairs) / len(pairs):.3f} → {sum(p[1] for p in pairs) / len(pairs):.3f}")
        secs = [r.get("train_s", math.nan) for r in runs.values()]
        lines.append(f"* {arm} ({sum(secs) / len(secs):.0f} s per run): " + "; ".join(parts))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- driver
def write_doc(path: Path, report_text: str) -> None:
    """Put the report (headings one level down) between the doc's marker lines: the prose around them,
    which may only cite the report's numbers, is kept; a doc without both markers is refused."""
    body = "\n".join(("#" + line) if line.startswith("#") else line for line in report_text.rstrip("\n").split("\n"))
    block = f"{DOC_BEGIN}\n{body}\n{DOC_END}"
    if not path.exists():
        path.write_text(block + "\n")
        return
    text = check_doc(path)
    head, rest = text.split(DOC_BEGIN, 1)
    tail = rest.split(DOC_END, 1)[1]
    path.write_text(head + block + tail)


def check_doc(path: Path) -> str:
    """The text of an existing --doc file with exactly one marked section (else one line: the fix)."""
    text = path.read_text()
    if text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1 or text.index(DOC_BEGIN) > text.index(DOC_END):
        raise SystemExit(f"--doc {path}: the file has no single {DOC_BEGIN!r} ... {DOC_END!r} section to replace; "
                         "add the two lines where the report goes, or name a new file")
    return text


def load_results(path: Path) -> dict:
    """A results.json written by main (gzip-compressed where the name ends in .gz)."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return json.loads(raw)


def report_from_results(saved: dict) -> str:
    """The report of a saved comparison, recomputed from its per-item outcomes (the bootstrap is
    seeded, so the same file gives the same report on any machine)."""
    args = saved.get("report_args", {})
    return report(saved["results"], saved["meta"], int(args.get("boot", 10000)),
                  zeroshot_chance=float(args.get("zeroshot_chance", 1 / 135)))


def doc_section(text: str) -> str:
    """The generated section of a doc written by ``write_doc`` (markers excluded)."""
    return text.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip("\n")


# meta keys that describe the invocation that trained the runs: kept when a later call only reuses them
INVOCATION_META = ("machine at start", "machine at end", "wall time", "command")


def twin_summary(args: argparse.Namespace) -> str:
    """How often the data lets the contrastive loss teach binding (powerclip.data.synthetic_twins)."""
    from powerclip.data.synthetic_twins import train_scene_keys, twin_rates

    n = max(args.train_shards * args.per_shard, 2 * args.batch)
    r = twin_rates(train_scene_keys(n, 0, args.colours, args.relation_prob), args.batch)
    return (f"over the {n} train scenes, P(a scene's batch of {args.batch} holds a binding twin) = "
            f"{r['scene_has_twin']:.4f}, twin pairs per batch {r['pairs_per_batch']:.3f}, "
            f"batches holding one {r['batch_has_twin']:.3f}")


def check_data(synth: Path, args: argparse.Namespace) -> None:
    """Reused data must be the data asked for: runs of one report share one benchmark."""
    m = json.loads((synth / "manifest.json").read_text())
    have = {"--colours": m.get("num_colours", 7), "--relation-prob": m.get("relation_prob", 1.0),
            "--image-size": m.get("image_size"), "--binding-pairs": (m.get("binding_pairs") or {}).get("cases", 0),
            "single objects": (m.get("single_objects") or {}).get("cases", 0)}
    want = {"--colours": args.colours, "--relation-prob": args.relation_prob, "--image-size": args.image_size,
            "--binding-pairs": args.binding_pairs, "single objects": args.binding_pairs}
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        raise SystemExit(f"{synth}/manifest.json: the data under --out was written with other settings "
                         f"(have, asked): {diff}; use another --out or the same settings")


def link_seen_split(synth: Path) -> None:
    """``synth/seen``: the first train shard (a link), evaluated like the val and heldout splits."""
    seen = synth / "seen"
    seen.mkdir(exist_ok=True)
    link = seen / "00000.tar"
    if not link.exists():
        link.symlink_to(Path("..") / "train" / "00000.tar")


def machine_state() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return (f"{platform.node()}, {os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
            f"(1/5/15 min)")


def checks_section(results: dict[str, dict[int, dict]], zeroshot_chance: float,
                   n_boot: int = EXPLORATORY_BOOT) -> list[str]:
    """What the benchmark needs of the data, measured on the plain-CLIP control and read off its 95%
    interval: shapes legible (replace-obj, one object's shape replaced: above chance 0.5), zero-shot
    learnable (single objects: above chance), and how far plain CLIP binds without a binding
    objective (binding-pairs, chance 0.5: the headroom a binding method has)."""
    from powerclip.eval.stats import hierarchical_bootstrap

    lines = ["", "## Checks of the benchmark (on the control clip)", "",
             "| check | split | clip: mean [95% CI] | chance | reading |", "|---|---|---|---|---|"]
    if SCRATCH_CONTROL not in results:
        return lines + ["| (clip did not run) | | | | |"]
    for split in PRIMARY_SPLITS:
        for key, what, above, within in (
                ("replace-obj", "shapes legible: replace-obj (one object's shape replaced)",
                 "legible: above chance", "NOT shown legible: the interval holds chance"),
                ("zeroshot_acc1", "single-object zero-shot top-1", "above chance", "at chance"),
                ("binding-pairs", "binding pairs without a binding objective",
                 "above chance: plain CLIP binds some colours to shapes by itself (the headroom is the rest)",
                 "at chance: the pairs need a binding the plain loss does not give")):
            m = _seed_matrix(results, SCRATCH_CONTROL, f"{split}/{key}")
            if m is None:
                continue
            chance = zeroshot_chance if key == "zeroshot_acc1" else 0.5
            r = hierarchical_bootstrap(m, n_boot=n_boot)
            lines.append(f"| {what} | {split} | {r.mean:.3f} [{r.low:.3f}, {r.high:.3f}] | {chance:.4g} | "
                         f"{above if r.low > chance else within} |")
    return lines


def arm_settings(args: argparse.Namespace, zetas: dict[int, dict]) -> dict[str, str]:
    """How each arm is set against its paper (the report's header)."""
    z = ", ".join(f"seed {s}: {v['zeta']:.4f} (zero-bias {v['zeta_zero_bias']:.4f}, RMS/tau {v['rms_over_tau']:.3f}, "
                  f"{v['pairs']} pairs)" for s, v in sorted(zetas.items())) or "not calibrated (no PowerCLIP arm ran)"
    return {
        "PowerCLIP arms": "powerset weight 0.2, mean pooling (the preset); powerclip: regions = the objects' boxes "
                          "(data.region_source=precomputed, the analogue of SAM regions); powerclip_random: random "
                          f"boxes (ablation), same zeta; zeta calibrated per seed by tools/calibrate_zeta.py "
                          f"(least squares vs exact 2^M, {args.zeta_batches} batches, the seed's CLIP start, the "
                          f"boxes' regions): {z}",
        "C2LIP arms": "siglip_ft and concept fine-tune each seed's SigLIP start (pretrained with the sigmoid loss, "
                      "logit bias -10, scale 10) with the sigmoid loss; concept adds NPC 1.0 + XAC 0.01 (sigmoid form)",
        "DeGLA arm": f"distillation as a per-vector mean weighted {DEGLA_MEAN_WEIGHT:g} = the released summed MSE x "
                     f"{DEGLA_RELEASED['sum_weight']} at its batch {DEGLA_RELEASED['batch']} with "
                     f"{DEGLA_RELEASED['negatives']} negatives, so its strength against the base loss is the "
                     f"released one at any batch; EMA {DEGLA_RELEASED['ema_decay']} (released)",
        "fine-tuning lr": (f"{args.ft_lr:g} for every fine-tuning arm and control (the papers' lr x steps over "
                           "150 steps: C2LIP 1e-5 x 14,160 = 0.14, i.e. 9.4e-4)") if args.ft_lr else
                          "the presets' (--ft-lr 0)",
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.report_from:
        if args.doc and Path(args.doc).exists():
            check_doc(Path(args.doc))
        text = report_from_results(load_results(Path(args.report_from)))
        if args.doc:
            write_doc(Path(args.doc), text)
        print(text)
        return 0
    if not args.out:
        raise SystemExit("--out is required (a folder for the data, runs and report), unless --report-from")
    apply_device_defaults(args, argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch here; run it on a GPU machine "
                             "(tools/gpu_check.sh) or leave --device out for the CPU comparison")
    if args.smoke:
        args.budget_minutes = 0.0  # two steps a run: nothing to size
        args.scratch_steps = args.pretrain_steps = args.ft_steps = 2
        args.train_shards, args.per_shard, args.batch = 1, 16, 8
        args.seeds = max(2, min(args.seeds, 2))
        args.binding_pairs, args.boot = 32, 1000
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    if args.budget_minutes < 0 or args.probe_steps < 3:
        raise SystemExit(f"--budget-minutes must be >= 0 (got {args.budget_minutes:g}) and --probe-steps >= 3 "
                         f"(got {args.probe_steps})")
    if args.boot < 100 or args.binding_pairs < 0:
        raise SystemExit(f"--boot must be >= 100 (got {args.boot}) and --binding-pairs >= 0 (got {args.binding_pairs})")
    if args.starts_from and (args.pretrained or args.budget_minutes > 0):
        raise SystemExit("--starts-from fixes each seed's starts: not with --pretrained (one start for every seed) "
                         "nor --budget-minutes (which would scale the pretraining steps; give --budget-minutes 0)")
    if args.doc and Path(args.doc).exists():
        check_doc(Path(args.doc))  # before any training: a doc without its section is refused at once
    out = prepare_out(args.out)
    args.out = str(out)
    t0 = time.monotonic()
    state0 = machine_state()
    synth = out / "synth"
    if not (synth / "manifest.json").is_file():
        from powerclip.data.synthetic import make_synthetic

        make_synthetic(synth, train_shards=args.train_shards, val_shards=1, heldout_shards=1,
                       per_shard=args.per_shard, image_size=args.image_size, seed=0,
                       relation_prob=args.relation_prob, num_colours=args.colours, binding_pairs=args.binding_pairs,
                       single_objects=args.binding_pairs)
    check_data(synth, args)
    link_seen_split(synth)
    budget = size_to_budget(args, synth, out, t0) if args.budget_minutes > 0 else None
    jobs = plan(args, synth)
    if args.starts_from:
        for name in adopt_starts(args, jobs, synth):
            print(f"{name}: copied from {args.starts_from}", flush=True)
    results: dict[str, dict[int, dict]] = {}
    zetas: dict[int, dict] = {}
    pending = {j.name: j for j in jobs}
    finished: set[str] = set()
    ctx = __import__("multiprocessing").get_context("spawn")
    from powerclip.progress import progress_bar

    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(args.threads,)) as pool, progress_bar(len(jobs), "runs", unit="run") as bar:
        running: dict[cf.Future, Job] = {}
        while pending or running:
            for name, job in list(pending.items()):
                if all(a in finished for a in job.after):
                    running[pool.submit(run_job, job, str(synth), str(out), args.reevaluate)] = job
                    del pending[name]
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                if fut.exception() is not None:  # stop at once (queued runs cancelled), with the traceback
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise RuntimeError(f"run {job.name} failed (log above; finished runs are kept)") \
                        from fut.exception()
                res = fut.result()
                finished.add(job.name)
                print(f"[{time.monotonic() - t0:6.0f}s] {job.name} done (train {res['train_s']:.0f}s)", flush=True)
                bar.update(1)
                arm, seed = job.name.split("/seed")
                if job.kind == "zeta":
                    zetas[int(seed)] = res
                else:
                    results.setdefault(arm, {})[int(seed)] = res
    if args.pretrained and any(a in FT_ARMS for a in results):  # one given start for every seed
        cache = out / "pretrained_metrics.json"
        # a cache of an older version holds the metrics alone (no per-item outcomes): evaluate again
        if not cache.is_file() or args.reevaluate or "items" not in json.loads(cache.read_text()):
            metrics, items = evaluate_model(pretrained_path(args, 0), str(synth))
            cache.write_text(json.dumps({"metrics": metrics, "items": items}))
        results[PRETRAINED] = {0: json.loads(cache.read_text())}
    phases = []
    if any(a in SCRATCH_ARMS for a in results):
        phases.append(f"from scratch {args.scratch_steps}")
    copied = f"; copied from {args.starts_from}" if args.starts_from else ""
    if any(a in FT_ARMS for a in results):
        start = (f"pretrained start {args.pretrained} (the same for every seed)" if args.pretrained else
                 f"CLIP pretraining {args.pretrain_steps} (one start per seed, pretrained with that seed{copied})")
        phases.append(f"fine-tuning {args.ft_steps} from the {start}")
    if any(a in SIGLIP_ARMS for a in results):
        phases.append(f"fine-tuning {args.ft_steps} from the SigLIP pretraining {args.pretrain_steps} "
                      f"(one per seed{copied})")
    meta = {"seeds": args.seeds, "steps": f"{'; '.join(phases)} (batch {args.batch}, {args.jobs} jobs x "
            f"{args.threads} threads)",
            "data": f"{args.train_shards} x {args.per_shard} train samples, {args.per_shard} val, "
            f"{args.per_shard} heldout, {args.image_size} px, relation_prob {args.relation_prob}, {args.colours} colours",
            "binding pairs": f"{args.binding_pairs} per split (val, heldout), drawn at {args.image_size} px "
            "(powerclip.data.synthetic_pairs)",
            "zero-shot": f"{args.binding_pairs} single-object images per split (one object: its class is the only "
            "true label; heldout: the held pairs), drawn at the data's size (powerclip.data.synthetic_pairs)",
            "device": args.device,
            **({"budget": budget} if budget else {}),
            **arm_settings(args, zetas),
            "binding twins in training batches": twin_summary(args),
            "chance": "0.5 per hard-negative kind and for binding-pairs and relation-twins (pair choice); "
            "-text and -image 0.25, -group 1/6 for independent random scores (Winoground scores); "
            f"zero-shot top-1 1/{5 * args.colours}",
            "extra overrides": " ".join(args.overrides) or "none",
            "machine at start": state0, "machine at end": machine_state(),
            "wall time": f"{time.monotonic() - t0:.0f} s", "command": " ".join(["tools/compare_methods.py", *argv])}
    previous = out / "results.json"
    if all(r.get("reused") for runs in results.values() for r in runs.values()) and previous.is_file():
        # nothing trained or evaluated now: the report stays that of the invocation that did the work
        before = json.loads(previous.read_text()).get("meta", {})
        meta.update({k: before[k] for k in INVOCATION_META if k in before})
        meta["report regenerated"] = f"from the finished runs by: {' '.join(['tools/compare_methods.py', *argv])}"
    for runs in results.values():
        for r in runs.values():
            r.pop("reused", None)
    endpoints = primary_endpoints(results, args.boot)
    text = report(results, meta, args.boot, endpoints, zeroshot_chance=1 / (5 * args.colours))
    (out / "report.md").write_text(text)
    if args.doc:
        write_doc(Path(args.doc), text)
    # per-item outcomes of every run are kept (results[arm][seed]["items"]): any figure can be recomputed
    (out / "results.json").write_text(json.dumps({"results": results, "primary_endpoints": endpoints,
                                                  "meta": meta, "report_args": {
                                                      "boot": args.boot, "zeroshot_chance": 1 / (5 * args.colours)}}))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
