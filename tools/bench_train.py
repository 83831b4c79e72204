#!/usr/bin/env python
"""Training performance of powerclip next to open_clip's own trainer, in one run: BENCHMARKS.md.

    python tools/bench_train.py            # full bench (what BENCHMARKS.md holds)
    python tools/bench_train.py --quick    # tiny sizes, a smoke run
    python tools/bench_train.py --profile  # + torch.profiler top ops of powerclip's CLIP-only step
    python tools/bench_train.py --device cuda --model-name ViT-B-16 --batch-size 256 --precision bf16 \
        --term-batch 128 --peak-tflops 989 --threads 8 --workers 12 --parts 1,2 --no-shards --no-stock
                                           # on one GPU (what tools/gpu_check.py runs); part 3 and the
                                           # shard run of part 1 need 2 ranks, i.e. 2 GPUs

Sections (``--parts``, default all):

1. CLIP-only step throughput: ``open_clip_train`` (single process, ``--dataset-type synthetic``) against
   ``powerclip.train.loop.train`` on the SAME model config, batch, precision, thread count and optimiser
   (AdamW; DeepSpeed ZeRO-0 for the fair comparison). Both read open_clip's ``SyntheticDataset`` (one
   PIL image transformed per sample + one caption tokenised) through a 1-worker DataLoader, so data
   costs both the same. Step time is wall time between consecutive batches (open_clip's "Batch (t)"
   definition); warm-up steps are skipped, the median step of each run is kept, and the best run of
   each trainer (runs are interleaved) is compared, because other processes add noise on a shared
   machine. Both trainers are timed the same way, at the hand-over of each batch from their DataLoader
   (open_clip's is wrapped; its own log agrees), with wall time AND the main process's CPU time, which
   other processes on a shared machine barely disturb. Also: powerclip end to end on real synthetic
   shards, 2 ranks ZeRO-2, real data loader.
2. Overhead of each compositional term over the CLIP-only step (one process, batches materialised
   from the real loader once, so the loader is not in the figure; every config reads only the fields
   it needs, e.g. CLIP-only never encodes negatives).
3. ZeRO 0/1/2/3 on 2 ranks: the optimiser-state bytes each rank holds (read from the AdamW state
   tensors inside DeepSpeed's optimiser: what ZeRO shards) and the process peak RSS per rank.
4. Data loading samples/s per worker: ``tools/bench_loader.py`` (run as is, its result line parsed).

Every measurement runs in a fresh subprocess (``--child``), so peak memory and start-up belong to it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL_NAME = "powerclip-bench"  # the name open_clip registers our model config under

# Sizes. FULL: large enough that step time dominates the overheads, small enough for 2 CPU cores.
FULL = dict(width=256, layers=4, image_size=64, patch_size=8, context_length=32, embed_dim=256,
            batch_size=64, steps=14, warmup=4, repeats=2, shard_batch=32, shard_steps=12,
            term_batch=32, term_steps=8, term_warmup=2, zero_batch=16, loader_samples=256)
QUICK = dict(width=64, layers=2, image_size=32, patch_size=8, context_length=32, embed_dim=64,
             batch_size=8, steps=5, warmup=2, repeats=1, shard_batch=4, shard_steps=4,
             term_batch=8, term_steps=4, term_warmup=1, zero_batch=4, loader_samples=32)


def bench_terms() -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """Part 2's configs: the CLIP-only baseline, then every way of switching on each registered loss
    term (powerclip.losses.registry), by name -> (config overrides, batch fields it reads)."""
    from powerclip.losses.composer import all_terms

    out: dict[str, tuple[list[str], tuple[str, ...]]] = {"clip": ([], ())}
    for term in all_terms():
        out.update({name: (overrides, term.batch_fields) for name, overrides in term.variants().items()})
    return out


ALWAYS_FIELDS = ("keys", "images", "text", "token_valid", "meta")
# powerclip's two CPU-step settings that open_clip_train lacks, turned off for a like-for-like step:
# torch's per-parameter AdamW loop (what open_clip_train runs) and glibc's default trimming
STOCK = ("optim.fused=false", "train.keep_freed_host_memory=false")
_CHILD_IDS = itertools.count(1)
GPU_CHECK_HEADING = "## GPU check runs"  # tools/gpu_check.py appends below it; kept on rewrite


# ------------------------------------------------------------------------------------ helpers
def model_cfg(s: dict[str, Any]) -> dict[str, Any]:
    """The open_clip model_cfg both trainers build (a ViT CLIP of the requested size)."""
    w, layers = s["width"], s["layers"]
    return {"embed_dim": s["embed_dim"],
            "vision_cfg": {"image_size": s["image_size"], "layers": layers, "width": w,
                           "patch_size": s["patch_size"], "head_width": 64, "mlp_ratio": 4.0},
            "text_cfg": {"context_length": s["context_length"], "vocab_size": 49408, "width": w,
                         "heads": max(1, w // 64), "layers": layers, "mlp_ratio": 4.0}}


def _model_overrides(s: dict[str, Any]) -> list[str]:
    if s.get("model_name"):
        return [f"model.name={s['model_name']}"]
    return [f"model.config={json.dumps(model_cfg(s))}"]


def base_overrides(s: dict[str, Any], run_dir: str, steps: int, batch: int, zero: int) -> list[str]:
    """powerclip config matching the open_clip run: AdamW, no clipping, no checkpoints/eval/logging."""
    # half weights at ZeRO-0 are refused (DeepSpeed's per-tensor optimiser wrapper): there the run uses
    # the amp mode, which is also open_clip_train's own recipe (fp32 weights, autocast)
    precision = s["precision"] if s["precision"] == "fp32" or zero > 0 else f"amp_{s['precision']}"
    return [*_model_overrides(s), f"data.context_length={s['context_length']}", f"data.batch_size={batch}",
            f"data.workers={s.get('workers', 1)}", f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.zero_stage={zero}",
            f"train.precision={precision}", f"train.log_every={steps}", "optim.lr=1e-3",
            "optim.weight_decay=0.1", "optim.warmup_steps=2", "optim.grad_clip=0", "checkpoint.every_steps=0",
            "checkpoint.every_minutes=0"]


def machine() -> dict[str, str]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(), "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for mod in ("deepspeed", "open_clip"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version string is informative only
            info[mod] = "?"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _pythonpath() -> str:
    """This checkout first, then whatever the caller's PYTHONPATH held (packages installed elsewhere)."""
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def run_child(kind: str, spec: dict[str, Any], ranks: int = 1, timeout: float = 3600) -> list[dict]:
    """Run ``--child kind`` in a fresh process (``ranks`` > 1: under torchrun); its result lines."""
    # ranks share the cores; every child gets its own scratch folder (open_clip refuses an existing
    # experiment folder and powerclip would resume a finished run)
    spec = {**spec, "threads": max(1, spec["threads"] // ranks),
            "work": str(Path(spec["work"]) / f"{kind}_{next(_CHILD_IDS)}")}
    # results travel as files, one per emit: 2 ranks printing to one pipe can interleave their lines
    result_dir = Path(spec["work"]) / "results"
    result_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=_pythonpath(),
               BENCH_RESULT_DIR=str(result_dir))
    me = [str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]
    if ranks > 1:
        from powerclip.train.dist_env import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), "--log-dir", str(Path(spec["work"]) / "torchrun-logs"), *me]
    else:
        cmd = [sys.executable, *me]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    results = [json.loads(f.read_text()) for f in sorted(result_dir.glob("*.json"))]
    if out.returncode != 0 or not results:
        raise RuntimeError(f"bench child {kind!r} failed (exit {out.returncode}):\n"
                           f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    for line in out.stdout.splitlines():
        if line.startswith("PROFILE "):
            print(line[len("PROFILE "):])
    return results


def emit(obj: dict[str, Any]) -> None:
    """Hand a child's result to ``run_child``: a file written atomically (tmp + rename)."""
    from powerclip.atomic import write_json_atomic

    write_json_atomic(Path(os.environ["BENCH_RESULT_DIR"]) / f"{os.getpid()}_{time.monotonic_ns()}.json", obj,
                      indent=None)


def step_stats(times: list[float], warmup: int) -> dict[str, float]:
    """Median/min of the per-step seconds after ``warmup`` steps."""
    kept = times[warmup:] or times
    return {"median_s": statistics.median(kept), "min_s": min(kept), "n": len(kept)}


class TimedSource:
    """Wraps an iterable of Batch; records the wall time at which each batch is handed over.

    The interval between two hand-overs is one training step plus the wait for the next batch:
    exactly open_clip's "Batch (t)". Optionally drives torch.profiler over a window of steps.
    """

    def __init__(self, inner, profile: tuple[int, int] | None = None, device: str = "cpu",
                 label: str = "powerclip CLIP-only step") -> None:
        self.inner = inner
        self.label = label
        self.times: list[float] = []
        self.cpu: list[float] = []  # this process's CPU seconds (all its threads) at each hand-over
        self.profile = profile
        self.device = device
        self._prof = None

    def __iter__(self):
        for batch in self.inner:
            self._maybe_profile(len(self.times))
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            yield batch

    def _maybe_profile(self, i: int) -> None:
        if self.profile is None:
            return
        import torch

        start, n = self.profile
        if i == start:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
        elif i == start + n and self._prof is not None:
            self._prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if self.device == "cuda" else "self_cpu_time_total"
            table = self._prof.key_averages().table(sort_by=key, row_limit=20)
            print("\n".join("PROFILE " + line for line in
                            [f"{self.label}, top ops over {n} steps:", *table.splitlines()]),
                  flush=True)
            self._prof = None

    def state_dict(self) -> dict:
        return {}

    def counters(self) -> dict:
        return {}


def _intervals(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# ------------------------------------------------------------------------------------- children
def child_openclip(s: dict[str, Any]) -> None:
    """open_clip_train.main on its synthetic dataset; per-step seconds parsed from its log."""
    import torch

    torch.set_num_threads(s["threads"])
    import open_clip
    from open_clip_train.main import main as oc_main

    work = Path(s["work"])
    name = s.get("model_name")
    if not name:
        name = MODEL_NAME
        cfg_path = work / f"{MODEL_NAME}.json"
        cfg_path.write_text(json.dumps(model_cfg(s)))
        open_clip.add_model_config(str(cfg_path))
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[s["precision"]]
    logs = work / "oc_logs"
    b, steps = s["batch_size"], s["steps"]
    # time open_clip exactly as powerclip: wrap the DataLoader its synthetic dataset builder returns
    import open_clip_train.data as ocd

    src: list[TimedSource] = []
    build_synthetic = ocd.get_synthetic_dataset

    def timed_synthetic(*args, **kwargs):
        info = build_synthetic(*args, **kwargs)
        inner = info.dataloader
        prof = (s["warmup"], 3) if s.get("profile") else None
        timed = TimedSource(inner, prof, s["device"], label="open_clip_train step")
        timed.num_batches, timed.num_samples = inner.num_batches, inner.num_samples
        info.dataloader = timed
        src.append(timed)
        return info

    ocd.get_synthetic_dataset = timed_synthetic
    oc_main(["--model", name, "--dataset-type", "synthetic", "--train-num-samples", str(b * steps),
             "--batch-size", str(b), "--workers", str(s.get("workers", 1)), "--device", s["device"], "--precision", precision,
             "--log-every-n-steps", "1", "--logs", str(logs), "--name", "oc", "--save-frequency", "0",
             "--report-to", "", "--epochs", "1", "--lr", "1e-3", "--wd", "0.1", "--warmup", "2",
             "--seed", "0"])
    text = (logs / "oc" / "out.log").read_text()
    if not src:
        raise RuntimeError("open_clip_train did not build its synthetic dataset through get_synthetic_dataset")
    # "Batch (t): 0.123, 520.31/s, ..." -- samples/s has 6 significant digits, the time only 3 decimals
    sps = [float(m) for m in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.eE+]+)/s,", text)]
    if not sps:
        raise RuntimeError(f"no 'Batch (t)' lines in open_clip's log:\n{text[-2000:]}")
    # the wall-time intervals between batch hand-overs equal its "Batch (t)"; both are reported
    emit({"times": _intervals(src[0].times), "cpu": _intervals(src[0].cpu), "log_times": [b / x for x in sps]})


def _synthetic_loader_factory(s: dict[str, Any], sources: list):
    """powerclip loader factory over open_clip's SyntheticDataset (the same per-sample cost)."""

    def build(cfg, rank, world_size, state=None):
        import open_clip
        import torch
        from open_clip_train.data import SyntheticDataset

        from powerclip.data.batch import Batch
        from powerclip.data.geometry import model_geometry

        geo = model_geometry(cfg)
        transform = open_clip.image_transform(geo.image_size, is_train=True, mean=geo.mean, std=geo.std)
        size = geo.image_size if isinstance(geo.image_size, (tuple, list)) else (geo.image_size, geo.image_size)
        tok = open_clip.tokenizer.SimpleTokenizer(context_length=cfg.data.context_length)
        b = cfg.data.batch_size
        ds = SyntheticDataset(transform=transform, image_size=tuple(size), dataset_size=b * (cfg.train.steps + 2),
                              tokenizer=tok)
        dl = torch.utils.data.DataLoader(ds, batch_size=b, shuffle=True, num_workers=s.get("workers", 1),
                                         pin_memory=s["device"] == "cuda", drop_last=True)
        keys = [str(i) for i in range(b)]

        def batches():
            for images, text in dl:
                yield Batch(keys=keys, images=images, text=text)

        prof = (s["warmup"], 3) if s.get("profile") else None
        src = TimedSource(batches(), prof, s["device"])
        sources.append(src)
        return src

    return build


def child_powerclip(s: dict[str, Any]) -> None:
    """powerclip's trainer (ZeRO-0, CLIP loss only) on the in-memory synthetic source."""
    import torch

    torch.set_num_threads(s["threads"])
    from powerclip.config import load_config
    from powerclip.train.loop import train

    sources: list[TimedSource] = []
    cfg = load_config(None, [*base_overrides(s, str(Path(s["work"]) / "pc_run"), s["steps"] + 1,
                                             s["batch_size"], 0), *(() if s.get("tuned", True) else STOCK)])
    flops = model_flops_per_sample(cfg, s) if s.get("flops") else None
    train(cfg, build_loader=_synthetic_loader_factory(s, sources))
    emit({"times": _intervals(sources[0].times), "cpu": _intervals(sources[0].cpu), "flops": flops})


def model_flops_per_sample(cfg, s: dict[str, Any]) -> float:
    """Forward+backward FLOPs of the CLIP-only step per sample (torch's FlopCounterMode: matmuls,
    convolutions, attention), for model FLOPs utilisation = FLOPs/sample x samples/s / peak."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from powerclip.data.batch import Batch
    from powerclip.losses.global_loss import global_loss
    from powerclip.model.factory import create_model

    device = torch.device("cuda" if s["device"] == "cuda" and torch.cuda.is_available() else "cpu")
    b = min(8, s["batch_size"])
    model = create_model(cfg.model).to(device)
    batch = Batch(keys=[str(i) for i in range(b)],
                  images=torch.randn(b, 3, s["image_size"], s["image_size"], device=device),
                  text=torch.randint(1, 49407, (b, s["context_length"]), device=device))
    with FlopCounterMode(display=False) as counter:
        global_loss(model(batch)).backward()
    del model
    return float(counter.get_total_flops()) / b


def child_shards(s: dict[str, Any]) -> None:
    """powerclip end to end: real shards, real loader (1 worker per rank), 2 ranks, ZeRO-2."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(s["threads"])
    from powerclip.config import load_config
    from powerclip.data import build_loader
    from powerclip.train.loop import train

    sources: list[TimedSource] = []

    def factory(cfg, rank, world_size, state=None):
        src = TimedSource(build_loader(cfg, rank, world_size, state=state))
        sources.append(src)
        return src

    cfg = load_config(None, [*base_overrides(s, str(Path(s["work"]) / "shard_run"), s["shard_steps"] + 1,
                                             s["shard_batch"], 2),
                             f"data.sources=[{{shards: '{s['shards']}'}}]", "data.shuffle_buffer=64"])
    train(cfg, build_loader=factory)
    if dist.get_rank() == 0:
        emit({"times": _intervals(sources[0].times), "world": dist.get_world_size()})
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def child_terms(s: dict[str, Any]) -> None:
    """Each term config through train(), interleaved, on batches materialised once from the loader."""
    import dataclasses

    import torch

    torch.set_num_threads(s["threads"])
    from powerclip.config import load_config
    from powerclip.data import build_loader
    from powerclip.train.loop import train

    data = [f"data.sources=[{{shards: '{s['shards']}'}}]", "data.workers=0", "data.num_regions=10",
            "data.max_phrases=16", "data.concepts=true", "data.num_negatives=4", "data.shuffle_buffer=64"]
    b = s["term_batch"]
    cfg0 = load_config(None, [*base_overrides(s, str(Path(s["work"]) / "t0"), 1, b, 0), *data])
    it = iter(build_loader(cfg0, 0, 1))
    pool = [next(it) for _ in range(3)]
    shapes = {"B": b, "M": int(pool[0].region_masks.shape[1]), "K": int(pool[0].phrase_tokens.shape[1]),
              "T": int(pool[0].region_masks.shape[2]), "N": int(pool[0].neg_text.shape[1]),
              "C": int(pool[0].concept_text.shape[0])}
    del it
    steps = s["term_steps"] + 1
    out: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    terms = bench_terms()
    names = [n for n in terms if n in s["terms"]]
    for r in range(s["repeats"]):
        for name in names:
            extra, needs = terms[name]
            keep = set(ALWAYS_FIELDS) | set(needs)

            def strip(batch, keep=keep):
                return dataclasses.replace(batch, **{f.name: None for f in dataclasses.fields(batch)
                                                     if f.name not in keep})

            batches = [strip(x) for x in pool]

            def cycle(batches=batches):
                i = 0
                while True:
                    yield batches[i % len(batches)]
                    i += 1

            src = TimedSource(cycle())
            cfg = load_config(None, [*base_overrides(s, str(Path(s["work"]) / f"t_{name}_{r}"), steps, b, 0),
                                     *data, *extra])
            train(cfg, build_loader=lambda *a, src=src, **k: src)
            med = step_stats(_intervals(src.times), s["term_warmup"])["median_s"]
            cpu_med = step_stats(_intervals(src.cpu), s["term_warmup"])["median_s"]
            out[name] = [*out.get(name, []), med]
            cpu[name] = [*cpu.get(name, []), cpu_med]
            print(f"[terms] {name} run {r}: {med * 1e3:.0f} ms/step, {cpu_med * 1e3:.0f} ms CPU", file=sys.stderr,
                  flush=True)
    emit({"medians": out, "cpu": cpu, "shapes": shapes})


def _inner_optimizer(engine):
    """The torch optimiser DeepSpeed steps (ZeRO 1-3 wrap it; ZeRO-0 fp32 hands it back as is)."""
    import torch

    opt = engine.optimizer
    for _ in range(5):
        if isinstance(opt, torch.optim.Optimizer) and type(opt).__module__.startswith("torch.optim"):
            return opt
        opt = opt.optimizer
    raise RuntimeError(f"cannot find the torch optimiser inside {type(engine.optimizer).__name__}")


def child_zero(s: dict[str, Any]) -> None:
    """One ZeRO stage on this launch's ranks: two real steps, then bytes held per rank."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(s["threads"])
    from powerclip.config import load_config
    from powerclip.data.batch import Batch
    from powerclip.model.factory import create_model
    from powerclip.train.dist_env import init_distributed
    from powerclip.train.engine import PRECISION_DTYPES, build_engine
    from powerclip.train.loop import seed_all, train_step

    cfg = load_config(None, base_overrides(s, str(Path(s["work"]) / "zero_run"), 2, s["zero_batch"],
                                           s["zero_stage"]))
    env = init_distributed()
    seed_all(0)
    model = create_model(cfg.model).to(env.device)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _ = build_engine(cfg, model, env.world_size)
    engine.train()
    b, size = s["zero_batch"], s["image_size"]
    gen = torch.Generator().manual_seed(env.rank)
    batch = Batch(keys=[str(i) for i in range(b)], images=torch.randn(b, 3, size, size, generator=gen),
                  text=torch.randint(1, 49407, (b, s["context_length"]), generator=gen))
    dtype = PRECISION_DTYPES[cfg.train.precision]
    for _ in range(2):
        train_step(engine, [batch.to(env.device, dtype)], cfg)
    opt = _inner_optimizer(engine)
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    # fp32 values the optimiser steps on this rank = the exp_avg elements it holds
    master = sum(st["exp_avg"].numel() for st in opt.state.values() if "exp_avg" in st)
    res = {"rank": env.rank, "stage": s["zero_stage"], "state_mb": state_bytes / 2**20,
           "master_numel": master, "model_numel": n_params,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if env.device.type == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    emit(res)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


CHILDREN = {"openclip": child_openclip, "powerclip": child_powerclip, "shards": child_shards,
            "terms": child_terms, "zero": child_zero}


# --------------------------------------------------------------------------------------- parts
def part_compare(s: dict[str, Any]) -> dict[str, Any]:
    """open_clip_train vs powerclip as shipped, and vs powerclip with the STOCK settings (the optimiser
    implementation and allocator behaviour open_clip_train runs with)."""
    runs: dict[str, Any] = {"oc": [], "pc": [], "pcl": []}
    for r in range(s["repeats"]):  # interleaved: the trainers see the same machine state
        trainers = [("oc", "openclip", True), ("pc", "powerclip", True)]
        if s.get("stock", True):
            trainers.append(("pcl", "powerclip", False))
        for key, kind, tuned in trainers:
            res = run_child(kind, {**s, "profile": False, "tuned": tuned,
                                   "flops": key == "pc" and r == 0})[0]
            if res.get("flops"):
                runs["flops"] = res["flops"]
            runs[key].append({"wall": step_stats(res["times"], s["warmup"])["median_s"],
                              "cpu": step_stats(res["cpu"], s["warmup"])["median_s"]})
        stock = (f", powerclip with stock settings {runs['pcl'][-1]['wall'] * 1e3:.0f} ms/step "
                 f"({runs['pcl'][-1]['cpu'] * 1e3:.0f} ms CPU)") if runs["pcl"] else ""
        print(f"[compare] run {r}: open_clip {runs['oc'][-1]['wall'] * 1e3:.0f} ms/step "
              f"({runs['oc'][-1]['cpu'] * 1e3:.0f} ms CPU), powerclip {runs['pc'][-1]['wall'] * 1e3:.0f} ms/step "
              f"({runs['pc'][-1]['cpu'] * 1e3:.0f} ms CPU){stock}", flush=True)
    if s["profile"]:  # a separate run: the profiler's own cost must not enter the timings above
        for kind in ("openclip", "powerclip"):
            run_child(kind, {**s, "profile": True, "steps": s["warmup"] + 4})
    best = {k: {m: min(x[m] for x in runs[k]) for m in ("wall", "cpu")} for k in ("oc", "pc", "pcl") if runs[k]}
    out = {"flops_per_sample": runs.get("flops"), "oc_sps": s["batch_size"] / best["oc"]["wall"], "pc_sps": s["batch_size"] / best["pc"]["wall"],
           "ratio": best["oc"]["wall"] / best["pc"]["wall"], "cpu_ratio": best["oc"]["cpu"] / best["pc"]["cpu"],
           "oc_cpu_ms": best["oc"]["cpu"] * 1e3, "pc_cpu_ms": best["pc"]["cpu"] * 1e3,
           "oc_runs": [x["wall"] for x in runs["oc"]], "pc_runs": [x["wall"] for x in runs["pc"]],
           "pcl_runs": [x["wall"] for x in runs["pcl"]]}
    if "pcl" in best:
        out.update(loop_ratio=best["oc"]["wall"] / best["pcl"]["wall"],
                   loop_cpu_ratio=best["oc"]["cpu"] / best["pcl"]["cpu"])
    return out


def make_shards(s: dict[str, Any]) -> str:
    from powerclip.data.synthetic import make_synthetic

    root = Path(s["work"]) / "synth"
    if not (root / "manifest.json").exists():
        per = max(64, 2 * s["shard_batch"], 2 * s["term_batch"])
        make_synthetic(root, train_shards=2, val_shards=0, heldout_shards=0, per_shard=per,
                       image_size=s["image_size"])
    return str(root / "train" / "{00000..00001}.tar")


def part_shards(s: dict[str, Any]) -> dict[str, Any]:
    res = run_child("shards", {**s, "shards": make_shards(s)}, ranks=2)[0]
    st = step_stats(res["times"], min(s["warmup"], len(res["times"]) - 1))
    return {"sps": s["shard_batch"] * res["world"] / st["median_s"], "world": res["world"],
            "batch": s["shard_batch"]}


def part_terms(s: dict[str, Any]) -> dict[str, Any]:
    res = run_child("terms", {**s, "shards": make_shards(s), "terms": s.get("terms") or list(bench_terms())})[0]
    best = {k: min(v) for k, v in res["medians"].items()}
    cpu = {k: min(v) for k, v in res["cpu"].items()}
    return {"best_s": best, "shapes": res["shapes"], "cpu_s": cpu,
            "ratio": {k: v / best["clip"] for k, v in best.items()},
            "cpu_ratio": {k: v / cpu["clip"] for k, v in cpu.items()}}


def part_zero(s: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    for stage in s["zero_stages"]:
        res = run_child("zero", {**s, "zero_stage": stage}, ranks=2)
        rows[stage] = {"state_mb": max(r["state_mb"] for r in res),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in res),
                       "master_numel": max(r["master_numel"] for r in res),
                       "model_numel": res[0]["model_numel"],
                       "peak_gpu_mb": max((r.get("peak_gpu_mb", 0.0) for r in res), default=0.0)}
        print(f"[zero] stage {stage}: optimiser state {rows[stage]['state_mb']:.1f} MB/rank, "
              f"peak RSS {rows[stage]['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def part_loader(s: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_loader.py"), "--samples", str(s["loader_samples"]),
           "--part", "floor", "--repeats", "1" if s["quick"] else "5", "--batch-size", str(min(32, s["loader_samples"] // 2))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ, PYTHONPATH=_pythonpath()))
    # its summary lines: "best wall-clock: bare X, pipeline Y samples/s per worker, ratio R" and
    # "best CPU time:   bare X, pipeline Y samples per CPU-second ..., ratio R"
    num = r"([0-9.]+)"
    wall = re.search(rf"best wall-clock: bare {num}[^,]*, pipeline {num}[^,]*, ratio {num}", out.stdout)
    cpu = re.search(rf"best CPU time: +bare {num}[^,]*, pipeline {num}.*?ratio {num}", out.stdout)
    if out.returncode != 0 or not wall:
        raise RuntimeError(f"tools/bench_loader.py failed or changed its output:\n{out.stdout[-2000:]}\n"
                           f"{out.stderr[-2000:]}")
    res = {"bare": float(wall.group(1)), "pipeline": float(wall.group(2)), "ratio": float(wall.group(3))}
    if cpu:
        res.update(cpu_bare=float(cpu.group(1)), cpu_pipeline=float(cpu.group(2)), cpu_ratio=float(cpu.group(3)))
    paired = re.search(rf"median of the (\d+) paired per-run CPU ratios: {num}", out.stdout)
    if paired:
        res.update(paired_runs=int(paired.group(1)), paired_ratio=float(paired.group(2)))
    stock = re.search(rf"open_clip transform: bare {num} samples/s, {num} per CPU-second", out.stdout)
    if stock:
        res.update(stock_bare=float(stock.group(1)), stock_cpu=float(stock.group(2)))
    return res


# -------------------------------------------------------------------------------------- report
def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def render(s: dict[str, Any], info: dict[str, str], res: dict[str, Any], elapsed: float) -> str:
    model = s.get("model_name") or (f"ViT width {s['width']}, {s['layers']}+{s['layers']} layers, "
                                    f"{s['image_size']} px / patch {s['patch_size']}, context {s['context_length']}")
    lines = ["# powerclip training benchmarks", "",
             f"Generated by `python tools/bench_train.py{' --quick' if s['quick'] else ''}` on "
             f"{info['date']} in {elapsed / 60:.1f} min.", "",
             f"Machine: {info['cpu']}, {info['cores']} cores"
             + (f", GPU {info['gpu']}" if "gpu" in info else "")
             + f"; torch {info['torch']}, deepspeed {info['deepspeed']}, open_clip {info['open_clip']}, "
             f"Python {info['python']}; device `{s['device']}`, {s['threads']} torch thread(s), "
             f"precision {s['precision']}. Load average at start: {info['load']}, at end: {res['load_end']}"
             " (a loaded machine makes every figure noisy; ratios come from interleaved runs).", "",
             f"Model: {model}. Optimiser AdamW (lr 1e-3, wd 0.1), no gradient clipping, "
             f"{s.get('workers', 1)} data loader worker(s) per trainer.", ""]
    if s["quick"]:
        lines += ["**--quick run: tiny sizes, a smoke test of the tool; the figures are not meaningful.**", ""]
    lines += ["| measurement | value | target |", "|---|---|---|"]
    if "compare" in res:
        c = res["compare"]
        lines += [f"| open_clip_train CLIP step, batch {s['batch_size']}, 1 process | {c['oc_sps']:.1f} samples/s | |",
                  f"| powerclip CLIP-only step (ZeRO-0), same model/batch/data | {c['pc_sps']:.1f} samples/s | |",
                  f"| powerclip / open_clip throughput ratio | **{c['ratio']:.3f}** | >= 1.0: {_ok(c['ratio'] >= 1.0)} |",
                  f"| same, per main-process CPU second (open_clip {c['oc_cpu_ms']:.0f} ms, powerclip "
                  f"{c['pc_cpu_ms']:.0f} ms CPU per step) | {c['cpu_ratio']:.3f} | robust to other load |"]
        if "loop_ratio" in c:
            lines += [f"| same ratio, powerclip with {' '.join(STOCK)} (open_clip_train's optimiser "
                      f"implementation and allocator behaviour), wall; CPU | {c['loop_ratio']:.3f}; "
                      f"{c['loop_cpu_ratio']:.3f} | |"]
        if c.get("flops_per_sample"):
            f = c["flops_per_sample"]
            mfu = ""
            if s.get("peak_tflops"):
                mfu = (f"; MFU open_clip {f * c['oc_sps'] / (s['peak_tflops'] * 1e12):.1%}, powerclip "
                       f"{f * c['pc_sps'] / (s['peak_tflops'] * 1e12):.1%} of {s['peak_tflops']:g} TFLOP/s")
            lines += [f"| model FLOPs per sample, fwd+bwd (FlopCounterMode) | {f / 1e9:.2f} GFLOP | |",
                      f"| achieved model FLOP/s: open_clip / powerclip | {f * c['oc_sps'] / 1e9:.1f} / "
                      f"{f * c['pc_sps'] / 1e9:.1f} GFLOP/s{mfu} | |"]
    if "shards" in res:
        sh = res["shards"]
        lines += [f"| powerclip end to end, real shards + loader, {sh['world']} ranks ZeRO-2, batch "
                  f"{sh['batch']}/rank | {sh['sps']:.1f} samples/s (global) | |"]
    if "terms" in res:
        t = res["terms"]
        for name, r in t["ratio"].items():
            if name == "clip":
                lines.append(f"| CLIP-only step, batch {t['shapes']['B']} (term baseline) | "
                             f"{t['best_s']['clip'] * 1e3:.0f} ms ({t['cpu_s']['clip'] * 1e3:.0f} ms CPU) | |")
                continue
            rc = t["cpu_ratio"][name]
            target = f"<= 1.10: {_ok(r <= 1.10)} (CPU: {_ok(rc <= 1.10)})" if name == "powerset" else ""
            lines.append(f"| {name} step / CLIP-only step (wall; CPU) | {r:.3f}; {rc:.3f} "
                         f"({t['best_s'][name] * 1e3:.0f} ms) | {target} |")
    if "zero" in res:
        z = res["zero"]
        for stage, row in z.items():
            gpu = f", peak GPU {row['peak_gpu_mb']:.0f} MB" if row["peak_gpu_mb"] else ""
            lines.append(f"| ZeRO-{stage}, 2 ranks: optimiser state / peak RSS per rank | "
                         f"{row['state_mb']:.1f} MB / {row['peak_rss_mb']:.0f} MB{gpu} | |")
        if 0 in z and 2 in z:
            r2 = z[2]["state_mb"] / z[0]["state_mb"]
            lines.append(f"| ZeRO-2 / ZeRO-0 optimiser state per rank | **{r2:.3f}** | ~ 1/2 = 0.5: "
                         f"{_ok(abs(r2 - 0.5) < 0.05)} |")
    if "loader" in res:
        ld = res["loader"]
        lines += [f"| data loading, full pipeline (224 px JPEG shards) | {ld['pipeline']:.1f} samples/s per worker | |",
                  f"| data loading, bare floor: tar read + decode + powerclip's image transform into a batch ring | {ld['bare']:.1f} samples/s | |",
                  f"| pipeline / bare (wall clock) | {ld['ratio']:.3f} | >= 0.85: {_ok(ld['ratio'] >= 0.85)} |"]
        if "cpu_ratio" in ld:
            lines += [f"| data loading per CPU-second of one worker: pipeline / bare | {ld['cpu_pipeline']:.1f} / "
                      f"{ld['cpu_bare']:.1f} = {ld['cpu_ratio']:.3f} (robust to other load) | >= 0.85: "
                      f"{_ok(ld['cpu_ratio'] >= 0.85)} |"]
        if "paired_ratio" in ld:
            lines += [f"| same, median of {ld['paired_runs']} per-run ratios (bare and pipeline back to back) | "
                      f"{ld['paired_ratio']:.3f} | >= 0.85: {_ok(ld['paired_ratio'] >= 0.85)} |"]
        if "stock_cpu" in ld:
            lines += [f"| reference: bare loop with open_clip's stock transform (torchvision ToTensor + Normalize) | "
                      f"{ld['stock_bare']:.1f} samples/s, {ld['stock_cpu']:.1f} per CPU-second | |"]
    lines.append("")
    if "terms" in res:
        sh = res["terms"]["shapes"]
        lines += [f"Term shapes (per rank, 1 process): B={sh['B']} images, M={sh['M']} regions over "
                  f"T={sh['T']} patches, K={sh['K']} phrase nodes (max_phrases 16), N={sh['N']} negatives, "
                  f"C={sh['C']} concept rows. Batches are materialised from the real loader once; each "
                  "config reads only its fields. DeGLA includes the EMA teacher forward and the update.", ""]
    if "zero" in res:
        z = res["zero"]
        lines += ["ZeRO memory: optimiser state = bytes of the AdamW state tensors (exp_avg, exp_avg_sq) "
                  "inside DeepSpeed's optimiser on each rank, what ZeRO-1/2/3 partition; "
                  f"model {next(iter(z.values()))['model_numel'] / 1e6:.2f} M parameters; the fp32 values the "
                  "optimiser steps per rank: " + ", ".join(f"ZeRO-{k} {v['master_numel'] / 1e6:.2f} M" for k, v in z.items())
                  + ". Peak RSS includes the Python/torch/DeepSpeed runtime (~hundreds of MB) and, on CPU, "
                  "the gloo buffers; it is what the process costs, not what ZeRO shards.", ""]
    if "compare" in res:
        c = res["compare"]
        lines += ["Per-run median step (ms): open_clip " + ", ".join(f"{x * 1e3:.0f}" for x in c["oc_runs"])
                  + "; powerclip " + ", ".join(f"{x * 1e3:.0f}" for x in c["pc_runs"])
                  + "; powerclip with stock settings " + (", ".join(f"{x * 1e3:.0f}" for x in c["pcl_runs"]) or "not run")
                  + ".",
                  "Two powerclip defaults make its CPU step cheaper than open_clip_train's: torch's fused AdamW "
                  "kernel (optim.fused; open_clip_train builds torch.optim.AdamW with its defaults, on CPU the "
                  "per-parameter loop of about ten elementwise ops) and freed host memory kept mapped between "
                  "steps (train.keep_freed_host_memory; glibc's defaults unmap large blocks and page-fault "
                  "them back in every step). The 'stock settings' row turns both off.", ""]
    lines += [f"GPU: {'run on ' + info['gpu'] if 'gpu' in info else 'not run (no GPU available on this machine)'}. "
              "Command: `python tools/bench_train.py --device cuda --model-name ViT-B-16 --batch-size 256 "
              "--term-batch 256 --precision bf16 --peak-tflops 989 --threads 8 --parts 1,2` (part 3 needs 2 GPUs).",
              ""]
    return "\n".join(lines)


def gpu_check_tail(path: Path) -> str:
    """The GPU-check section of an existing BENCHMARKS.md (tools/gpu_check.py appends it): kept when this
    tool rewrites the file, since a CPU machine cannot reproduce it."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(GPU_CHECK_HEADING)
    return "\n" + text[at:] if at >= 0 else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the tool")
    ap.add_argument("--parts", default="1,2,3,4", help="comma list: 1 compare+shards, 2 terms, 3 zero, 4 loader")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler top ops of the CLIP-only step")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    # 1 by default: with the one DataLoader worker each trainer runs, a second OpenMP thread
    # oversubscribes a 2-core machine and its OpenMP spin-waits slow every step down
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (ranks split them)")
    ap.add_argument("--model-name", default=None, help="an open_clip built-in instead of the bench ViT")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None, help="with --model-name: must match it")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak FLOP/s in TFLOP/s (e.g. 989 for H100 bf16 dense): prints MFU")
    ap.add_argument("--term-batch", type=int, default=None, help="batch of the term-overhead runs (part 2)")
    ap.add_argument("--shard-batch", type=int, default=None, help="per-rank batch of the shard run")
    ap.add_argument("--zero-stages", default="0,1,2,3", help="ZeRO stages for part 3")
    ap.add_argument("--workers", type=int, default=1,
                    help="data loader workers of both trainers in part 1 (a GPU step needs more than one)")
    ap.add_argument("--no-shards", action="store_true",
                    help="part 1 without its 2-rank shard run (one GPU cannot hold two NCCL ranks)")
    ap.add_argument("--no-stock", action="store_true",
                    help="part 1 without the stock-settings powerclip run (its two settings are CPU-only)")
    ap.add_argument("--terms", default=None, help="comma list of part 2 configs (default: clip and every registered loss term)")
    ap.add_argument("--term-steps", type=int, default=None, help="timed steps per part 2 config")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.spec)
        Path(spec["work"]).mkdir(parents=True, exist_ok=True)
        CHILDREN[a.child](spec)
        return 0

    s: dict[str, Any] = dict(QUICK if a.quick else FULL)
    for key in ("batch_size", "image_size", "steps", "repeats", "term_batch", "shard_batch", "term_steps"):
        if getattr(a, key) is not None:
            s[key] = getattr(a, key)
    if a.model_name:
        import open_clip

        mc = open_clip.get_model_config(a.model_name)
        if mc is None:
            ap.error(f"--model-name {a.model_name!r} is not an open_clip built-in")
        s["context_length"] = mc["text_cfg"].get("context_length", 77)
        s["image_size"] = mc["vision_cfg"]["image_size"]
    s.update(quick=a.quick, profile=a.profile, device=a.device, precision=a.precision, threads=a.threads,
             model_name=a.model_name, peak_tflops=a.peak_tflops, workers=a.workers, stock=not a.no_stock,
             terms=[x for x in (a.terms or "").split(",") if x.strip()] or None, zero_stages=[int(x) for x in a.zero_stages.split(",") if x.strip()])
    if s["terms"] and ("clip" not in s["terms"] or set(s["terms"]) - set(bench_terms())):
        ap.error(f"--terms must name 'clip' (the baseline) and only configs of {','.join(bench_terms())}")
    parts = {int(x) for x in a.parts.split(",") if x.strip()}
    t0 = time.monotonic()
    info = machine()
    print(f"# bench_train: {info['cpu']}, {info['cores']} cores, load {info['load']}", flush=True)
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        s["work"] = a.work or tmp
        Path(s["work"]).mkdir(parents=True, exist_ok=True)
        if 1 in parts:
            res["compare"] = part_compare(s)
            if not a.no_shards:
                res["shards"] = part_shards(s)
        if 2 in parts:
            res["terms"] = part_terms(s)
        if 3 in parts:
            res["zero"] = part_zero(s)
        if 4 in parts:
            res["loader"] = part_loader(s)
    res["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    text = render(s, info, res, time.monotonic() - t0)
    print(text)
    Path(a.out).write_text(text + gpu_check_tail(Path(a.out)))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
