"""The AdamW optimiser over the run's parameter groups, and the learning-rate schedule.

The groups (weight decay rule, locked towers, per-tower lr and layer decay) come from
``param_groups``; they are built before ``deepspeed.initialize`` because ZeRO-3 partitions
(flattens) the parameters afterwards.

The schedule is a plain ``LambdaLR`` (linear warm-up, then cosine to ``min_lr_ratio``·lr, constant,
or open_clip's const-cooldown), handed to DeepSpeed so that it is stepped only on real optimiser
steps and saved in the checkpoint. It is one multiplier for every group: ``LambdaLR`` applies it to
each group's own peak lr (its ``initial_lr``), so per-tower and per-layer ratios hold at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from powerclip.config import OptimConfig
from powerclip.train.param_groups import optimizer_groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW, fused unless ``optim.fused=false``; DeepSpeed wraps it for ZeRO and mixed precision.

    torch's AdamW instead of DeepSpeed's FusedAdam/CPUAdam: no op to compile, identical on CPU and
    GPU. ``fused=True`` is as fast as FusedAdam on GPUs and, on CPU, runs one multi-threaded kernel
    per tensor instead of about ten elementwise ops (tools/bench_train.py measures the step both ways).
    """
    groups = optimizer_groups(model, cfg)
    for g in groups:
        g.pop("name")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=bool(cfg.fused))


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr after ``step`` optimiser steps."""
    warmup = cfg.warmup_steps

    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "const-cooldown":
            return const_cooldown(step, total_steps, cfg)
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return fn


def const_cooldown(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """open_clip's ``const_lr_cooldown`` after warm-up, as a multiplier of the lr: 1 until the last
    ``cooldown_steps``, then ``end + (1 - end) * (1 - progress) ** cooldown_power`` with ``end`` =
    ``cooldown_end_lr / lr`` (each group ends at the same fraction of its own lr). A pure function
    of the step, so a run resumed mid-cooldown continues the same sequence."""
    start = total_steps - cfg.cooldown_steps
    if step < start:
        return 1.0
    end = cfg.cooldown_end_lr / cfg.lr
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return end + (1.0 - end) * (1.0 - progress) ** cfg.cooldown_power


def scheduled_lr(scheduler, base_lr: float) -> float:
    """The lr a parameter at ``base_lr`` (optim.lr) trains with now: the schedule's multiplier
    read from the first group, whose own peak lr may differ (a tower's lr, a layer's decay). A
    scheduler without ``base_lrs`` (one ``train.deepspeed`` defines) reports its first group's lr."""
    last = float(scheduler.get_last_lr()[0])
    peaks = getattr(scheduler, "base_lrs", None)
    return last / float(peaks[0]) * base_lr if peaks else last


def scheduler_factory(cfg: OptimConfig, total_steps: int):
    """A callable DeepSpeed applies to its (wrapped) optimiser: ``LambdaLR(opt, schedule)``."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    return make
