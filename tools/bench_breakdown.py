#!/usr/bin/env python
"""Where a training step's time goes, in one short run: model, loader, end to end (gpu_check's bench).

    python tools/bench_breakdown.py               # on the GPU (tools/gpu_check.sh runs it), <= 8 min
    python tools/bench_breakdown.py --cpu-smoke   # every code path at toy size on CPU (CI)

Three measurements, each next to open_clip_train doing the same thing in the same run:

* ``model``: a fixed batch resident on the device, no loader. Every variant's engine is built once and
  the variants are timed in turn, ``--repeats`` times interleaved (a slow moment of the machine hits
  all of them). Each timed window is ``steps`` optimiser steps after warm-up, through
  ``powerclip.train.loop.train_step`` itself; the engine's ``backward`` and ``step`` are wrapped so
  that CUDA events (wall time on CPU) split each step into forward (+ loss and the step's host sync),
  backward and optimizer. The open_clip row is open_clip_train's step: fp32 weights under autocast,
  torch AdamW with its defaults, ClipLoss, TF32 and cudnn.benchmark on. The table keeps the best
  repeat's median step.
* ``loader``: powerclip's loader and open_clip_train's webdataset loader (``tools/bench_loader.py``)
  on photo-like JPEG shards with CC12M's source sizes, 400-1,024 px (``tools/bench_shards.py``), at
  the model's image size and batch, with the worker count the machine allows.
* ``e2e``: both trainers end to end on those shards (``powerclip.train.loop.train`` with its real
  loader; ``open_clip_train.main`` with ``--dataset-type webdataset``), each in a fresh process,
  alternated twice (once in the smoke run); step time is the interval between batch hand-overs (open_clip's
  "Batch (t)"), median after warm-up. When the fastest model-only variant is not today's recipe, it
  runs end to end too.

Variants are data (``variants()``): the recipe of the GPU preset as shipped (``today``), every value
of ``train.precision`` the config accepts at its lowest ZeRO stage (read from ``powerclip.config.choices`` at run
time, so a precision mode added to the config is measured without editing this file), ZeRO-1 and
``train.compile`` on today's recipe; ``--variant NAME=key=value,key=value`` adds more. Also a
torch.profiler trace of one step of today's recipe (``OUT/profile_step.json``, Chrome/Perfetto
format) and its top kernels (``OUT/profile_top_kernels.txt``).

Output: ``OUT/bench_breakdown.md`` (the table), ``OUT/bench_breakdown.json`` (every figure, every
repeat), and with ``--benchmarks PATH`` the table appended to that BENCHMARKS.md under the GPU-check
heading. A wall-clock budget (``--budget-s``) skips what no longer fits, saying so in the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESET = ROOT / "configs" / "clip_vitb16_cc12m.yaml"  # the plain CLIP recipe open_clip_train is compared with
# datasheet dense bf16 peaks (TFLOP/s) by device-name fragment, for model FLOPs utilisation
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass
class Variant:
    """One way of running powerclip's step: a name and the config overrides over the preset."""

    name: str
    overrides: list[str] = field(default_factory=list)


def lowest_stage(precision: str) -> int:
    """The lowest ZeRO stage a precision mode runs at: 0, or 1 for bf16/fp16 weights (refused at ZeRO-0,
    where DeepSpeed would step the optimiser one tensor at a time)."""
    from powerclip.train.engine import PRECISION_DTYPES

    return 0 if PRECISION_DTYPES[precision] is None else 1


def variants(today: dict[str, Any], extra: list[Variant] | None = None) -> list[Variant]:
    """today's recipe; each train.precision choice at its lowest ZeRO stage (``lowest_stage``); ZeRO-1
    and train.compile on today's recipe.

    ``today``: the preset's train.precision / train.zero_stage / train.compile. Variants that resolve
    to the same (precision, ZeRO stage, compile) are merged, their names joined."""
    from powerclip.config import choices

    p, z = today["precision"], today["zero_stage"]
    out = [Variant(f"today ({p}, ZeRO-{z}{', compile' if today['compile'] else ''})", [])]
    out += [Variant(f"{mode} ZeRO-{lowest_stage(mode)}", [f"train.precision={mode}",
                                                          f"train.zero_stage={lowest_stage(mode)}"])
            for mode in choices("train.precision")]
    out += [Variant(f"{p} ZeRO-1", ["train.zero_stage=1"]), Variant(f"{p} ZeRO-{z} compile", ["train.compile=true"])]
    out += extra or []
    merged: dict[tuple, Variant] = {}
    for v in out:
        key = _resolved(today, v.overrides)
        if key in merged:
            if v.name not in merged[key].name.split(" = "):
                merged[key].name += f" = {v.name}"
        else:
            merged[key] = Variant(v.name, list(v.overrides))
    return list(merged.values())


def _resolved(today: dict[str, Any], overrides: list[str]) -> tuple:
    eff = {"precision": today["precision"], "zero_stage": str(today["zero_stage"]),
           "compile": str(today["compile"]).lower()}
    rest = []
    for o in overrides:
        key, _, value = o.partition("=")
        short = key.removeprefix("train.")
        if short in eff:
            eff[short] = value.lower()
        else:
            rest.append(o)
    return (eff["precision"], eff["zero_stage"], eff["compile"], tuple(sorted(rest)))


def parse_variant(text: str) -> Variant:
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=key=value[,key=value...]")
    return Variant(name, [x for x in rest.split(",") if x])


# ------------------------------------------------------------------------------------- sizes
def sizes(smoke: bool) -> dict[str, Any]:
    """What every section reads: the GPU sizes, or toy sizes for --cpu-smoke."""
    cores = os.cpu_count() or 2
    if smoke:
        return {"smoke": True, "device": "cpu", "batch": 4, "steps": 3, "warmup": 1, "repeats": 2,
                "model_cfg": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                              "patch_size": 16, "head_width": 16},
                              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                           "layers": 1}},
                "extra_overrides": ["train.compile_backend=aot_eager"],  # no C++ toolchain needed on CPU
                "workers": 1, "loader_batches": 2, "photo": {"shards": 2, "per_shard": 12},
                "e2e_steps": 3, "e2e_warmup": 1, "e2e_repeats": 1, "e2e_min_s": 0, "e2e_fastest": False,
                "threads": 1}
    workers = max(1, min(cores - 1, 16))  # the loader workers take every core but the trainer's
    return {"smoke": False, "device": "cuda", "batch": 256, "steps": 30, "warmup": 3, "repeats": 2,
            "model_name": "ViT-B-16", "extra_overrides": [],
            # two batches per worker in the timed window, so every worker's pace is in it
            "workers": workers, "loader_batches": 2 * workers,
            "photo": {"shards": 16, "per_shard": 128}, "e2e_steps": 30, "e2e_warmup": 3, "e2e_repeats": 2,
            "e2e_min_s": 45,  # a child's start-up, warm-up and 30 steps
            "e2e_fastest": True,
            "threads": max(1, min(8, cores // 2))}


def model_overrides(s: dict[str, Any]) -> list[str]:
    if s.get("model_name"):
        return [f"model.name={s['model_name']}"]
    return ["model.name=null", f"model.config={json.dumps(s['model_cfg'])}"]


def run_config(s: dict[str, Any], v: Variant, run_dir: str, steps: int, extra: tuple[str, ...] = ()):
    """The preset with the bench's model/batch, no checkpoints, eval or logging, then the variant."""
    from powerclip.config import load_config

    return load_config(str(PRESET), [*model_overrides(s), f"data.batch_size={s['batch']}",
                                     f"train.run_dir={run_dir}", f"train.steps={steps}", "train.log_every=1000000",
                                     "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "eval.every_steps=0",
                                     "checkpoint.resume=none", *s["extra_overrides"], *extra, *v.overrides])


def today_recipe() -> dict[str, Any]:
    from powerclip.config import load_config

    t = load_config(str(PRESET)).train
    return {"precision": t.precision, "zero_stage": t.zero_stage, "compile": t.compile}


# ---------------------------------------------------------------------------------- timing
class Clock:
    """Timestamps on the device's own timeline: CUDA events (read after one synchronize at the end
    of a window), or perf_counter on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        import torch

        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def settle(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()


class PhaseTimer:
    """Wraps one engine's ``backward`` and ``step`` (instance attributes, nothing else changes) to mark
    the phase boundaries of each step: forward = start..backward, backward, optimizer = step."""

    def __init__(self, engine, clock: Clock) -> None:
        self.clock = clock
        self.marks: dict[str, Any] = {}
        backward, step = engine.backward, engine.step

        def timed_backward(*a, **k):
            self.marks["bwd0"] = clock.mark()
            out = backward(*a, **k)
            self.marks["bwd1"] = clock.mark()
            return out

        def timed_step(*a, **k):
            self.marks["opt0"] = clock.mark()
            out = step(*a, **k)
            self.marks["opt1"] = clock.mark()
            return out

        engine.backward, engine.step = timed_backward, timed_step

    def begin(self) -> None:
        self.marks = {"start": self.clock.mark()}

    def end(self) -> dict[str, Any]:
        self.marks["end"] = self.clock.mark()
        return self.marks


def phases(clock: Clock, marks: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds per phase over the window's steps (after one synchronize)."""
    clock.settle()
    cols: dict[str, list[float]] = {"step": [], "forward": [], "backward": [], "optimizer": []}
    for m in marks:
        cols["step"].append(clock.seconds(m["start"], m["end"]))
        if "bwd0" in m and "opt1" in m:
            cols["forward"].append(clock.seconds(m["start"], m["bwd0"]))
            cols["backward"].append(clock.seconds(m["bwd0"], m["bwd1"]))
            cols["optimizer"].append(clock.seconds(m["opt0"], m["opt1"]))
    return {k: statistics.median(v) for k, v in cols.items() if v}


class PowerclipModel:
    """One variant's engine with a resident batch; ``window(n)`` runs n train_steps and times them."""

    def __init__(self, s: dict[str, Any], v: Variant, work: Path, clock: Clock) -> None:
        import torch

        from powerclip.data.batch import Batch
        from powerclip.data.device import to_device
        from powerclip.data.geometry import model_geometry
        from powerclip.train.build_model import build_model
        from powerclip.train.dist_env import init_distributed
        from powerclip.train.engine import PRECISION_DTYPES, build_engine
        from powerclip.train.loop import seed_all

        self.cfg = run_config(s, v, str(work / "model_run"), 10**6)
        env = init_distributed()
        seed_all(0)
        self.engine, _ = build_engine(self.cfg, build_model(self.cfg, env), env.world_size)
        self.engine.train()
        geo = model_geometry(self.cfg)
        b, size, length = s["batch"], geo.image_size, self.cfg.data.context_length
        gen = torch.Generator().manual_seed(0)
        batch = Batch(keys=[str(i) for i in range(b)],
                      images=torch.randint(0, 256, (b, 3, size, size), generator=gen, dtype=torch.uint8),
                      text=torch.randint(1, 49407, (b, length), generator=gen))
        self.micro = [to_device(batch, env.device, PRECISION_DTYPES[self.cfg.train.precision], geo.mean, geo.std)]
        self.timer = PhaseTimer(self.engine, clock)
        self.clock = clock

    def one_step(self) -> None:
        from powerclip.train.loop import train_step

        train_step(self.engine, self.micro, self.cfg)

    def window(self, warm: int, n: int) -> dict[str, float]:
        for _ in range(warm):
            self.one_step()
        marks = []
        for _ in range(n):
            self.timer.begin()
            self.one_step()
            marks.append(dict(self.timer.end()))
        return phases(self.clock, marks)


class OpenClipModel:
    """open_clip_train's step on the same model and batch: fp32 weights, autocast (amp_bf16 on a GPU),
    torch.optim.AdamW with its defaults (foreach on CUDA), ClipLoss, TF32 and cudnn.benchmark on."""

    def __init__(self, s: dict[str, Any], work: Path, clock: Clock) -> None:
        import open_clip
        import torch
        from open_clip_train.precision import get_autocast

        self.device = torch.device(s["device"])
        if s.get("model_name"):
            self.model = open_clip.create_model(s["model_name"], device=self.device, output_dict=True)
        else:
            work.mkdir(parents=True, exist_ok=True)
            cfg_path = work / "bench-breakdown-model.json"
            cfg_path.write_text(json.dumps(s["model_cfg"]))
            open_clip.add_model_config(str(cfg_path))
            self.model = open_clip.create_model("bench-breakdown-model", device=self.device, output_dict=True)
        self.model.train()
        size = self.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        gen = torch.Generator().manual_seed(0)
        b = s["batch"]
        self.images = torch.randn(b, 3, size, size, generator=gen).to(self.device)
        self.text = torch.randint(1, 49407, (b, self.model.context_length), generator=gen).to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.2)
        self.loss = open_clip.ClipLoss()
        # open_clip_train's "amp_bf16" on a GPU; fp32 on CPU, where its autocast is a slow path
        self.autocast = get_autocast("amp_bf16" if self.device.type == "cuda" else "fp32",
                                     device_type=self.device.type)
        self.clock = clock

    @contextlib.contextmanager
    def _flags(self):
        import torch

        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        try:
            yield
        finally:
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark) = old

    def _step(self, marks: dict[str, Any] | None) -> None:
        mark = self.clock.mark if marks is not None else (lambda: None)
        m = {"start": mark()}
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.model(self.images, self.text)
            total = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        m["bwd0"] = mark()
        total.backward()
        m["bwd1"] = m["opt0"] = mark()
        self.opt.step()
        m["opt1"] = m["end"] = mark()
        if marks is not None:
            marks.update(m)

    def window(self, warm: int, n: int) -> dict[str, float]:
        with self._flags():
            for _ in range(warm):
                self._step(None)
            marks = []
            for _ in range(n):
                m: dict[str, Any] = {}
                self._step(m)
                marks.append(m)
            return phases(self.clock, marks)


def profile_step(runner, out_dir: Path, cuda: bool) -> list[str]:
    """One step of ``runner`` under torch.profiler: the trace file and the top-kernels table."""
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        runner.one_step()
        if cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(out_dir / "profile_step.json"))
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    (out_dir / "profile_top_kernels.txt").write_text(table + "\n")
    return table.splitlines()


# --------------------------------------------------------------------------------- sections
def section_model(s: dict[str, Any], work: Path, out_dir: Path, deadline: float, log) -> dict[str, Any]:
    import torch

    from powerclip.train.loop import seed_all

    torch.set_num_threads(s["threads"])
    cuda = s["device"] == "cuda"
    clock = Clock(cuda)
    runners: dict[str, Any] = {}
    errors: dict[str, str] = {}
    today = today_recipe()
    vs = variants(today, s.get("variants_extra"))
    for v in vs:  # build every engine first (compile happens on its first steps, in the warm-up)
        if time.perf_counter() > deadline:
            errors[v.name] = "not run: over the time budget"
            continue
        try:
            seed_all(0)
            runners[v.name] = PowerclipModel(s, v, work / f"v{len(runners)}", clock)
        except Exception as e:  # noqa: BLE001 - reported in the table; the others still run
            traceback.print_exc()
            errors[v.name] = f"{type(e).__name__}: {str(e)[:160]}"
    try:  # timed right after today's recipe: the comparison that matters most comes first
        oc = OpenClipModel(s, work, clock)
        runners = dict([*list(runners.items())[:1], ("open_clip_train step", oc), *list(runners.items())[1:]])
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        errors["open_clip_train step"] = f"{type(e).__name__}: {str(e)[:160]}"
    res: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for r in range(s["repeats"]):
        for name, runner in runners.items():
            if time.perf_counter() > deadline:
                errors.setdefault(name, f"repeat {r} not run: over the time budget")
                continue
            try:
                win = runner.window(s["warmup"] if r == 0 else 1, s["steps"])
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                errors[name] = f"{type(e).__name__}: {str(e)[:160]}"
                continue
            res[name].append(win)
            log(f"[model] repeat {r} {name}: step {win['step'] * 1e3:.1f} ms"
                + "".join(f", {k} {win[k] * 1e3:.1f} ms" for k in ("forward", "backward", "optimizer") if k in win))
    profile: list[str] = []
    first = vs[0].name
    if first in runners and time.perf_counter() < deadline:
        try:
            profile = profile_step(runners[first], out_dir, cuda)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            errors["profile"] = f"{type(e).__name__}: {str(e)[:160]}"
    flops = None
    try:
        from tools.bench_train import model_flops_per_sample

        cfg = run_config(s, vs[0], str(work / "flops"), 1)
        geo_size = runners[first].micro[0].images.shape[-1] if first in runners else 224
        flops = model_flops_per_sample(cfg, {"device": s["device"], "batch_size": s["batch"],
                                             "image_size": geo_size, "context_length": cfg.data.context_length})
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        errors["flops"] = f"{type(e).__name__}: {str(e)[:160]}"
    best = {name: min(w, key=lambda x: x["step"]) for name, w in res.items() if w}
    runners.clear()  # free the device for the next sections
    if cuda:
        torch.cuda.empty_cache()
    return {"best": best, "runs": res, "errors": errors, "variants": [v.__dict__ for v in vs],
            "flops_per_sample": flops, "profile_head": profile[:16], "today": first}


def section_loader(s: dict[str, Any], shards: str, log) -> dict[str, Any]:
    from tools.bench_loader import compare_loaders

    model, toy = s.get("model_name"), None
    if model is None:  # the toy model's image size through an open_clip config of that size
        model, toy = _register_toy_model(s)
    draft = "powerclip_draft" if _preset_draft() else "powerclip"
    try:
        res = compare_loaders(shards, model, s["batch"], s["workers"], s["loader_batches"], s["repeats"],
                              names=("open_clip", "powerclip", "powerclip_draft"), log=log)
    finally:
        if toy is not None:  # the bench's own file, read by open_clip when registered: not left in /tmp
            toy.unlink(missing_ok=True)
    return {"loaders": res, "preset_loader": draft, "workers": s["workers"],
            "device_decode": device_decode_rate(shards, s, log)}


def device_decode_rate(shards: str, s: dict[str, Any], log) -> dict[str, Any]:
    """samples/s of ``data.jpeg_device.decode_crops`` on the bench's device (nvJPEG on a GPU) for one
    batch of the photo shards, whole image resized to the model's size: what moving the decode off the
    loader workers would offer."""
    import io
    import tarfile

    import torch
    from PIL import Image

    from powerclip.data.jpeg_device import decode_crops
    from powerclip.data.loader import expand_shards

    jpegs: list[bytes] = []
    for url in expand_shards(shards):
        with tarfile.open(url) as tf:
            jpegs += [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
        if len(jpegs) >= s["batch"]:
            break
    jpegs = (jpegs * (s["batch"] // max(1, len(jpegs)) + 1))[:s["batch"]]
    crops = []
    for data in jpegs:
        with Image.open(io.BytesIO(data)) as img:
            crops.append((0, 0, img.size[1], img.size[0]))
    size = 224 if s.get("model_name") else s["model_cfg"]["vision_cfg"]["image_size"]
    clock = Clock(s["device"] == "cuda")
    decode_crops(jpegs, crops, size, s["device"])  # warm-up (nvJPEG handles, kernels)
    times = []
    for _ in range(s["repeats"] + 1):
        a = clock.mark()
        decode_crops(jpegs, crops, size, s["device"])
        b = clock.mark()
        clock.settle()
        times.append(clock.seconds(a, b))
    best = min(times)
    log(f"[loader] decode_crops on {s['device']}: {len(jpegs) / best:.1f} samples/s")
    if s["device"] == "cuda":
        torch.cuda.empty_cache()
    return {"device": s["device"], "sps": len(jpegs) / best, "batch": len(jpegs)}


def _preset_draft() -> bool:
    from powerclip.config import load_config

    return bool(load_config(str(PRESET)).data.jpeg_draft)


def _register_toy_model(s: dict[str, Any]) -> tuple[str, Path]:
    """The toy model config under a name open_clip (and powerclip's model.name) resolves, and its
    file (the caller deletes it when done)."""
    import open_clip

    path = Path(tempfile.gettempdir()) / f"bench-breakdown-toy-{os.getpid()}.json"
    path.write_text(json.dumps(s["model_cfg"]))
    open_clip.add_model_config(str(path))
    return path.stem, path


# ------------------------------------------------------------------------------ e2e children
def child_e2e_powerclip(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from powerclip.data import build_loader
    from powerclip.train.loop import train
    from tools.bench_train import TimedSource

    torch.set_num_threads(spec["threads"])
    srcs: list[TimedSource] = []

    def factory(cfg, rank, world_size, state=None):
        src = TimedSource(build_loader(cfg, rank, world_size, state=state))
        srcs.append(src)
        return src

    s = spec
    cfg = run_config(s, Variant("e2e", spec["overrides"]), str(Path(spec["work"]) / "run"),
                     s["e2e_steps"] + s["e2e_warmup"] + 1,
                     (f"data.sources=[{{shards: '{spec['shards']}'}}]", f"data.workers={s['workers']}",
                      "data.shuffle_buffer=256"))
    train(cfg, build_loader=factory)
    return {"times": srcs[0].times}


def child_e2e_openclip(spec: dict[str, Any]) -> dict[str, Any]:
    import functools

    import open_clip
    import open_clip_train.data as ocd
    import torch
    from open_clip_train.main import main as oc_main
    from webdataset.tariterators import tar_file_expander

    from tools.bench_train import TimedSource

    torch.set_num_threads(spec["threads"])
    # see tools/bench_loader.open_clip_loader: open_clip_train's reader and webdataset 1.0's shard-end marker
    ocd.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    s, work = spec, Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    name = s.get("model_name")
    if not name:
        name = "bench-breakdown-model"
        (work / f"{name}.json").write_text(json.dumps(s["model_cfg"]))
        open_clip.add_model_config(str(work / f"{name}.json"))
    srcs: list[TimedSource] = []
    build = ocd.get_wds_dataset

    def timed(*a, **k):
        info = build(*a, **k)
        inner = info.dataloader
        src = TimedSource(inner, label="open_clip_train step")
        src.num_batches, src.num_samples = inner.num_batches, inner.num_samples
        info.dataloader = src
        srcs.append(src)
        return info

    ocd.get_wds_dataset = timed
    b, steps = s["batch"], s["e2e_steps"] + s["e2e_warmup"] + 1
    precision = "amp_bf16" if s["device"] == "cuda" else "fp32"
    oc_main(["--model", name, "--train-data", spec["shards"], "--dataset-type", "webdataset", "--dataset-resampled",
             "--train-num-samples", str(b * steps), "--batch-size", str(b), "--workers", str(s["workers"]),
             "--device", s["device"], "--precision", precision, "--log-every-n-steps", "1000000",
             "--logs", str(work / "oc_logs"), "--name", "oc", "--save-frequency", "0", "--report-to", "",
             "--epochs", "1", "--lr", "1e-4", "--wd", "0.2", "--warmup", "2", "--seed", "0"])
    if not srcs:
        raise RuntimeError("open_clip_train did not build its loader through get_wds_dataset")
    return {"times": srcs[0].times}


CHILDREN = {"e2e_powerclip": child_e2e_powerclip, "e2e_openclip": child_e2e_openclip}


def run_child(kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``--child kind`` in a fresh process; its result is a JSON file it writes."""
    result = Path(spec["work"]) / "result.json"
    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a fresh single-process group in the child
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec),
                           "--result", str(result)], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{kind} failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return json.loads(result.read_text())


def section_e2e(s: dict[str, Any], work: Path, shards: str, deadline: float, log,
                model: dict[str, Any] | None = None) -> dict[str, Any]:
    """open_clip_train and powerclip's preset recipe end to end; also the fastest model-only variant
    when it is not today's recipe (a recipe worth switching the presets to)."""
    kinds = {"open_clip_train": ("e2e_openclip", []), "powerclip today": ("e2e_powerclip", [])}
    if model and model.get("best") and s["e2e_fastest"]:
        pc = {k: v for k, v in model["best"].items() if k != "open_clip_train step"}
        fastest = min(pc, key=lambda k: pc[k]["step"]) if pc else None
        if fastest and fastest != model["today"]:
            over = next(v["overrides"] for v in model["variants"] if v["name"] == fastest)
            kinds[f"powerclip {fastest}"] = ("e2e_powerclip", over)
    runs: dict[str, list[float]] = {name: [] for name in kinds}
    errors: dict[str, str] = {}
    n = 0
    for r in range(s["e2e_repeats"]):
        for name, (kind, overrides) in kinds.items():
            left = deadline - time.perf_counter()
            if left < s["e2e_min_s"]:
                errors.setdefault(name, f"repeat {r} not run: over the time budget")
                continue
            n += 1
            spec = {**{k: v for k, v in s.items() if k != "variants_extra"}, "work": str(work / f"e2e_{n}"),
                    "shards": shards, "overrides": overrides}
            try:
                times = run_child(kind, spec, timeout=max(30.0, min(left, 1800.0)))["times"]
            except Exception as e:  # noqa: BLE001 - reported in the table
                errors[name] = f"{type(e).__name__}: {str(e)[-300:]}"
                log(f"[e2e] {name} failed: {errors[name]}")
                continue
            steps = [b - a for a, b in zip(times, times[1:])][s["e2e_warmup"]:]
            med = statistics.median(steps) if steps else float("nan")
            runs[name].append(med)
            log(f"[e2e] repeat {r} {name}: {med * 1e3:.1f} ms/step over {len(steps)} steps, "
                f"{s['batch'] / med:.1f} samples/s")
    return {"best_s": {k: min(v) for k, v in runs.items() if v}, "runs": runs, "errors": errors}


# ------------------------------------------------------------------------------------ report
def machine_info(device: str) -> dict[str, str]:
    import torch

    from tools.bench_loader import cpu_model

    info = {"cpu": cpu_model(), "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(), "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU"}
    for mod in ("deepspeed", "open_clip"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - shown in the table
            info[mod] = f"missing ({type(e).__name__})"
    return info


def peak_tflops(device_name: str) -> float | None:
    for frag, peak in PEAK_BF16_TFLOPS.items():
        if frag in device_name:
            return peak
    return None


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def render(s: dict[str, Any], info: dict[str, str], res: dict[str, Any]) -> str:
    b = s["batch"]
    model = s.get("model_name") or "toy ViT (--cpu-smoke)"
    timing = "CUDA events" if s["device"] == "cuda" else "wall clock (CPU)"
    lines = [f"### Where the step time goes, {info['date']}: {info['device']}", "",
             f"`tools/bench_breakdown.py{' --cpu-smoke' if s['smoke'] else ''}`: {model}, batch {b}, "
             f"{s['steps']} timed steps after {s['warmup']} warm-up, {s['repeats']} interleaved repeats (best "
             f"kept), {timing}; CPU {info['cpu']}, {info['cores']} cores, load {info['load']} at start; torch "
             f"{info['torch']}, deepspeed {info['deepspeed']}, open_clip {info['open_clip']}.", ""]
    if s["smoke"]:
        lines += ["**CPU smoke run: toy sizes, the figures only show that every path runs.**", ""]
    m = res.get("model")
    if m:
        flops = m.get("flops_per_sample")
        peak = peak_tflops(info["device"])
        lines += ["| model only (resident batch) | step ms | forward ms | backward ms | optimizer ms | samples/s | "
                  "MFU |", "|---|---|---|---|---|---|---|"]
        for name, w in m["best"].items():
            mfu = f"{flops * b / w['step'] / (peak * 1e12):.1%}" if flops and peak else "-"
            lines.append(f"| {name} | {_ms(w['step'])} | {_ms(w.get('forward'))} | {_ms(w.get('backward'))} | "
                         f"{_ms(w.get('optimizer'))} | {b / w['step']:.1f} | {mfu} |")
        for name, err in m["errors"].items():
            lines.append(f"| {name} | {err.replace('|', '/')} | | | | | |")
        if flops:
            lines += ["", f"Model FLOPs per sample (forward + backward, FlopCounterMode): {flops / 1e9:.2f} GFLOP"
                      + (f"; MFU against the datasheet's {peak:g} TFLOP/s dense bf16." if peak else ".")]
        lines.append("")
    ld = res.get("loader")
    if ld:
        lines += [f"| loader only, {ld['workers']} worker(s), batch {b}, photo-like JPEGs 400-1,024 px | samples/s "
                  "| samples per worker CPU-second | main-process ms CPU per sample |", "|---|---|---|---|"]
        for name, r in ld["loaders"].items():
            tag = " (the preset's setting)" if name == ld["preset_loader"] else ""
            lines.append(f"| {name}{tag} | {r['sps']:.1f} | {1 / r['worker_cpu']:.1f} | {r['main_cpu'] * 1e3:.2f} |")
        oc = ld["loaders"].get("open_clip")
        pc = ld["loaders"].get(ld["preset_loader"])
        if oc and pc:
            lines.append(f"| per-core ratio powerclip ({ld['preset_loader']}) / open_clip | "
                         f"**{oc['worker_cpu'] / pc['worker_cpu']:.3f}** | target >= 1.0 | |")
        dd = ld.get("device_decode")
        if dd:
            lines.append(f"| batched JPEG decode + resize on the {dd['device']} (data.jpeg_device.decode_crops, "
                         f"batch {dd['batch']}) | {dd['sps']:.1f} | | |")
        if m and m["best"]:
            fastest = min(m["best"].values(), key=lambda w: w["step"])
            lines.append(f"| samples/s the fastest model-only variant consumes | {b / fastest['step']:.1f} | | |")
        lines.append("")
    e = res.get("e2e")
    if e:
        lines += ["| end to end, real loader on the photo shards | ms/step (median) | samples/s |", "|---|---|---|"]
        for name, t in e["best_s"].items():
            lines.append(f"| {name} | {t * 1e3:.1f} | {b / t:.1f} |")
        oc = e["best_s"].get("open_clip_train")
        for name, t in e["best_s"].items():
            if oc and name != "open_clip_train":
                lines.append(f"| {name} / open_clip_train throughput | **{oc / t:.3f}** | target >= 1.1 on a GPU |")
        for name, err in e["errors"].items():
            lines.append(f"| {name} | {err.replace('|', '/')[:300]} | |")
        lines.append("")
    for name, err in res.get("section_errors", {}).items():
        lines += [f"Section {name} failed: {err}", ""]
    if m and m.get("profile_head"):
        lines += [f"torch.profiler, one step of {m['today']} (full table: profile_top_kernels.txt, trace: "
                  "profile_step.json):", "", "```", *m["profile_head"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU: every code path, figures meaningless")
    ap.add_argument("--sections", default="model,loader,e2e", help="comma list of model, loader, e2e")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget; what no longer fits is skipped and reported (default 480 s on a GPU)")
    ap.add_argument("--variant", action="append", type=parse_variant, default=[],
                    help="extra model-only variant NAME=key=value[,key=value...] (config overrides)")
    ap.add_argument("--out-dir", default=None, help="results folder (default $OUT, else runs/bench_breakdown)")
    ap.add_argument("--work", default=None, help="scratch folder (default a temp dir)")
    ap.add_argument("--shards", default=None, help="photo-like shards to reuse (default: generated)")
    ap.add_argument("--benchmarks", default=None,
                    help="markdown file the table is appended to (default: BENCHMARKS.md on a GPU, none for "
                         "--cpu-smoke; '' for none)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        from powerclip.atomic import write_json_atomic

        write_json_atomic(Path(a.result), CHILDREN[a.child](json.loads(a.spec)), indent=None)
        return 0
    sections = [x.strip() for x in a.sections.split(",") if x.strip()]
    unknown = set(sections) - {"model", "loader", "e2e"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from model,loader,e2e")
    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        print("bench_breakdown: no CUDA device (use --cpu-smoke for the CPU smoke run)", file=sys.stderr)
        return 2
    s = {**sizes(a.cpu_smoke), "variants_extra": a.variant}
    out_dir = Path(a.out_dir or os.environ.get("OUT") or ROOT / "runs" / "bench_breakdown")
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = a.budget_s if a.budget_s is not None else (float("inf") if a.cpu_smoke else 480.0)
    t0 = time.perf_counter()
    deadline = t0 + budget
    info = machine_info(s["device"])

    def log(msg: str) -> None:
        print(msg, flush=True)

    res: dict[str, Any] = {"section_errors": {}}
    with tempfile.TemporaryDirectory(prefix="bench_breakdown_") as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = a.shards
        if shards is None and {"loader", "e2e"} & set(sections):
            from tools.bench_shards import make_photo_shards

            shards = make_photo_shards(work / "photo", s["photo"]["shards"], s["photo"]["per_shard"],
                                       processes=max(1, (os.cpu_count() or 1)))
            log(f"photo-like shards: {shards} ({time.perf_counter() - t0:.0f} s)")
        for name in ("model", "loader", "e2e"):
            if name not in sections:
                continue
            if time.perf_counter() > deadline:
                res["section_errors"][name] = "not run: over the time budget"
                continue
            try:
                if name == "model":
                    res["model"] = section_model(s, work / "model", out_dir, deadline, log)
                elif name == "loader":
                    res["loader"] = section_loader(s, shards, log)
                else:
                    res["e2e"] = section_e2e(s, work / "e2e", shards, deadline, log, res.get("model"))
            except Exception as e:  # noqa: BLE001 - the table says which section failed and why
                traceback.print_exc()
                res["section_errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            (out_dir / "bench_breakdown.md").write_text(render(s, info, res))  # a cut-short run keeps its rows
    res["seconds"] = time.perf_counter() - t0
    table = render(s, info, res)
    (out_dir / "bench_breakdown.md").write_text(table)
    (out_dir / "bench_breakdown.json").write_text(json.dumps({"info": info, "sizes": {k: v for k, v in s.items() if k != "variants_extra"}, **res},
                                                             indent=1, default=str))
    print(table, flush=True)
    benchmarks = a.benchmarks if a.benchmarks is not None else ("" if a.cpu_smoke else str(ROOT / "BENCHMARKS.md"))
    if benchmarks:
        from tools.gpu_check import append_to_benchmarks

        append_to_benchmarks(Path(benchmarks), table)
    failed = list(res["section_errors"]) + [f"model:{k}" for k in (res.get("model") or {}).get("errors", {})]
    failed += [f"e2e:{k}" for k in (res.get("e2e") or {}).get("errors", {})]
    print(f"bench_breakdown: {res['seconds']:.0f} s" + (f"; not measured: {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
