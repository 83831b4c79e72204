"""AdamW parameter groups and the learning-rate schedule.

Weight decay follows open_clip's rule: gains, biases, every parameter with fewer than two dimensions
(LayerNorm weights, embeddings' scalars, the [1]-shaped logit scale/bias) and anything named
``logit_scale``/``logit_bias`` get no decay; matrices and convolution kernels do. The groups are
built before ``deepspeed.initialize`` because ZeRO-3 partitions (flattens) the parameters afterwards.

The schedule is a plain ``LambdaLR`` (linear warm-up, then cosine to ``min_lr_ratio``·lr, or
constant), handed to DeepSpeed so that it is stepped only on real optimiser steps and saved in the
checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from powerclip.config import OptimConfig

_NO_DECAY_NAMES = ("logit_scale", "logit_bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for gains, biases, 1-D parameters and the logit scale/bias (open_clip's rule)."""
    leaf = name.split(".")[-1]
    ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition is flat: its full shape
    return ndim < 2 or leaf == "bias" or any(n in name for n in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups (decay / no decay) over the trainable parameters, named for debugging."""
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW, fused unless ``optim.fused=false``; DeepSpeed wraps it for ZeRO and mixed precision.

    torch's AdamW instead of DeepSpeed's FusedAdam/CPUAdam: no op to compile, identical on CPU and
    GPU. ``fused=True`` is as fast as FusedAdam on GPUs and, on CPU, runs one multi-threaded kernel
    per tensor instead of about ten elementwise ops (tools/bench_train.py measures the step both ways).
    """
    groups = param_groups(model, cfg.weight_decay)
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
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return fn


def scheduler_factory(cfg: OptimConfig, total_steps: int):
    """A callable DeepSpeed applies to its (wrapped) optimiser: ``LambdaLR(opt, schedule)``."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    return make
