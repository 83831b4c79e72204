"""Score matmuls with bf16 operands (``loss.powerset.matmul_precision`` / ``loss.concept.matmul_precision``):
the loss against an fp64 reference, 2 gloo ranks against 1 on the bf16 path, and the config errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from powerclip.config import ConceptLossConfig, PowersetLossConfig
from powerclip.losses import pool
from powerclip.losses.concept import concept_losses
from powerclip.losses.matmul_precision import operand_dtype
from powerclip.losses.powerset import powerset_loss_from_embeddings
from tests.dist_helpers import run_on_ranks
from tests.test_concept import _cfg, _global_batch, _make

_STEP = 5
_G, _M, _K, _D = 8, 10, 8, 64  # global batch of 8: two ranks of 4
_DELTA = 0.2  # docs/losses.md's margin, with tau = 1e-3: the case that magnifies score rounding the most


def _powerset_inputs(lo: int, hi: int, dtype: torch.dtype):
    """Regions and phrases of samples lo..hi as functions of one shared [D, D] "tower" parameter, built
    around a per-sample direction so that positives and hardest negatives are close (hinges active)."""
    gen = torch.Generator().manual_seed(3)
    base = F.normalize(torch.randn(_G, _D, generator=gen, dtype=torch.float64), dim=-1)
    regions = base[:, None] + 0.25 * torch.randn(_G, _M, _D, generator=gen, dtype=torch.float64)
    phrases = base[:, None] + 0.25 * torch.randn(_G, _K, _D, generator=gen, dtype=torch.float64)
    proj = (torch.eye(_D, dtype=torch.float64) + 0.05 * torch.randn(_D, _D, generator=gen, dtype=torch.float64))
    proj.requires_grad_(True)
    phi = F.normalize(regions[lo:hi] @ proj, dim=-1).to(dtype)
    p = F.normalize(phrases[lo:hi] @ proj, dim=-1).to(dtype)
    rv = torch.ones(_G, _M, dtype=torch.bool)
    rv[0, 7:] = False
    pv = torch.ones(_G, _K, dtype=torch.bool)
    pv[5, 3:] = False
    return phi, rv[lo:hi], p, pv[lo:hi], proj


def _powerset(lo: int, hi: int, dtype: torch.dtype, precision: str, spec: str) -> dict[str, torch.Tensor]:
    pool.set_step(_STEP)
    phi, rv, p, pv, proj = _powerset_inputs(lo, hi, dtype)
    cfg = PowersetLossConfig(weight=1.0, margin=_DELTA, negative_pool=spec, matmul_precision=precision)
    out = powerset_loss_from_embeddings(phi, rv, p, pv, cfg)
    out["powerset"].backward()
    return {"loss": out["powerset"].detach().double(), "active": out["powerset_active"].detach(),
            "grad": proj.grad.clone()}


_SPECS = ("all", "sample:3")


def test_powerset_bf16_matmuls_stay_within_a_thousandth_of_the_margin_of_fp64():
    for spec in _SPECS:
        ref = _powerset(0, _G, torch.float64, "fp32", spec)
        assert ref["loss"].item() > 0.01 and 0.2 < ref["active"].item() < 1.0, spec  # hinges active, not all
        fp32 = _powerset(0, _G, torch.float32, "fp32", spec)
        bf16 = _powerset(0, _G, torch.float32, "bf16", spec)
        assert abs(bf16["loss"] - ref["loss"]).item() < 1e-3 * _DELTA, spec
        # the option really rounds: bf16's error is far above fp32's
        assert abs(bf16["loss"] - ref["loss"]).item() > 10 * abs(fp32["loss"] - ref["loss"]).item(), spec
        # gradients carry the 2^-8 rounding sharpened by tau = 1e-3 (a few % of the norm here)
        assert (bf16["grad"] - ref["grad"]).norm() < 0.1 * ref["grad"].norm(), spec


def _powerset_rank_fn(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    half = _G // world
    return {spec: _powerset(rank * half, (rank + 1) * half, torch.float32, "bf16", spec) for spec in _SPECS}


def _xac_terms(leaves, feats, batch, precision: str, form: str = "softmax") -> dict[str, torch.Tensor]:
    for v in leaves.values():
        v.grad = None
    pool.set_step(_STEP)
    cfg = _cfg(form=form, npc_weight=0.0, xac_lambda=2.0, negative_pool="all", matmul_precision=precision)
    loss = concept_losses(feats, batch, cfg, "clip")["concept_xac"]
    loss.backward()
    return {"loss": loss.detach().double(), **{k: leaves[k].grad.clone() for k in ("patches", "concepts")}}


def _xac_rank_fn(rank: int, world: int) -> dict[str, torch.Tensor]:
    from tests.test_concept import SPLIT
    b, owners, ids = SPLIT[rank]
    leaves, feats, batch = _make(b, owners, ids, seed=rank)
    return _xac_terms(leaves, feats, batch, "bf16")


@pytest.mark.slow
def test_bf16_matmul_path_on_two_ranks_equals_one_rank():
    ranks = run_on_ranks(_powerset_rank_fn, 2)
    for spec in _SPECS:
        single = _powerset(0, _G, torch.float32, "bf16", spec)
        mean = sum(r[spec]["loss"] for r in ranks) / 2
        # the same bf16 products, cut into different GEMM shapes: equal up to fp32 accumulation order
        assert mean.item() == pytest.approx(single["loss"].item(), rel=1e-4, abs=1e-6), spec
        # each rank rounds its own partial gradient GEMM to bf16 (2^-9) before the ranks' parts are summed
        grad = sum(r[spec]["grad"] for r in ranks) / 2
        assert (grad - single["grad"]).norm() < 5e-3 * single["grad"].norm(), spec
    xac = run_on_ranks(_xac_rank_fn, 2)
    leaves, feats, batch = _global_batch()
    single = _xac_terms(leaves, feats, batch, "bf16")
    assert ((xac[0]["loss"] + xac[1]["loss"]) / 2).item() == pytest.approx(single["loss"].item(), rel=1e-4)
    for k in ("patches", "concepts"):
        grad = torch.cat([xac[0][k], xac[1][k]]) / 2
        assert (grad - single[k]).norm() < 5e-3 * single[k].norm(), k


def test_xac_bf16_matmuls_against_fp64():
    """XAC has no margin: its contrast's logits are scale x score, so the bound is on the loss relative
    to its value (1e-3). Its absolute error does NOT stay below 1e-3 of the powerset margin at these
    shapes (bf16 rounds the similarities, and the softmax over T patches does not average it out),
    which is why XAC keeps fp32 by default."""
    leaves, feats, batch = _global_batch()
    fp32 = _xac_terms(leaves, feats, batch, "fp32")
    bf16 = _xac_terms(leaves, feats, batch, "bf16")
    wide = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    feats64 = replace(feats, image=wide["image"], text=wide["image"].detach(), patches=wide["patches"],
                      concepts=wide["concepts"], logit_scale=wide["scale"], logit_bias=wide["bias"])
    ref = _xac_terms(wide, feats64, batch, "fp32")
    err = abs(bf16["loss"] - ref["loss"]).item()
    assert err < 1e-3 * abs(ref["loss"].item()), err
    assert err > 10 * abs(fp32["loss"] - ref["loss"]).item()  # the option really rounds
    assert (bf16["patches"] - ref["patches"]).norm() < 0.05 * ref["patches"].norm()


def test_matmul_precision_errors_name_the_key():
    assert operand_dtype("fp32", "k") is None and operand_dtype("bf16", "k") == torch.bfloat16
    phi, rv, p, pv, _ = _powerset_inputs(0, 2, torch.float32)
    with pytest.raises(ValueError, match="loss.powerset.matmul_precision"):
        powerset_loss_from_embeddings(phi, rv, p, pv, PowersetLossConfig(weight=1.0, matmul_precision="fp16"))
    with pytest.raises(ValueError, match="loss.powerset.matmul_precision"):
        powerset_loss_from_embeddings(phi, rv, p, pv, PowersetLossConfig(weight=1.0, exact=True,
                                                                         matmul_precision="bf16"))
    leaves, feats, batch = _global_batch()
    with pytest.raises(ValueError, match="loss.concept.matmul_precision"):
        concept_losses(feats, batch, ConceptLossConfig(xac_weight=1.0, matmul_precision="tf32"), "clip")
