#!/usr/bin/env python
"""Host reads and ATen ops of one training step, per precision mode x ZeRO stage, next to an
open_clip_train-style step on the same model: a device-independent measure of step overhead.

    python tools/bench_step_overhead.py                  # the preset combinations, table to stdout
    python tools/bench_step_overhead.py --all            # every mode x ZeRO 0-3
    python tools/bench_step_overhead.py --where          # + where each host read comes from (file:line)

Why counts and not time: on a GPU every host read (``.item()``, ``.tolist()``, ``bool(tensor)``,
``float(tensor)``, an accelerator synchronize) stalls the CPU until the device has caught up, and
every ATen op is a kernel launch the CPU pays for whatever its size. The same Python code makes the
same calls on either device, so a CPU run counts what a GPU step pays and a test can assert on it
(tests/test_step_overhead.py). Where torch picks a path by device (foreach kernels, which it uses
by default only on GPUs), the open_clip-style step asks for the GPU's path explicitly. Not counted:
reads made inside torch.optim, which keeps its ``step`` counters on the host on every device.

The model has ViT-B/16's parameter structure (open_clip's ViT-B-16 config: the same number and
kinds of parameter tensors, so per-tensor loops cost what they cost on the real model) at tiny
widths. powerclip runs its real training loop (``powerclip.train.loop.train``, one gloo rank, the
DeepSpeed engine) on batches built in memory; the open_clip-style step is open_clip_train's
(autocast, ``ClipLoss``, backward, ``clip_grad_norm_``, AdamW with torch's default foreach
implementation, ``zero_grad``, the logit-scale clamp) on the same model and batches. A step is
counted from one batch hand-over to the next; warm-up steps, log steps and checkpoint steps are
not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# the precision x ZeRO combinations the presets in configs/ train with (read from them by preset_modes)
PRESET_DIR = ROOT / "configs"
BATCH = 4
WARMUP = 3  # steps before counting: DeepSpeed and the optimiser create their state lazily
COUNTED = 3  # counted steps (every one should count the same; the maximum is reported)

# Python-level host reads that do not pass through ATen's _local_scalar_dense on a CPU tensor
_READ_METHODS = {"tolist", "numpy", "cpu"}


def vitb16_structure() -> dict[str, Any]:
    """open_clip's ViT-B-16 model config at tiny widths: same layers, same parameter tensors."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 12, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 12},
    }


@dataclass
class Counts:
    """Per-step host reads and ATen ops (each a list over the counted steps)."""

    reads: list[int] = field(default_factory=list)
    ops: list[int] = field(default_factory=list)
    read_sites: dict[str, int] = field(default_factory=dict)  # file:line -> host reads (first counted step)


# frames that only forward a read (the counter itself, torch's mode/tensor plumbing)
_PLUMBING = (__file__, os.path.join("torch", "utils", "_python_dispatch.py"), os.path.join("torch", "overrides.py"),
             os.path.join("torch", "_tensor.py"), os.path.join("torch", "_dynamo", "eval_frame.py"),
             os.path.join("torch", "_compile.py"))
_TORCH_OPTIM = os.sep + os.path.join("torch", "optim") + os.sep


def _read_site() -> str | None:
    """``file:line`` of the code that asked for a host read, or None when torch.optim did: torch's
    optimisers keep their ``step`` counters on the host whatever the parameters' device (unless
    ``capturable``/``fused``), so those reads never wait for an accelerator."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(_PLUMBING):
        frame = frame.f_back
    if frame is None:
        return "?"
    name = frame.f_code.co_filename
    if _TORCH_OPTIM in name:
        return None
    return f"{name.split('site-packages' + os.sep)[-1]}:{frame.f_lineno}"


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.reads = 0
        self.sites: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            site = _read_site()
            if site is not None:
                self.reads += 1
                self.sites[site] = self.sites.get(site, 0) + 1
        return func(*args, **(kwargs or {}))


class _Methods(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.sites: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _READ_METHODS:
            site = _read_site()
            if site is not None:
                self.reads += 1
                self.sites[site] = self.sites.get(site, 0) + 1
        return func(*args, **(kwargs or {}))


class StepCounter:
    """Counts ATen ops and host reads while active; ``mark()`` closes one step's window."""

    def __init__(self) -> None:
        self.ops = _Ops()
        self.methods = _Methods()
        self.syncs = 0
        self.sync_sites: dict[str, int] = {}
        self._last = (0, 0)
        self._last_sites: dict[str, int] = {}
        self.windows: list[tuple[int, int]] = []
        self.window_sites: list[dict[str, int]] = []

    def _sync(self, *args, **kwargs) -> None:
        self.syncs += 1
        site = _read_site() or "torch.optim"
        self.sync_sites[site] = self.sync_sites.get(site, 0) + 1

    @contextlib.contextmanager
    def active(self) -> Iterator[StepCounter]:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        saved = acc.synchronize
        saved_cuda = torch.cuda.synchronize
        acc.synchronize = self._sync
        torch.cuda.synchronize = self._sync
        try:
            with self.methods, self.ops:
                yield self
        finally:
            acc.synchronize = saved
            torch.cuda.synchronize = saved_cuda

    def totals(self) -> tuple[int, int]:
        return self.ops.reads + self.methods.reads + self.syncs, self.ops.ops

    def sites(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in (self.ops.sites, self.methods.sites, self.sync_sites):
            for k, v in part.items():
                out[k] = out.get(k, 0) + v
        return out

    def mark(self) -> None:
        now, sites = self.totals(), self.sites()
        self.windows.append((now[0] - self._last[0], now[1] - self._last[1]))
        self.window_sites.append({k: v - self._last_sites.get(k, 0) for k, v in sites.items()
                                  if v != self._last_sites.get(k, 0)})
        self._last, self._last_sites = now, sites


def _batches(n: int, seed: int = 0) -> list:
    """Deterministic batches with the real loader's layout (uint8 images, tokenised text)."""
    from powerclip.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        images = torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)
        text = torch.zeros(BATCH, 77, dtype=torch.long)
        for i in range(BATCH):
            m = int(torch.randint(3, 12, (1,), generator=g))
            text[i, 0], text[i, 1:m + 1], text[i, m + 1] = 49406, torch.randint(1, 4000, (m,), generator=g), 49407
        out.append(Batch(keys=[f"{k}-{i}" for i in range(BATCH)], images=images, text=text))
    return out


class _CountingLoader:
    """The data loader's signature over in-memory batches; marks a step window at each hand-over."""

    def __init__(self, batches: list, counter: StepCounter) -> None:
        self.batches, self.counter = batches, counter

    def __iter__(self):
        for b in self.batches:
            self.counter.mark()
            yield b

    def state_dict(self) -> dict:
        return {}

    def counters(self) -> dict[str, int]:
        return {}


def _single_rank_env() -> None:
    from powerclip.train.dist_env import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    for k in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(k, "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def count_powerclip(precision: str, stage: int, extra: tuple[str, ...] = ()) -> Counts:
    """powerclip's training loop at ``precision`` / ZeRO-``stage``; counts of the counted steps."""
    from powerclip.config import load_config
    from powerclip.train.loop import train

    _single_rank_env()
    steps = WARMUP + COUNTED + 1  # + the last step, which checkpoints and is not counted
    counter = StepCounter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"model.config={json.dumps(vitb16_structure())}", f"train.run_dir={tmp}/run",
                                 f"train.precision={precision}", f"train.zero_stage={stage}",
                                 f"data.batch_size={BATCH}", f"train.steps={steps}", "train.log_every=1000000",
                                 "checkpoint.every_steps=0", "checkpoint.resume=none", "optim.warmup_steps=2",
                                 *extra])
        batches = _batches(steps + 1)
        with counter.active():
            train(cfg, build_loader=lambda *a, **k: _CountingLoader(batches, counter))
    return _counts(counter)


def _counts(counter: StepCounter) -> Counts:
    # window i (i >= 1) is step i-1: from its batch hand-over to the next one
    steps = counter.windows[1 + WARMUP: 1 + WARMUP + COUNTED]
    return Counts(reads=[r for r, _ in steps], ops=[o for _, o in steps],
                  read_sites=counter.window_sites[1 + WARMUP])


def count_open_clip() -> Counts:
    """open_clip_train's step (train_one_epoch, bf16 autocast, fp32 weights) on the same model."""
    import open_clip
    from open_clip.loss import ClipLoss

    from powerclip.data.device import normalize_images

    torch.manual_seed(0)
    model = open_clip.model.CLIP(**vitb16_structure(), output_dict=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    # foreach: what torch picks by default for CUDA parameters (on CPU it would pick its per-tensor loop)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": rest, "weight_decay": 0.0}],
                            lr=5e-4, betas=(0.9, 0.98), eps=1e-6, foreach=True)
    loss_fn = ClipLoss()
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    counter = StepCounter()
    batches = _batches(WARMUP + COUNTED + 1)
    with counter.active():
        for step, b in enumerate(batches):
            counter.mark()
            for g in opt.param_groups:  # open_clip's cosine_lr: a Python assignment per group
                g["lr"] = 5e-4 * (step + 1) / 10
            images = normalize_images(b.images, mean, std)
            texts = b.text
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(images, texts)
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=2.0, foreach=True)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
    return _counts(counter)


def _model_params():
    import open_clip

    return open_clip.model.CLIP(**vitb16_structure()).parameters()


def preset_modes() -> list[tuple[str, int]]:
    """(precision, zero_stage) of every GPU preset in configs/ (``*_cpu.yaml`` are CPU smoke runs)."""
    import yaml

    from powerclip.config import TrainConfig

    out = set()
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        if path.stem.endswith("_cpu"):
            continue
        # the train section only: a preset may leave required data paths to the command line
        train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
        out.add((str(train.get("precision", TrainConfig.precision)),
                 int(train.get("zero_stage", TrainConfig.zero_stage))))
    return sorted(out)


def cpu_model() -> str:
    """lscpu's model name (platform's processor string where lscpu is missing)."""
    import platform
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def table(rows: list[tuple[str, int, Counts]], base: Counts) -> list[str]:
    b = max(base.ops)
    lines = ["| precision | ZeRO | host reads / step | ATen ops / step | ops / open_clip-style |",
             "|---|---|---|---|---|",
             f"| open_clip-style (amp_bf16, foreach AdamW) | - | {max(base.reads)} | {b} | 1.00 |"]
    for precision, stage, c in rows:
        lines.append(f"| {precision} | {stage} | {max(c.reads)} | {max(c.ops)} | {max(c.ops) / b:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every precision mode x ZeRO 0-3")
    ap.add_argument("--mode", action="append", default=[], help="PRECISION:STAGE, repeatable")
    ap.add_argument("--where", action="store_true", help="also print where each step's host reads come from")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.mode:
        combos = [(m.split(":")[0], int(m.split(":")[1])) for m in args.mode]
    elif args.all:
        from powerclip.config import PRECISION_MODES

        combos = [(p, s) for p in PRECISION_MODES for s in range(4)]
    else:
        combos = preset_modes()
    base = count_open_clip()
    rows = []
    for precision, stage in combos:
        try:
            rows.append((precision, stage, count_powerclip(precision, stage)))
        except Exception as e:  # noqa: BLE001 - a refused combination is a row of the table
            print(f"{precision} ZeRO-{stage}: {type(e).__name__}: {str(e).splitlines()[0]}", file=sys.stderr)
    import deepspeed

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, deepspeed {deepspeed.__version__}; model: ViT-B/16 "
          f"parameter structure ({sum(1 for _ in _model_params())} tensors), batch {BATCH}; max of {COUNTED} "
          f"counted steps after {WARMUP} warm-up steps")
    print("\n".join(table(rows, base)))
    if args.where:
        for name, c in [("open_clip-style", base)] + [(f"{p} ZeRO-{z}", c) for p, z, c in rows]:
            print(f"{name}: " + ", ".join(f"{k} x{v}" for k, v in sorted(c.read_sites.items())))


if __name__ == "__main__":
    main()
