"""The DeepSpeed engine a run trains with: config derivation and ``deepspeed.initialize``.

Everything DeepSpeed needs is derived from the powerclip config (batch sizes, ZeRO stage, precision,
clipping); ``train.deepspeed`` is then deep-merged on top for the settings we do not model
(offload, bucket sizes, communication dtype...).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from powerclip.config import Config, ConfigError
from powerclip.train.optim import build_optimizer, scheduler_factory

# train.precision -> dtype of the weights and of the batch the model reads (None: fp32)
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "amp_bf16": None, "amp_fp16": None}
# train.precision -> dtype the matmuls compute in (the EMA teacher's autocast dtype)
COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "amp_bf16": torch.bfloat16,
                  "amp_fp16": torch.float16}
_AUTOCAST = {"amp_bf16": "bf16", "amp_fp16": "fp16"}


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
        "gradient_clipping": 0.0 if owns_clipping(cfg) else float(cfg.optim.grad_clip),
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
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if t.precision in _AUTOCAST:
        half = _AUTOCAST[t.precision]
        derived["torch_autocast"] = {"enabled": True, "dtype": half}
        if t.reduce_dtype != half:  # Linear/Conv gradients would otherwise be reduced in the half dtype
            derived["torch_autocast"]["lower_precision_safe_modules"] = []
    if t.precision == "bf16" and t.zero_stage >= 1:
        derived["data_types"] = {"grad_accum_dtype": t.grad_accum_dtype}
    merged = deep_merge(derived, dict(cfg.train.deepspeed))
    if merged["train_batch_size"] != merged["train_micro_batch_size_per_gpu"] * merged[
            "gradient_accumulation_steps"] * world_size:
        raise ValueError("train.deepspeed overrides the batch sizes inconsistently; set data.batch_size "
                         "and train.accum_steps instead")
    check_optimizer_route(merged)
    return merged


def check_optimizer_route(ds: dict[str, Any]) -> None:
    """Refuse a DeepSpeed config whose optimiser wrapper would be ``FP16_UnfusedOptimizer``.

    DeepSpeed wraps a torch optimiser at ZeRO-0 with bf16 or fp16 weights in that wrapper, which
    loops over the parameter tensors in Python every step with a host read for each one's overflow
    check (302 on ViT-B/16): on a GPU each read stalls the launch queue. ZeRO >= 1 flattens the
    parameters (BF16_Optimizer / the ZeRO optimisers), and the amp modes keep fp32 weights and the
    torch optimiser unwrapped. A DeepSpeed-built optimiser (``train.deepspeed.optimizer``, FusedAdam)
    gets the flat FP16_Optimizer instead and is left alone.
    """
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    half = [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled")]
    if stage == 0 and half and "optimizer" not in ds:
        raise ConfigError(f"{half[0]} weights at ZeRO-0 make DeepSpeed step the optimiser one tensor at a time "
                          f"with a host read each: use train.precision=amp_{half[0]} (fp32 weights, autocast) "
                          f"or train.zero_stage>=1")


def owns_clipping(cfg: Config) -> bool:
    """powerclip, not DeepSpeed, clips the gradients: ZeRO-0 with fp32 weights and a torch optimiser."""
    return (cfg.train.zero_stage == 0 and PRECISION_DTYPES[cfg.train.precision] is None
            and "optimizer" not in cfg.train.deepspeed and cfg.optim.grad_clip > 0)


def clip_gradients(engine, cfg: Config) -> torch.Tensor | None:
    """Clip to ``optim.grad_clip`` by the global norm when ``owns_clipping``; the norm (a device tensor,
    not read), else None. At ZeRO-0 the gradients are already reduced, so the local norm is global.
    Under amp_fp16 the gradients are unscaled first (GradScaler.step then skips its own unscale)."""
    if not owns_clipping(cfg):
        return None
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:
        scaler.unscale_(engine.optimizer)
    params = [p for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)


def discard_gradients(engine, cfg: Config) -> None:
    """Drop this step's gradients without stepping (ZeRO-0: they live on the parameters); an amp_fp16
    scaler that ``clip_gradients`` made unscale them is moved on to its next step (it sees the
    non-finite values and lowers its scale, as for an overflow)."""
    engine.optimizer.zero_grad()
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None and owns_clipping(cfg):
        scaler.update()


def grad_scaler_state(engine) -> dict[str, Any] | None:
    """The amp_fp16 loss scaler's state (scale, growth tracker: primitives) for the checkpoint, None in
    every other mode. DeepSpeed does not save the GradScaler it builds for torch autocast at ZeRO-0, and
    a resumed run that restarted at the initial scale would overflow (and skip) steps anew."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    state = scaler.state_dict() if scaler is not None else None
    return state or None  # an unused scaler has an empty state


def load_grad_scaler_state(engine, state: dict[str, Any] | None) -> None:
    """Restore ``grad_scaler_state``'s state into this engine's amp_fp16 scaler (when both exist)."""
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None and isinstance(state, dict) and state:
        scaler.load_state_dict(state)


def apply_backend_settings(cfg: Config) -> None:
    """``train.cudnn_benchmark`` and ``train.tf32`` (open_clip_train's defaults) for this process."""
    torch.backends.cudnn.benchmark = bool(cfg.train.cudnn_benchmark)
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.train.tf32)


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """fp32 matmuls without TF32 inside (the loss forward: scores divided by a small temperature
    magnify operand rounding); the flag is a host setting, switching it costs no synchronisation."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


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
