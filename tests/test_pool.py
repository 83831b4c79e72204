"""Negative pools (losses/pool.py) for the powerset loss: parsing, the shared draw, the sampled
loss against a brute-force restriction of the full score matrix (values and gradients), 'all' as
today's formula, 'local' as per-rank blocks, and 1 rank vs 2 gloo ranks on the same global batch."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from powerclip.config import PowersetLossConfig
from powerclip.losses import pool
from powerclip.losses.concept import concept_losses
from powerclip.losses.degla import degla_losses
from powerclip.losses.powerset import pair_terms
from powerclip.losses.powerset_embed import phrase_embeddings, region_embeddings
from tests.dist_helpers import run_on_ranks
from tests.test_concept import _cfg, _Global, _global_batch, _make, _Pooled
from tests.test_powerset import _global_case, _loss_on

_CFG = dict(weight=1.0, tau=0.01, margin=0.1)
_STEP = 7


def test_parse_pool_and_errors_name_the_key():
    assert pool.parse_pool("all", "k") == pool.PoolSpec("all")
    assert pool.parse_pool(" Local ", "k") == pool.PoolSpec("local")
    assert pool.parse_pool("sample:12", "k") == pool.PoolSpec("sample", 12)
    assert pool.PoolSpec("sample", 12).covers(12) and not pool.PoolSpec("sample", 12).covers(13)
    for bad in ("sample:0", "sample:x", "some", "sample"):
        with pytest.raises(ValueError, match="loss.powerset.negative_pool"):
            pool.parse_pool(bad, "loss.powerset.negative_pool")


def test_sample_is_a_sorted_step_seeded_draw():
    a = pool.sample_members(100, 10, step=3)
    assert a.shape == (10,) and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 10
    assert torch.equal(a, pool.sample_members(100, 10, step=3))
    assert not torch.equal(a, pool.sample_members(100, 10, step=4))
    assert torch.equal(pool.sample_members(5, 10), torch.arange(5))
    counts, owner = pool.members_per_rank(torch.tensor([0, 2, 3, 5]), [0, 3], [3, 3])
    assert counts == [2, 2] and owner.tolist() == [0, 0, 1, 1]


def _reference(case, members: torch.Tensor | None, cfg: PowersetLossConfig, blocks: int = 1):
    """Brute force on the full G x G matrix: row i's negatives are S minus i (S = members, or its
    own block of G/blocks when members is None). Returns (loss, grad of the shared projection)."""
    patches, tokens, masks, rvalid, nodes, pvalid, proj = case
    proj = proj.clone().requires_grad_(True)
    phi, rv = region_embeddings(F.normalize(patches @ proj, dim=-1), masks, rvalid)
    p, pv = phrase_embeddings(F.normalize(tokens @ proj, dim=-1), nodes, pvalid)
    t1, t2 = pair_terms(phi, rv, p, pv, cfg)
    s = t1 + t2
    g = s.shape[0]
    hinges = []
    for x in (s, s.T):
        for i in range(g):
            if members is None:
                lo = i // (g // blocks) * (g // blocks)
                cand = [j for j in range(lo, lo + g // blocks) if j != i]
            else:
                cand = [j for j in members.tolist() if j != i]
            hard = max(x[i, j] for j in cand)
            hinges.append(torch.relu(cfg.margin + hard - x[i, i]))
    loss = torch.stack(hinges).mean()
    loss.backward()
    return loss.detach(), proj.grad


def test_sampled_pool_equals_brute_force_restriction():
    case = _global_case()
    cfg = PowersetLossConfig(**_CFG, negative_pool="sample:3")
    pool.set_step(_STEP)
    got = _loss_on(0, 6, 6, case, cfg)
    ref_loss, ref_grad = _reference(case, pool.sample_members(6, 3, step=_STEP), cfg)
    assert got["terms"]["powerset"].item() == pytest.approx(ref_loss.item(), rel=1e-5)
    torch.testing.assert_close(got["grad"], ref_grad, rtol=1e-4, atol=1e-6)
    assert ref_grad.abs().max() > 0
    # a different pool gives a different loss: the sample is really used
    full = _loss_on(0, 6, 6, case, PowersetLossConfig(**_CFG, negative_pool="all"))
    assert full["terms"]["powerset"].item() != pytest.approx(ref_loss.item(), rel=1e-3)


def test_pool_covering_the_batch_is_todays_formula():
    case = _global_case()
    ref_loss, ref_grad = _reference(case, torch.arange(6), PowersetLossConfig(**_CFG))
    for spec in ("all", "sample:6", "sample:4096"):
        got = _loss_on(0, 6, 6, case, PowersetLossConfig(**_CFG, negative_pool=spec))
        assert got["terms"]["powerset"].item() == pytest.approx(ref_loss.item(), rel=1e-5), spec
        torch.testing.assert_close(got["grad"], ref_grad, rtol=1e-4, atol=1e-6)


def _rank_fn(rank: int, world: int, specs: tuple[str, ...]):
    out = {}
    for spec in specs:
        pool.set_step(_STEP)
        k = 4 if rank == 0 else 6
        out[spec] = _loss_on(rank * 3, rank * 3 + 3, k, _global_case(), PowersetLossConfig(**_CFG, negative_pool=spec))
    return out


@pytest.mark.slow
def test_sampled_and_local_pools_on_two_ranks():
    case = _global_case()
    cfg = PowersetLossConfig(**_CFG, negative_pool="sample:3")
    pool.set_step(_STEP)
    single = _loss_on(0, 6, 6, case, cfg)
    both = run_on_ranks(_rank_fn, 2, ("sample:3", "local"))
    for spec, ref in (("sample:3", None), ("local", "blocks")):
        ranks = [r[spec] for r in both]
        mean = sum(r["terms"]["powerset"] for r in ranks) / 2
        avg = sum(r["grad"] for r in ranks) / 2
        if ref is None:  # same global batch, same step -> the same loss and gradient as one process
            want_loss, want_grad = single["terms"]["powerset"], single["grad"]
            for key in ("powerset_i2t", "powerset_t2i", "powerset_t1_pos", "powerset_active"):
                got = sum(r["terms"][key] for r in ranks) / 2
                assert got.item() == pytest.approx(single["terms"][key].item(), rel=1e-5, abs=1e-7), key
        else:  # local: each rank's own block of 3 is the pool
            want_loss, want_grad = _reference(case, None, PowersetLossConfig(**_CFG), blocks=2)
        assert mean.item() == pytest.approx(want_loss.item(), rel=1e-5), spec
        torch.testing.assert_close(avg, want_grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ concept terms
def _brute_pooled(vec, concepts, owners, ids, form, fix, members, scale=10.0, bias=-2.0):
    """docs/losses.md §3 loops with image i's columns restricted to its own concepts and those of S minus i."""
    n_img = vec.n_img
    total, rows = 0.0, 0
    for i in range(n_img):
        cand = [n for n in range(len(owners)) if owners[n] == i or (owners[n] in members and owners[n] != i)]
        mine = {ids[m] for m in range(len(owners)) if owners[m] == i}
        pos = [n for n in cand if owners[n] == i or (fix and ids[n] in mine)]
        logits = {n: scale * float(vec(i, n) @ concepts[n]) for n in cand}
        if form == "sigmoid":
            for n in cand:
                y = 1.0 if n in pos else -1.0
                total += math.log1p(math.exp(-y * (logits[n] + bias)))
        elif pos:
            lse = math.log(sum(math.exp(x) for x in logits.values()))
            total += -sum(logits[n] - lse for n in pos) / len(pos)
            rows += 1
    return total / (n_img if form == "sigmoid" else rows)


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
def test_concept_sampled_pool_matches_brute_force(form):
    leaves, feats, batch = _global_batch()
    pool.set_step(_STEP)
    cfg = _cfg(form=form, xac_lambda=3.0, negative_pool="sample:2")
    out = concept_losses(feats, batch, cfg, "clip")
    members = pool.sample_members(5, 2, salt=1, step=_STEP).tolist()
    u, z, c = (leaves[k].detach().double() for k in ("image", "patches", "concepts"))
    owners, ids = batch.concept_owner.tolist(), batch.concept_ids.tolist()
    npc = _brute_pooled(_Global(u), c, owners, ids, form, True, members)
    xac = _brute_pooled(_Pooled(z, c, 3.0), c, owners, ids, form, True, members)
    assert out["concept_npc"].item() == pytest.approx(npc, rel=1e-5)
    assert out["concept_xac"].item() == pytest.approx(xac, rel=1e-5)
    full = concept_losses(feats, batch, _cfg(form=form, xac_lambda=3.0, negative_pool="all"), "clip")
    assert full["concept_npc"].item() != pytest.approx(npc, rel=1e-3)  # the pool really restricts


def _concept_rank_fn(rank: int, world: int, spec: str) -> dict:
    from tests.test_concept import SPLIT
    pool.set_step(_STEP)
    b, owners, ids = SPLIT[rank]
    leaves, feats, batch = _make(b, owners, ids, seed=rank)
    out = {}
    for form, glob in (("sigmoid", "siglip"), ("softmax", "clip")):
        for v in leaves.values():
            v.grad = None
        terms = concept_losses(feats, batch, _cfg(form=form, xac_lambda=2.0, negative_pool=spec), glob)
        (terms["concept_npc"] + terms["concept_xac"]).backward()
        out[form] = {"loss": (terms["concept_npc"] + terms["concept_xac"]).detach(),
                     **{k: leaves[k].grad.clone() for k in ("image", "patches", "concepts", "scale")}}
    return out


@pytest.mark.slow
def test_concept_sampled_pool_two_ranks_equal_one_rank():
    ranks = run_on_ranks(_concept_rank_fn, 2, "sample:2")
    leaves, feats, batch = _global_batch()
    pool.set_step(_STEP)
    for form, glob in (("sigmoid", "siglip"), ("softmax", "clip")):
        for v in leaves.values():
            v.grad = None
        terms = concept_losses(feats, batch, _cfg(form=form, xac_lambda=2.0, negative_pool="sample:2"), glob)
        loss = terms["concept_npc"] + terms["concept_xac"]
        loss.backward()
        r0, r1 = ranks[0][form], ranks[1][form]
        assert torch.allclose((r0["loss"] + r1["loss"]) / 2, loss.detach(), atol=1e-5), form
        for k in ("image", "patches", "concepts"):
            torch.testing.assert_close(torch.cat([r0[k], r1[k]]) / 2, leaves[k].grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close((r0["scale"] + r1["scale"]) / 2, leaves["scale"].grad, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ DeGLA NegCLIP base
def test_degla_sampled_pool_matches_brute_force():
    from tests.test_degla import CFG, _case, _dot, _nll
    s, t, batch = _case(g=6)
    pool.set_step(_STEP)
    members = pool.sample_members(6, 2, salt=2, step=_STEP).tolist()
    got = degla_losses(s, t, batch, replace(CFG, negative_pool="sample:2"))
    valid, sc = batch.neg_valid, float(s.logit_scale)
    g, k = valid.shape
    i2t = t2i = 0.0
    for i in range(g):
        cols = [sc * _dot(s.image[i], s.text[j]) for j in range(g)]
        cols += [sc * _dot(s.image[i], s.negatives[gg, kk]) for gg in sorted({i, *members}) for kk in range(k)
                 if valid[gg, kk]]
        i2t += _nll(cols, i)
        t2i += _nll([sc * _dot(s.text[i], s.image[j]) for j in range(g)], i)
    assert got["degla_base"].item() == pytest.approx((i2t + t2i) / (2 * g), rel=1e-6)
    full = degla_losses(s, t, batch, replace(CFG, negative_pool="all"))
    assert full["degla_base"].item() != pytest.approx(got["degla_base"].item(), rel=1e-4)
    for key in ("degla_igc", "degla_tgc", "degla_distill"):  # per-sample terms: no pool
        assert full[key].item() == got[key].item()


def _degla_run(rows: slice, spec: str) -> dict:
    import tests.test_degla as td
    pool.set_step(_STEP)
    saved = td.CFG  # td._run reads its module's CFG
    td.CFG = replace(saved, negative_pool=spec)
    try:
        return td._run(rows)
    finally:
        td.CFG = saved


def _degla_rank_fn(rank: int, world: int, spec: str) -> dict:
    return _degla_run(slice(rank * 3, rank * 3 + 3), spec)


@pytest.mark.slow
def test_degla_sampled_pool_two_ranks_equal_one_rank():
    single = _degla_run(slice(0, 6), "sample:2")
    ranks = run_on_ranks(_degla_rank_fn, 2, "sample:2")
    mean = sum(r["terms"]["degla_base"] for r in ranks) / 2
    assert mean.item() == pytest.approx(single["terms"]["degla_base"].item(), rel=1e-5)
    torch.testing.assert_close(sum(r["proj_grad"] for r in ranks) / 2, single["proj_grad"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r["scale_grad"] for r in ranks) / 2, single["scale_grad"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"use_t1": False}, {"use_t2": False}, {"exact": True},
                                     {"singletons_only": True}])
def test_positive_pairs_scored_alone_equal_the_matrix_diagonal(variant):
    from powerclip.losses.powerset import pair_terms_diag
    from tests.test_powerset import _embeds

    phi, rv, p, pv = _embeds(5, 5, 4, 3)
    cfg = PowersetLossConfig(tau=0.02, **variant)
    phi.requires_grad_(True)
    t1, t2 = pair_terms(phi, rv, p, pv, cfg)
    d1, d2 = pair_terms_diag(phi, rv, p, pv, cfg)
    torch.testing.assert_close(d1, t1.diagonal(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d2, t2.diagonal(), rtol=1e-9, atol=1e-12)
    g_full = torch.autograd.grad((t1 + t2).diagonal().sum(), phi)[0]
    g_diag = torch.autograd.grad((d1 + d2).sum(), phi)[0]
    torch.testing.assert_close(g_diag, g_full, rtol=1e-7, atol=1e-10)


def test_rows_are_chunked_when_one_column_exceeds_the_budget():
    """Budget below one column of all rows: the rows are chunked down to one; same values and
    gradients, and a lower peak than one column of all rows at once."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from powerclip.losses.powerset_nla import nla_pair_terms
    from tests.test_powerset import _embeds

    phi, rv, p, pv = _embeds(48, 6, 10, 16, d=32, seed=2)
    phi, p = phi.float().requires_grad_(), p.float().requires_grad_()
    scale = torch.full((48,), 0.1)

    def run(budget: float):
        tracker = MemTracker()
        with tracker:
            t1, t2 = nla_pair_terms(phi, rv, scale, p, pv, 0.01, 0.15, memory_budget_mb=budget)
            g = torch.autograd.grad((t1 * 1.3 + t2).sum(), (phi, p))
        peak = sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())
        return (t1, t2, *g), peak

    one_column = 4 * 48 * 10 * 16 * 4 / 2**20  # _LIVE_NLA tensors of [48 rows, 1 column, M, K] fp32
    ref, peak_ref = run(512.0)
    got, peak_rows = run(one_column / 8)  # 6 rows per chunk
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert peak_rows < peak_ref
    tiny, _ = run(1e-9)  # down to one row
    for a, b in zip(tiny, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_own_concepts_scored_with_their_owner_equal_the_explicit_pooling():
    from powerclip.losses.concept_xac import xac_scores_explicit, xac_scores_paired

    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(3, 5, 8, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    c = F.normalize(torch.randn(4, 8, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    owner = torch.tensor([0, 0, 2, 1])
    got = xac_scores_paired(z, owner, c, 2.0)
    want = xac_scores_explicit(z, c, 2.0)[owner, torch.arange(4)]
    torch.testing.assert_close(got, want)
    w = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    g1 = torch.autograd.grad((got * w).sum(), (z, c))
    g2 = torch.autograd.grad((want * w).sum(), (z, c))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ gathered tensors in bf16
_PREC_CFG = dict(weight=1.0, margin=0.2)  # docs/losses.md's delta and tau = 1e-3: the hardest case for rounding


def _prec_embeds(lo: int, hi: int, dtype: torch.dtype):
    patches, tokens, masks, rvalid, nodes, pvalid, proj = _global_case(seed=21)
    proj = proj.double().clone().requires_grad_(True)
    phi, rv = region_embeddings(F.normalize(patches[lo:hi].double() @ proj, dim=-1), masks[lo:hi], rvalid[lo:hi])
    p, pv = phrase_embeddings(F.normalize(tokens[lo:hi].double() @ proj, dim=-1), nodes[lo:hi], pvalid[lo:hi])
    return phi.to(dtype), rv, p.to(dtype), pv, proj


def _prec_rank_fn(rank: int, world: int, specs: tuple[str, ...]) -> dict:
    from powerclip.losses.powerset import powerset_loss_from_embeddings

    res = {}
    for spec in specs:
        pool.set_step(_STEP)
        phi, rv, p, pv, proj = _prec_embeds(rank * 3, rank * 3 + 3, torch.float32)
        out = powerset_loss_from_embeddings(phi, rv, p, pv, PowersetLossConfig(**_PREC_CFG, negative_pool=spec),
                                            gather_dtype=torch.bfloat16)
        out["powerset"].backward()
        res[spec] = {"loss": out["powerset"].detach(), "grad": proj.grad}
    return res


@pytest.mark.slow
def test_bf16_gathered_tensors_stay_within_a_thousandth_of_the_margin_of_fp64():
    from powerclip.losses.powerset import powerset_loss_from_embeddings, run_gather_dtype

    assert run_gather_dtype(torch.bfloat16, PowersetLossConfig()) == torch.bfloat16
    assert run_gather_dtype(torch.float32, PowersetLossConfig()) is None
    assert run_gather_dtype(torch.bfloat16, PowersetLossConfig(gather_precision="fp32")) is None
    with pytest.raises(ValueError, match="loss.powerset.gather_precision"):
        run_gather_dtype(torch.bfloat16, PowersetLossConfig(gather_precision="half"))
    specs = ("all", "sample:3")
    all_ranks = run_on_ranks(_prec_rank_fn, 2, specs)
    for spec in specs:
        pool.set_step(_STEP)
        phi, rv, p, pv, proj = _prec_embeds(0, 6, torch.float64)
        ref = powerset_loss_from_embeddings(phi, rv, p, pv, PowersetLossConfig(**_PREC_CFG, negative_pool=spec))
        ref["powerset"].backward()
        assert ref["powerset"].item() > 0.01  # hinges active: the bound is not met trivially
        ranks = [r[spec] for r in all_ranks]
        mean = sum(r["loss"] for r in ranks).item() / 2
        assert abs(mean - ref["powerset"].item()) < 1e-3 * _PREC_CFG["margin"], spec
        grad = sum(r["grad"] for r in ranks) / 2
        # gradients carry bf16's 2^-8 rounding of the gathered columns, sharpened by tau = 1e-3 (~1% here)
        assert (grad - proj.grad).norm() < 3e-2 * proj.grad.norm(), spec
