"""The model a run trains, built so that under ZeRO-3 no rank materialises it on its device.

Why: at ZeRO-3 each rank should hold 1/W of the parameters from the start. Building the full model
first and letting ``deepspeed.initialize`` partition it costs every rank a full fp32 copy on its
GPU (tens of GB for the largest towers) before any sharding happens. Under ``deepspeed.zero.Init``
each module's parameters are partitioned as soon as the module is constructed.

Why the values come from rank 0's host copy: open_clip initialises some parameters from a parent
module's ``init_parameters`` after the child module (and so its parameters) was already built and
partitioned, where the init would act on an empty partition. Rank 0 therefore builds the model the
ordinary way on the CPU (same seed, same starting weights and ``model.pretrained`` as any other
ZeRO stage) and its values are broadcast into the partitions one bucket at a time; the other ranks
never hold more than a bucket, and no device ever holds the full model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from powerclip import distributed as pdist
from powerclip.config import Config, ConfigError
from powerclip.train.dist_env import DistEnv
from powerclip.train.param_groups import lock_towers

BUCKET_NUMEL = 50_000_000  # parameters gathered at once while the values are copied in


def build_model(cfg: Config, env: DistEnv) -> nn.Module:
    """The starting model on ``env.device`` (ZeRO 0/1/2) or partitioned (ZeRO-3), its locked towers
    (``optim.image.lock`` / ``optim.text.lock``) frozen. Seed torch first."""
    from powerclip.model.factory import create_model

    def starting_model(build: bool = True) -> nn.Module | None:
        """``model.pretrained`` is read by each node's local rank 0 first; a failure on any rank
        is raised on every rank at once (with the path), not left to the next collective's timeout."""
        if not cfg.model.pretrained:
            return create_model(cfg.model) if build else None
        return pdist.local_zero_first(lambda: create_model(cfg.model) if build else None, env.local_rank,
                                      f"loading model.pretrained={cfg.model.pretrained!r}")

    if cfg.train.zero_stage != 3:
        model = starting_model().to(env.device)
        lock_towers(model, cfg.optim)  # before compiling: the compiled graphs see the final requires_grad
        if cfg.train.compile:
            compile_towers(model, cfg.train.compile_backend)
        return model
    if cfg.train.compile:
        raise ConfigError("train.compile=true is not supported with train.zero_stage=3 (ZeRO-3 gathers "
                          "parameters in module hooks, which break compiled graphs); use ZeRO 0/1/2")
    import deepspeed

    from powerclip.train.engine import deepspeed_config

    source = starting_model(build=env.rank == 0)  # host memory; same RNG as other stages
    # the batch total is left out: DeepSpeed's communication layer, which zero.Init reads the world
    # size from, is not set up before deepspeed.initialize
    ds = {k: v for k, v in deepspeed_config(cfg, env.world_size).items() if k != "train_batch_size"}
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = create_model(dataclasses.replace(cfg.model, pretrained=None))
    copy_into_partitioned(model, source)
    lock_towers(model, cfg.optim)
    return model


def compile_towers(model: nn.Module, backend: str) -> None:
    """``torch.compile`` the image tower and the text transformer in place (``nn.Module.compile``:
    parameter names, state dicts and checkpoints stay those of the eager model). The glue around
    them (pooling, projections, the losses) stays eager: it is small and changes shape with the
    loss configuration."""
    clip = getattr(model, "clip", model)
    text = getattr(clip, "text", None) or getattr(clip, "transformer", None)
    for tower in (getattr(clip, "visual", None), text):
        if tower is None:
            raise ValueError(f"train.compile: {type(clip).__name__} has no visual/text tower to compile")
        tower.compile(backend=backend)


@torch.no_grad()
def copy_into_partitioned(model: nn.Module, source: nn.Module | None) -> None:
    """Broadcast ``source``'s parameter values (given on rank 0 only) into ZeRO-3 ``model``.

    Collective: every rank calls it; ``source`` is None except on rank 0."""
    import deepspeed

    params = list(model.named_parameters())
    src = dict(source.named_parameters()) if source is not None else None
    if src is not None and set(src) != {n for n, _ in params}:
        raise RuntimeError("the ZeRO-3 model and its rank-0 source have different parameters")
    i = 0
    while i < len(params):
        group, size = [], 0
        while i < len(params) and (not group or size + params[i][1].ds_numel <= BUCKET_NUMEL):
            group.append(params[i])
            size += params[i][1].ds_numel
            i += 1
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=0):
            if src is not None:
                for name, p in group:
                    p.data.copy_(src[name].data.to(device=p.device, dtype=p.dtype))
    if hasattr(model, "reset_logit_scale_max"):
        model.reset_logit_scale_max()  # the pretrained scale may raise the clamp (a gather: collective)
