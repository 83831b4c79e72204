"""DeepSpeed settings a GPU run expects, derived from the config: fp32 gradient reduction and
accumulation under bf16, overlap_comm / contiguous_gradients / bucket sizes per ZeRO stage; and the
engines DeepSpeed builds from them really use those dtypes (1 gloo rank)."""

from __future__ import annotations

import pytest
import torch

from powerclip.config import ConfigError
from powerclip.train.engine import deepspeed_config
from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config


@pytest.mark.parametrize("stage", [1, 2, 3])  # bf16 weights at ZeRO-0 are refused (tests/test_precision_modes.py)
def test_bf16_reduces_and_accumulates_in_fp32(stage: int):
    ds = deepspeed_config(tiny_config([f"train.zero_stage={stage}", "train.precision=bf16"]), 8)
    assert ds["communication_data_type"] == "fp32" and ds["bf16"]["enabled"]
    z = ds["zero_optimization"]
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert z["overlap_comm"] is True and z["contiguous_gradients"] is True and z["reduce_bucket_size"] == 500_000_000
    assert ("allgather_bucket_size" in z) == (stage in (1, 2))
    assert ("stage3_prefetch_bucket_size" in z) == (stage == 3)


def test_settings_follow_the_config_and_train_deepspeed_still_wins():
    cfg = tiny_config(["train.zero_stage=2", "train.precision=bf16", "train.overlap_comm=false",
                       "train.reduce_dtype=bf16", "train.grad_accum_dtype=bf16", "train.reduce_bucket_size=1000",
                       "train.deepspeed={zero_optimization: {allgather_bucket_size: 2000}}"])
    ds = deepspeed_config(cfg, 2)
    assert ds["communication_data_type"] == "bf16" and ds["data_types"]["grad_accum_dtype"] == "bf16"
    z = ds["zero_optimization"]
    assert z["overlap_comm"] is False and z["reduce_bucket_size"] == 1000 and z["allgather_bucket_size"] == 2000
    fp32 = deepspeed_config(tiny_config(["train.zero_stage=2"]), 2)
    assert "data_types" not in fp32 and fp32["communication_data_type"] == "fp32"
    with pytest.raises(ConfigError, match="train.reduce_dtype"):
        tiny_config(["train.reduce_dtype=fp8"])
    with pytest.raises(ConfigError, match="train.reduce_bucket_size"):
        tiny_config(["train.reduce_bucket_size=0"])


def _engines(rank: int, world: int) -> dict:
    from powerclip.model.factory import create_model
    from powerclip.train.engine import build_engine

    out = {}
    for stage in (1, 2):
        cfg = tiny_config([f"train.zero_stage={stage}", "train.precision=bf16", "data.batch_size=2", "train.steps=2"])
        engine, _ = build_engine(cfg, create_model(cfg.model), world)
        opt = engine.optimizer
        out[stage] = {"comm": str(engine.communication_data_type), "optimizer": type(opt).__name__,
                      "accum": str(getattr(opt, "gradient_accumulation_dtype", None)),
                      "overlap": bool(getattr(opt, "overlap_comm", False))}
    return out


@pytest.mark.slow
def test_deepspeed_engines_use_fp32_reduction_and_accumulation():
    out = run_on_ranks(_engines, 1)[0]
    assert out[1]["optimizer"] == "BF16_Optimizer"  # ZeRO-1 + bf16 + fp32 accumulation: fp32 grad buffers
    assert out[2]["accum"] == str(torch.float32) and out[2]["overlap"]
    assert out[1]["comm"] == out[2]["comm"] == str(torch.float32)
