"""The DeepSpeed engine a run trains with: config derivation and ``deepspeed.initialize``.

Everything DeepSpeed needs is derived from the powerclip config (batch sizes, ZeRO stage, precision,
clipping); ``train.deepspeed`` is then deep-merged on top for the settings we do not model
(offload, bucket sizes, communication dtype...).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from powerclip.config import Config
from powerclip.train.optim import build_optimizer, scheduler_factory

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config of this run (``train.deepspeed`` merged over the derived one).

    ``gradient_accumulation_steps`` = ``train.accum_steps``: DeepSpeed steps the optimiser once per
    accum_steps ``engine.step()`` calls; the loop feeds it feature-cached micro-batch passes (see
    ``powerclip.train.accum``).

    Under bf16 DeepSpeed would reduce and accumulate gradients in bf16 (8 mantissa bits: a sum over
    many ranks or micro-batches loses the small contributions); ``train.reduce_dtype`` and
    ``train.grad_accum_dtype`` (fp32 by default) keep both in fp32. ZeRO-0 has no fp32 accumulation
    path in DeepSpeed, so there only the reduction dtype applies.
    """
    b, a, t = cfg.data.batch_size, cfg.train.accum_steps, cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update(overlap_comm=bool(t.overlap_comm), contiguous_gradients=bool(t.contiguous_gradients),
                    reduce_bucket_size=int(t.reduce_bucket_size))
    if t.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = int(t.allgather_bucket_size)
    if t.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(t.prefetch_bucket_size)
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": b,
        "gradient_accumulation_steps": a,
        "train_batch_size": b * a * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "communication_data_type": t.reduce_dtype,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # dynamic loss scaling (loss_scale 0): DeepSpeed skips overflowing steps and lowers the scale
        "fp16": {"enabled": cfg.train.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # torch's AdamW is a "client optimizer" to DeepSpeed; it is tested here
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16" and t.zero_stage >= 1:
        derived["data_types"] = {"grad_accum_dtype": t.grad_accum_dtype}
    merged = deep_merge(derived, dict(cfg.train.deepspeed))
    if merged["train_batch_size"] != merged["train_micro_batch_size_per_gpu"] * merged[
            "gradient_accumulation_steps"] * world_size:
        raise ValueError("train.deepspeed overrides the batch sizes inconsistently; set data.batch_size "
                         "and train.accum_steps instead")
    return merged


def features_of(output):
    """The ``Features`` of an engine call (the model returns them; a dict is accepted too)."""
    from powerclip.model.features import Features

    return output if isinstance(output, Features) else Features(**output)


def build_engine(cfg: Config, model: nn.Module, world_size: int):
    """``deepspeed.initialize`` with our AdamW param groups and warm-up + cosine LambdaLR.

    Returns (engine, lr_scheduler). If ``train.deepspeed`` defines its own ``optimizer`` (e.g.
    DeepSpeedCPUAdam for ZeRO-Offload), DeepSpeed builds it from our param groups instead.
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    sched = scheduler_factory(cfg.optim, cfg.train.steps)
    if "optimizer" in ds_config:
        from powerclip.train.param_groups import optimizer_groups

        groups = optimizer_groups(model, cfg.optim)
        for g in groups:
            g.pop("name")
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups,
                                                       lr_scheduler=sched, config=ds_config)
    else:
        engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim),
                                                       lr_scheduler=sched, config=ds_config)
    if world_size == 1 and cfg.train.zero_stage == 0:
        # one rank has nothing to reduce, but DeepSpeed's stage-0 all-reduce still flattens, divides and
        # copies back every gradient each step (tools/bench_train.py --profile shows what that costs)
        engine.enable_backward_allreduce = False
    return engine, scheduler
