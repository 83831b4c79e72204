"""ZeRO-3 builds the model under deepspeed.zero.Init: every parameter is partitioned as soon as the
model exists (a rank holds about 1/W of it), and the values are exactly those every other ZeRO stage
starts from (same seed). The training equality of ZeRO-3 on 2 ranks with 1 rank is
tests/test_train_engine.py."""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config


def _cfg(precision: str = "fp32"):
    return tiny_config(["train.zero_stage=3", f"train.precision={precision}", "data.batch_size=2"])


def _job(rank: int, world: int, precision: str) -> dict:
    import deepspeed

    from powerclip.train.build_model import build_model
    from powerclip.train.dist_env import DistEnv
    from powerclip.train.loop import seed_all
    from powerclip.train.param_groups import param_groups

    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    seed_all(0)
    model = build_model(_cfg(precision), env)
    groups = {g["name"]: len(g["params"]) for g in param_groups(model, 0.1)}
    params = list(model.named_parameters())
    shapes = {n: {"ds": hasattr(p, "ds_id"), "held": p.data.numel(), "local": p.ds_tensor.numel(),
                  "full": p.ds_numel, "dtype": str(p.ds_tensor.dtype)} for n, p in params}
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        values = {n: p.detach().float().clone() for n, p in params}
    return {"shapes": shapes, "values": values, "scale_max": model.logit_scale_max, "groups": groups}


@pytest.mark.slow
def test_zero3_model_is_partitioned_from_construction():
    """bf16: the partitions hold the rank-0 fp32 values rounded once. The weight-decay groups of
    the partitioned model equal the eager model's (a partition is flat: the rule must read its
    full shape)."""
    from powerclip.model.factory import create_model
    from powerclip.train.loop import seed_all
    from powerclip.train.param_groups import param_groups

    precision = "bf16"
    seed_all(0)
    ref = create_model(_cfg(precision).model)
    out = run_on_ranks(_job, 2, precision)
    dtype = str(torch.bfloat16 if precision == "bf16" else torch.float32)
    for r in out:
        held = sum(s["held"] for s in r["shapes"].values())
        assert all(s["ds"] for s in r["shapes"].values())
        assert held == 0  # no parameter holds its full values outside a gather
        for s in r["shapes"].values():
            assert s["local"] == math.ceil(s["full"] / 2) and s["dtype"] == dtype
        assert r["scale_max"] == ref.logit_scale_max
        assert r["groups"] == {g["name"]: len(g["params"]) for g in param_groups(ref, 0.1)}
        for name, p in ref.named_parameters():
            want = p.detach().to(torch.bfloat16).float() if precision == "bf16" else p.detach()
            assert torch.equal(r["values"][name], want), name

