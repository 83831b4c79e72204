"""PowerCLIP powerset loss (docs/losses.md §2): reference formulas, exact enumeration bounds, masking,
gradients, chunking, and world size 1 vs 2 on the same global batch."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from powerclip.config import PowersetLossConfig
from powerclip.data.batch import Batch
from powerclip.losses.powerset import (
    TERMS,
    hardest_negative_triplet,
    pair_terms,
    powerset_loss,
    powerset_loss_from_embeddings,
)
from powerclip.losses.powerset_embed import phrase_embeddings, region_embeddings
from powerclip.losses.powerset_exact import exact_pair_terms
from powerclip.losses.powerset_nla import nla_pair_terms
from powerclip.model.features import Features
from tests.dist_helpers import run_on_ranks


def _unit(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _embeds(r: int, c: int, m: int, k: int, d: int = 8, seed: int = 0, pad: bool = True):
    """Random region/phrase embeddings with some padded slots (never a caption with 0 phrases)."""
    gen = torch.Generator().manual_seed(seed)
    phi = _unit(r, m, d, gen=gen)
    p = _unit(c, k, d, gen=gen) * (0.5 + torch.rand(c, k, 1, generator=gen, dtype=torch.float64))
    rv = torch.ones(r, m, dtype=torch.bool)
    pv = torch.ones(c, k, dtype=torch.bool)
    if pad:
        rv[0, m - 2:] = False
        pv[1 % c, 1:] = False
        if c > 2:
            pv[2, k - 1] = False
    return phi, rv, p, pv


# ----------------------------------------------------------------------------- reference formulas
def _ref_terms(phi, rv, p, pv, tau, zeta, scale=None):
    """Loop-free but literal docs/losses.md §2 formulas on the full [R, M, C, K] tensor (float64)."""
    n = rv.sum(-1).clamp_min(1).double()
    sc = 1.0 / n if scale is None else torch.full_like(n, scale)
    s = torch.einsum("rmd,ckd->rmck", phi, p) * sc[:, None, None, None]
    v = rv.double()[:, :, None, None]
    softplus = tau * torch.log1p(torch.exp(s / tau))
    t1 = ((softplus * v).sum(1) * pv.double()[None]).sum(-1) / pv.sum(-1).double()[None]
    z = s / (2 * tau)
    g = s / 2 + zeta * tau * torch.log(torch.cosh(z))
    gs = (g * v).sum(1) / tau  # [R, C, K]
    gs = gs.masked_fill(~pv[None], float("-inf"))
    t2 = tau * torch.logsumexp(gs, -1) - (1 - zeta) * tau * torch.log(pv.sum(-1).double())[None]
    return t1, t2


def _ref_exact(phi, rv, p, pv, scale=None):
    """Q<- and Q-> by python loops over the subsets of the VALID regions only."""
    r_, c_ = phi.shape[0], p.shape[0]
    q_t2r = torch.zeros(r_, c_, dtype=torch.float64)
    q_r2t = torch.zeros(r_, c_, dtype=torch.float64)
    for r in range(r_):
        regs = [m for m in range(phi.shape[1]) if rv[r, m]]
        sc = 1.0 / max(len(regs), 1) if scale is None else scale
        subsets = [a for n in range(len(regs) + 1) for a in itertools.combinations(regs, n)]
        for c in range(c_):
            ks = [k for k in range(p.shape[1]) if pv[c, k]]
            s = {(m, k): float(phi[r, m] @ p[c, k]) * sc for m in regs for k in ks}
            q_t2r[r, c] = sum(max(sum(s[m, k] for m in a) for a in subsets) for k in ks) / len(ks)
            q_r2t[r, c] = sum(max(sum(s[m, k] for m in a) for k in ks) for a in subsets) / len(subsets)
    return q_t2r, q_r2t


def test_embeddings_match_loops():
    gen = torch.Generator().manual_seed(1)
    b, t, m, seq, k, d = 2, 9, 3, 7, 4, 5
    patches, tokens = _unit(b, t, d, gen=gen), _unit(b, seq, d, gen=gen)
    masks = torch.rand(b, m, t, generator=gen) < 0.4
    masks[0, 1] = False  # an empty region: invalid even though marked valid
    rvalid = torch.ones(b, m, dtype=torch.bool)
    rvalid[1, 2] = False
    nodes = torch.rand(b, k, seq, generator=gen) < 0.5
    nodes[:, 0, 1:4] = True
    tok_valid = torch.ones(b, seq, dtype=torch.bool)
    tok_valid[:, 0] = False  # SOT never counts
    pvalid = torch.ones(b, k, dtype=torch.bool)
    pvalid[1, 3] = False
    phi, rv = region_embeddings(patches, masks, rvalid)
    for pool in ("mean", "sum"):
        p, pv = phrase_embeddings(tokens, nodes, pvalid, tok_valid, pool)
        for i in range(b):
            for j in range(k):
                pos = [q for q in range(seq) if nodes[i, j, q] and tok_valid[i, q]]
                ok = bool(pvalid[i, j]) and len(pos) > 0
                assert bool(pv[i, j]) == ok
                if ok:
                    ref = sum(tokens[i, q] for q in pos)
                    ref = ref / len(pos) if pool == "mean" else ref
                    torch.testing.assert_close(p[i, j], ref)
                else:
                    assert p[i, j].abs().max() == 0
    for i in range(b):
        for j in range(m):
            ok = bool(rvalid[i, j]) and bool(masks[i, j].any())
            assert bool(rv[i, j]) == ok
            if ok:
                torch.testing.assert_close(phi[i, j], F.normalize(patches[i][masks[i, j]].sum(0), dim=0))
            else:
                assert phi[i, j].abs().max() == 0


@pytest.mark.parametrize("tau,zeta", [(1e-3, 0.15), (0.05, 0.0), (0.05, 1.0), (0.2, 0.5)])
def test_nla_matches_reference_formulas(tau, zeta):
    phi, rv, p, pv = _embeds(4, 5, 6, 4, seed=2)
    scale = 1.0 / rv.sum(-1).double()
    t1, t2 = nla_pair_terms(phi, rv, scale, p, pv, tau, zeta, chunk=2)
    r1, r2 = _ref_terms(phi, rv, p, pv, tau, zeta)
    torch.testing.assert_close(t1, r1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t2, r2, rtol=1e-10, atol=1e-12)


def test_exact_enumeration_matches_loops_and_relu_identity():
    phi, rv, p, pv = _embeds(3, 4, 5, 3, seed=3)
    scale = 1.0 / rv.sum(-1).double()
    q_t2r, q_r2t = exact_pair_terms(phi, rv, scale, p, pv, chunk=3)
    ref_t2r, ref_r2t = _ref_exact(phi, rv, p, pv)
    torch.testing.assert_close(q_t2r, ref_t2r)
    torch.testing.assert_close(q_r2t, ref_r2t)
    # additivity: the best subset for one phrase holds exactly the regions with positive score
    s = torch.einsum("rmd,ckd->rmck", phi * rv[..., None], p) * scale[:, None, None, None]
    relu = (s.clamp_min(0).sum(1) * pv[None]).sum(-1) / pv.sum(-1)[None]
    torch.testing.assert_close(q_t2r, relu)


@pytest.mark.parametrize("tau", [1e-3, 0.02, 0.1])
@pytest.mark.parametrize("m", [1, 4, 10])
def test_t1_within_tau_m_log2_of_exact_t2r(tau, m):
    phi, rv, p, pv = _embeds(5, 6, m, 5, seed=10 + m, pad=False)
    scale = torch.full((5,), 1.0 / m, dtype=torch.float64)
    t1, _ = nla_pair_terms(phi, rv, scale, p, pv, tau, 0.15)
    q_t2r, _ = exact_pair_terms(phi, rv, scale, p, pv)
    gap = t1 - q_t2r
    assert gap.min() >= -1e-12
    assert gap.max() <= tau * m * math.log(2) + 1e-12
    assert gap.max() > 0  # the bound is not vacuous: softplus really exceeds relu


@pytest.mark.parametrize("tau", [1e-3, 0.02, 0.1])
def test_t2_sandwich_and_monotone_in_zeta(tau):
    phi, rv, p, pv = _embeds(5, 6, 8, 6, seed=4)
    scale = 1.0 / rv.sum(-1).double()
    _, q_r2t = exact_pair_terms(phi, rv, scale, p, pv)
    logk = torch.log(pv.sum(-1).double())[None]
    u = {z: nla_pair_terms(phi, rv, scale, p, pv, tau, z, use_t1=False)[1] + (1 - z) * tau * logk
         for z in (0.0, 0.25, 0.5, 0.75, 1.0)}  # U_zeta
    assert ((u[0.0] - tau * logk) <= q_r2t + 1e-12).all()
    assert (q_r2t <= u[1.0] + 1e-12).all()
    zs = sorted(u)
    for a, b in zip(zs, zs[1:]):
        assert (u[a] <= u[b] + 1e-15).all()
    # NLA-T2 itself is monotone in zeta and spans the two ends of the sandwich
    nla = {z: u[z] - (1 - z) * tau * logk for z in zs}
    assert torch.equal(nla[0.0], u[0.0] - tau * logk) and torch.equal(nla[1.0], u[1.0])
    for a, b in zip(zs, zs[1:]):
        assert (nla[a] <= nla[b] + 1e-15).all()


def test_singletons_only_smooth_and_exact():
    tau = 0.01
    phi, rv, p, pv = _embeds(3, 4, 5, 3, seed=5)
    scale = 1.0 / rv.sum(-1).double()
    t1, t2 = nla_pair_terms(phi, rv, scale, p, pv, tau, 0.15, singletons_only=True, chunk=1)
    e1, e2 = exact_pair_terms(phi, rv, scale, p, pv, singletons_only=True)
    # loops over single regions
    for r in range(3):
        regs = [m for m in range(5) if rv[r, m]]
        for c in range(4):
            ks = [k for k in range(3) if pv[c, k]]
            s = {(m, k): float(phi[r, m] @ p[c, k]) * float(scale[r]) for m in regs for k in ks}
            assert e1[r, c].item() == pytest.approx(sum(max(s[m, k] for m in regs) for k in ks) / len(ks))
            assert e2[r, c].item() == pytest.approx(sum(max(s[m, k] for k in ks) for m in regs) / len(regs))
            lse1 = sum(tau * math.log(sum(math.exp(s[m, k] / tau) for m in regs)) for k in ks) / len(ks)
            lse2 = sum(tau * math.log(sum(math.exp(s[m, k] / tau) for k in ks)) for m in regs) / len(regs)
            assert t1[r, c].item() == pytest.approx(lse1, rel=1e-9)
            assert t2[r, c].item() == pytest.approx(lse2, rel=1e-9)
    assert ((t1 - e1) >= -1e-12).all() and ((t1 - e1) <= tau * math.log(5) + 1e-12).all()


# --------------------------------------------------------------------------------- the loss itself
def _ref_triplet(s: torch.Tensor, margin: float) -> float:
    n = s.shape[0]
    rows = [max(0.0, margin + max(float(s[i, j]) for j in range(n) if j != i) - float(s[i, i])) for i in range(n)]
    cols = [max(0.0, margin + max(float(s[j, i]) for j in range(n) if j != i) - float(s[i, i])) for i in range(n)]
    return 0.5 * (sum(rows) / n + sum(cols) / n)


@pytest.mark.parametrize("variant", [{}, {"use_t1": False}, {"use_t2": False}, {"singletons_only": True},
                                     {"exact": True}, {"exact": True, "singletons_only": True}])
def test_loss_matches_reference_triplet(variant):
    cfg = PowersetLossConfig(weight=0.2, tau=0.01, margin=0.5, **variant)
    phi, rv, p, pv = _embeds(6, 6, 5, 4, seed=6)
    out = powerset_loss_from_embeddings(phi, rv, p, pv, cfg)
    assert set(out) == set(TERMS)
    assert all(v.dim() == 0 for v in out.values())
    t1, t2 = pair_terms(phi, rv, p, pv, cfg)
    assert out["powerset"].item() == pytest.approx(_ref_triplet(t1 + t2, cfg.margin), rel=1e-12)
    if not cfg.use_t1:
        assert t1.abs().max() == 0 and out["powerset_t1_pos"] == 0
    if not cfg.use_t2:
        assert t2.abs().max() == 0
    assert out["powerset_t1_pos"].item() == pytest.approx(t1.diagonal().mean().item())
    assert out["powerset_t2_neg"].item() == pytest.approx(((t2.sum() - t2.diagonal().sum()) / 30).item())


def test_hardest_negative_triplet_edge_cases():
    x = torch.tensor([[1.0, 0.9, 0.1], [0.0, 0.5, 0.7]])
    hinge, active = hardest_negative_triplet(x, torch.tensor([0, 1]), margin=0.2)
    torch.testing.assert_close(hinge, torch.tensor([0.1, 0.4]))
    assert active.tolist() == [True, True]
    one, _ = hardest_negative_triplet(torch.tensor([[0.3]]), torch.tensor([0]), 0.2)
    assert one.item() == 0.0


def _features_batch(b=4, t=9, seq=10, m=3, k=4, d=8, seed=0, extra_regions=0, extra_phrases=0):
    """Features + Batch; ``extra_*`` append padded slots filled with garbage (must change nothing)."""
    gen = torch.Generator().manual_seed(seed)
    patches, tokens = _unit(b, t, d, gen=gen), _unit(b, seq, d, gen=gen)
    masks = torch.rand(b, m, t, generator=gen) < 0.5
    masks[:, :, 0] = True
    nodes = torch.rand(b, k, seq, generator=gen) < 0.4
    nodes[:, :, 1] = True
    pvalid = torch.ones(b, k, dtype=torch.bool)
    pvalid[0, 2:] = False
    tok_valid = torch.ones(b, seq, dtype=torch.bool)
    tok_valid[:, 0] = False
    rvalid = torch.ones(b, m, dtype=torch.bool)
    if extra_regions:
        masks = torch.cat([masks, torch.rand(b, extra_regions, t, generator=gen) < 0.5], 1)
        rvalid = torch.cat([rvalid, torch.zeros(b, extra_regions, dtype=torch.bool)], 1)
    if extra_phrases:
        nodes = torch.cat([nodes, torch.ones(b, extra_phrases, seq, dtype=torch.bool)], 1)
        pvalid = torch.cat([pvalid, torch.zeros(b, extra_phrases, dtype=torch.bool)], 1)
    feats = Features(image=_unit(b, d, gen=gen), text=_unit(b, d, gen=gen), logit_scale=torch.tensor(10.0),
                     patches=patches, tokens=tokens)
    batch = Batch(keys=[str(i) for i in range(b)], images=torch.zeros(b, 3, 2, 2),
                  text=torch.zeros(b, seq, dtype=torch.long), token_valid=tok_valid, phrase_tokens=nodes,
                  phrase_valid=pvalid, region_masks=masks, region_valid=rvalid)
    return feats, batch


@pytest.mark.parametrize("variant", [{}, {"exact": True}, {"singletons_only": True}])
def test_padding_changes_nothing(variant):
    cfg = PowersetLossConfig(weight=1.0, tau=0.01, margin=1.0, **variant)
    base = powerset_loss(*_features_batch(seed=7), cfg)
    padded = powerset_loss(*_features_batch(seed=7, extra_regions=2, extra_phrases=3), cfg)
    for key in TERMS:
        torch.testing.assert_close(padded[key], base[key], rtol=1e-12, atol=1e-14)


def test_gradcheck_float64():
    cfg = PowersetLossConfig(weight=1.0, tau=0.05, margin=1.0)  # margin 1: every hinge active
    phi, rv, p, pv = _embeds(4, 4, 3, 3, d=5, seed=8)
    phi.requires_grad_(True)
    p.requires_grad_(True)
    for variant in ({}, {"use_t1": False}, {"use_t2": False}, {"singletons_only": True}):
        c = PowersetLossConfig(**{**cfg.__dict__, **variant})
        assert torch.autograd.gradcheck(
            lambda a, b, c=c: powerset_loss_from_embeddings(a, rv, b, pv, c, chunk=2)["powerset"],
            (phi, p), eps=1e-6, atol=1e-7)
    # the custom backward of the NLA terms on their own, including zeta and region scale
    scale = 1.0 / rv.sum(-1).double()
    assert torch.autograd.gradcheck(
        lambda a, b: torch.cat(nla_pair_terms(a, rv, scale, b, pv, 0.05, 0.3, chunk=3), 1), (phi, p),
        eps=1e-6, atol=1e-7)
    # through the pooling from patches/tokens
    feats, batch = _features_batch(b=3, t=5, seq=6, m=2, k=3, d=4, seed=9)
    patches = feats.patches.clone().requires_grad_(True)
    tokens = feats.tokens.clone().requires_grad_(True)

    def through(pa, to):
        f = Features(image=feats.image, text=feats.text, logit_scale=feats.logit_scale, patches=pa, tokens=to)
        return powerset_loss(f, batch, cfg)["powerset"]

    assert torch.autograd.gradcheck(through, (patches, tokens), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", [{}, {"singletons_only": True}, {"exact": True}])
def test_chunked_equals_unchunked(variant):
    cfg = PowersetLossConfig(weight=1.0, tau=0.01, margin=1.0, **variant)
    phi, rv, p, pv = _embeds(7, 7, 4, 5, seed=11)
    results = []
    for chunk in (None, 1, 3):
        a, b = phi.clone().requires_grad_(True), p.clone().requires_grad_(True)
        out = powerset_loss_from_embeddings(a, rv, b, pv, cfg, chunk=chunk)
        out["powerset"].backward()
        results.append((out, a.grad, b.grad))
    for out, ga, gb in results[1:]:
        for key in TERMS:
            torch.testing.assert_close(out[key], results[0][0][key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ga, results[0][1], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(gb, results[0][2], rtol=1e-10, atol=1e-13)
    # the memory budget picks a chunk size too: a tiny budget gives the same numbers
    tiny = PowersetLossConfig(**{**cfg.__dict__, "memory_budget_mb": 1e-4})
    out = powerset_loss_from_embeddings(phi, rv, p, pv, tiny)
    torch.testing.assert_close(out["powerset"], results[0][0]["powerset"], rtol=1e-12, atol=1e-14)


def test_low_precision_inputs_computed_in_fp32():
    cfg = PowersetLossConfig(weight=1.0)
    phi, rv, p, pv = _embeds(4, 4, 3, 3, seed=12)
    out16 = powerset_loss_from_embeddings(phi.bfloat16(), rv, p.bfloat16(), pv, cfg)
    out32 = powerset_loss_from_embeddings(phi.bfloat16().float(), rv, p.bfloat16().float(), pv, cfg)
    assert out16["powerset"].dtype == torch.float32
    assert torch.isfinite(out16["powerset"])
    torch.testing.assert_close(out16["powerset"], out32["powerset"])
    # under an autocast region (what mixed-precision trainers use) the loss still runs in fp32
    a, b = phi.float().requires_grad_(True), p.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = powerset_loss_from_embeddings(a, rv, b, pv, cfg)["powerset"]
    auto.backward()
    ref_a, ref_b = phi.float().requires_grad_(True), p.float().requires_grad_(True)
    ref = powerset_loss_from_embeddings(ref_a, rv, ref_b, pv, cfg)["powerset"]
    ref.backward()
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, ref)
    torch.testing.assert_close(a.grad, ref_a.grad)


def test_clear_errors(debug_checks):
    cfg = PowersetLossConfig(weight=1.0)
    feats, batch = _features_batch()
    batch.phrase_valid[1] = False
    with pytest.raises(ValueError, match="no valid phrase"):  # reads values: train.debug_checks
        powerset_loss(feats, batch, cfg)
    feats.patches = None
    with pytest.raises(ValueError, match="dense features"):
        powerset_loss(feats, batch, cfg)
    phi, rv, p, pv = _embeds(2, 2, 13, 2)
    with pytest.raises(ValueError, match="M <= 12"):
        powerset_loss_from_embeddings(phi, rv, p, pv, PowersetLossConfig(exact=True))


# ------------------------------------------------------------------------- world size 1 vs 2 ranks
def _global_case(seed: int = 13):
    """A global batch of 6 whose two halves have different phrase counts K (4 and 6)."""
    g, t, seq, m, d = 6, 9, 10, 4, 8
    gen = torch.Generator().manual_seed(seed)
    patches, tokens = torch.randn(g, t, d, generator=gen), torch.randn(g, seq, d, generator=gen)
    masks = torch.rand(g, m, t, generator=gen) < 0.5
    masks[:, :, 0] = True
    rvalid = torch.ones(g, m, dtype=torch.bool)
    rvalid[4, 3] = False
    nodes = torch.rand(g, 6, seq, generator=gen) < 0.4
    nodes[:, :, 2] = True
    pvalid = torch.ones(g, 6, dtype=torch.bool)
    pvalid[:3, 4:] = False  # the first rank's batch max K is 4
    pvalid[5, 1:] = False
    proj = torch.eye(d) + 0.3 * torch.randn(d, d, generator=gen)  # shared "tower" parameter
    return patches, tokens, masks, rvalid, nodes, pvalid, proj


def _loss_on(lo: int, hi: int, k: int, case, cfg: PowersetLossConfig):
    patches, tokens, masks, rvalid, nodes, pvalid, proj = case
    proj = proj.clone().requires_grad_(True)
    feats = Features(image=torch.zeros(hi - lo, 8), text=torch.zeros(hi - lo, 8), logit_scale=torch.tensor(1.0),
                     patches=F.normalize(patches[lo:hi] @ proj, dim=-1),
                     tokens=F.normalize(tokens[lo:hi] @ proj, dim=-1))
    batch = Batch(keys=[""] * (hi - lo), images=torch.zeros(hi - lo, 3, 2, 2), text=torch.zeros(hi - lo, 10),
                  phrase_tokens=nodes[lo:hi, :k], phrase_valid=pvalid[lo:hi, :k],
                  region_masks=masks[lo:hi], region_valid=rvalid[lo:hi])
    out = powerset_loss(feats, batch, cfg, chunk=2)
    out["powerset"].backward()
    return {"terms": {key: v.detach() for key, v in out.items()}, "grad": proj.grad}


_DIST_CFG = dict(weight=1.0, tau=0.01, margin=0.1)


def _rank_fn(rank: int, world: int):
    case = _global_case()
    k = 4 if rank == 0 else 6
    return _loss_on(rank * 3, rank * 3 + 3, k, case, PowersetLossConfig(**_DIST_CFG))


@pytest.mark.slow
def test_two_ranks_equal_one_rank():
    case = _global_case()
    single = _loss_on(0, 6, 6, case, PowersetLossConfig(**_DIST_CFG))
    assert 0 < single["terms"]["powerset_active"] < 1  # some hinges active, some not
    ranks = run_on_ranks(_rank_fn, 2)
    for key in TERMS:  # the trainer logs the rank mean: it equals the single-process value
        mean = sum(r["terms"][key] for r in ranks) / 2
        assert mean.item() == pytest.approx(single["terms"][key].item(), rel=1e-5, abs=1e-7), key
    # DeepSpeed averages gradients over ranks: the average equals the single-process gradient
    avg = sum(r["grad"] for r in ranks) / 2
    torch.testing.assert_close(avg, single["grad"], rtol=1e-4, atol=1e-6)
    assert single["grad"].abs().max() > 0
