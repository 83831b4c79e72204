"""Step overhead, counted: per training step of every precision mode x ZeRO stage the GPU presets use,
at most 2 host reads and at most 1.2x the ATen ops of an open_clip_train-style step (autocast bf16,
fp32 weights, foreach AdamW) on a narrow model with ViT-B/16's parameter structure. The counter is
tools/bench_step_overhead.py's; it is checked first on reads it must see (and on DeepSpeed's
per-tensor optimiser wrapper, the regression this guards against)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
MAX_READS = 2
MAX_OPS_RATIO = 1.2


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step_overhead", ROOT / "tools" / "bench_step_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_counter_sees_every_kind_of_host_read():
    from deepspeed.accelerator import get_accelerator

    bench = _bench()
    counter = bench.StepCounter()
    t = torch.tensor([1.5])
    with counter.active():
        t.item()
        bool(t)
        float(t)
        int(t)
        t.tolist()
        get_accelerator().synchronize()
        torch.cuda.synchronize()
        counter.mark()
        (t * 2 + 1).sum()  # three ops, no read
        counter.mark()
        # torch's AdamW reads its host-side step counters: not a device read, not counted
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        opt = torch.optim.AdamW([p], foreach=False)
        opt.step()
        counter.mark()
    (reads0, ops0), (reads1, ops1), (reads2, _) = counter.windows
    assert reads0 == 7 and ops0 >= 4  # item, bool, float, int: one _local_scalar_dense each
    assert (reads1, ops1) == (0, 3)
    assert reads2 == 0


def _deepspeed_unfused_reads(rank: int, world: int) -> dict:
    """One step of DeepSpeed's bf16 ZeRO-0 wrapper around a torch optimiser (what powerclip refuses)."""
    import deepspeed

    bench = _bench()
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(10)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
        "steps_per_print": 2**31 - 1, "timers": {"throughput": {"enabled": False}}})
    counter = bench.StepCounter()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with counter.active():
        for _ in range(2):
            counter.mark()
            engine.backward(engine(x).float().square().mean())
            engine.step()
        counter.mark()
    return {"optimizer": type(engine.optimizer).__name__, "reads": counter.windows[2][0],
            "tensors": len(list(model.parameters()))}


@pytest.mark.slow
def test_counter_catches_the_per_tensor_optimizer_loop():
    out = run_on_ranks(_deepspeed_unfused_reads, 1)[0]
    assert out["optimizer"] == "FP16_UnfusedOptimizer"
    assert out["reads"] >= out["tensors"] > MAX_READS  # one overflow read per parameter tensor


def _count_presets(rank: int, world: int) -> dict:
    bench = _bench()
    modes = bench.preset_modes()
    base = bench.count_open_clip()
    return {"base": (base.reads, base.ops), "modes": modes,
            "counts": {f"{p}:{z}": (c.reads, c.ops, c.read_sites) for p, z in modes
                       for c in [bench.count_powerclip(p, z)]}}


@pytest.mark.slow
def test_preset_modes_step_within_host_read_and_op_budgets():
    out = run_on_ranks(_count_presets, 1)[0]
    base_reads, base_ops = out["base"]
    assert max(base_reads) == 0 and min(base_ops) > 1000  # the reference step itself: no read, real work
    assert out["modes"], "no GPU preset found in configs/"
    for mode, (reads, ops, sites) in out["counts"].items():
        assert len(reads) == len(ops) >= 2
        assert max(reads) <= MAX_READS, (mode, reads, sites)
        assert max(ops) <= MAX_OPS_RATIO * max(base_ops), (mode, ops, max(base_ops))
        assert min(ops) > 0.5 * min(base_ops), (mode, ops)  # the whole step was counted
