"""C2LIP concept losses (docs/losses.md §3) against brute-force loops, the docs/losses.md §3 invariants, and 2 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from powerclip.config import ConceptLossConfig
from powerclip.data.batch import Batch
from powerclip.losses.concept import concept_losses, positive_mask, resolve_form
from powerclip.losses.concept_xac import chunk_size, xac_scores, xac_scores_explicit
from powerclip.model.features import Features
from tests.dist_helpers import run_on_ranks

D, T = 8, 5
# Global batch used by the 1-rank / 2-rank comparison: rank 0 has 3 images and 4 concepts, rank 1 has
# 2 images and 7 concepts (different counts on purpose); ids repeat across images and ranks.
SPLIT = [(3, [0, 0, 1, 2], [11, 12, 11, 13]), (2, [0, 0, 0, 1, 1, 1, 1], [12, 14, 15, 11, 16, 17, 12])]
# rank 0 has no concept rows at all (its images still meet rank 1's concepts)
SPLIT_EMPTY = [(2, [], []), (3, [0, 2, 2], [21, 22, 21])]


def _unit(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def _make(b: int, owners: list[int], ids: list[int], seed: int, bias: bool = True):
    """Leaf tensors and the Features/Batch built from them."""
    gen = torch.Generator().manual_seed(seed)
    leaves = {
        "image": _unit(b, D, gen=gen).requires_grad_(),
        "patches": _unit(b, T, D, gen=gen).requires_grad_(),
        "concepts": _unit(len(owners), D, gen=gen).requires_grad_(),
        "scale": torch.tensor(10.0, requires_grad=True),
        "bias": torch.tensor(-2.0, requires_grad=True),
    }
    feats = Features(image=leaves["image"], text=leaves["image"].detach(), logit_scale=leaves["scale"],
                     logit_bias=leaves["bias"] if bias else None, patches=leaves["patches"],
                     concepts=leaves["concepts"])
    batch = Batch(keys=[str(i) for i in range(b)], images=torch.zeros(b, 3, 4, 4), text=torch.zeros(b, 4),
                  concept_owner=torch.tensor(owners, dtype=torch.long),
                  concept_ids=torch.tensor(ids, dtype=torch.long))
    return leaves, feats, batch


def _global_batch(split=SPLIT):
    """The concatenation of ``split`` as one single-process batch (owners shifted by image counts)."""
    parts = [_make(b, o, i, seed=r) for r, (b, o, i) in enumerate(split)]
    offset = 0
    owners, ids = [], []
    for b, o, i in split:
        owners += [x + offset for x in o]
        ids += i
        offset += b
    leaves = {k: torch.cat([p[0][k].detach() for p in parts]).requires_grad_()
              for k in ("image", "patches", "concepts")}
    leaves["scale"] = torch.tensor(10.0, requires_grad=True)
    leaves["bias"] = torch.tensor(-2.0, requires_grad=True)
    feats = Features(image=leaves["image"], text=leaves["image"].detach(), logit_scale=leaves["scale"],
                     logit_bias=leaves["bias"], patches=leaves["patches"], concepts=leaves["concepts"])
    batch = Batch(keys=[str(i) for i in range(offset)], images=torch.zeros(offset, 3, 4, 4),
                  text=torch.zeros(offset, 4), concept_owner=torch.tensor(owners, dtype=torch.long),
                  concept_ids=torch.tensor(ids, dtype=torch.long))
    return leaves, feats, batch


def _cfg(**kw) -> ConceptLossConfig:
    base = dict(npc_weight=1.0, xac_weight=0.01)
    base.update(kw)
    return ConceptLossConfig(**base)


# ------------------------------------------------------------------------------- brute force
def _brute(u_or_pool, concepts, owners, ids, form, fix, scale, bias):
    """Loops straight from the formulas; u_or_pool(i, n) gives the image-side vector for the pair."""
    n_img = 1 + max(owners) if owners else 0
    n_img = max(n_img, u_or_pool.n_img)
    pos = [[False] * len(owners) for _ in range(n_img)]
    for i in range(n_img):
        mine = {ids[m] for m in range(len(owners)) if owners[m] == i}
        for n in range(len(owners)):
            pos[i][n] = owners[n] == i or (fix and ids[n] in mine)
    if form == "sigmoid":
        total = 0.0
        for i in range(n_img):
            for n in range(len(owners)):
                y = 1.0 if pos[i][n] else -1.0
                logit = scale * float(u_or_pool(i, n) @ concepts[n]) + bias
                total += -math.log(1 / (1 + math.exp(-y * logit)))
        return total / n_img
    total, rows = 0.0, 0
    for i in range(n_img):
        logits = [scale * float(u_or_pool(i, n) @ concepts[n]) for n in range(len(owners))]
        lse = math.log(sum(math.exp(x) for x in logits))
        p = [n for n in range(len(owners)) if pos[i][n]]
        if p:
            total += -sum(logits[n] - lse for n in p) / len(p)
            rows += 1
    return total / rows


class _Global:
    def __init__(self, u):
        self.u, self.n_img = u, u.shape[0]

    def __call__(self, i, n):
        return self.u[i]


class _Pooled:
    def __init__(self, z, c, lam):
        self.z, self.c, self.lam, self.n_img = z, c, lam, z.shape[0]

    def __call__(self, i, n):
        a = torch.softmax(self.lam * (self.z[i] @ self.c[n]), dim=0)
        v = (a[:, None] * self.z[i]).sum(0)
        return v / v.norm()


@pytest.mark.parametrize("form", ["sigmoid", "softmax"])
@pytest.mark.parametrize("fix", [True, False])
def test_npc_and_xac_match_brute_force(form, fix):
    leaves, feats, batch = _global_batch()
    cfg = _cfg(form=form, false_negative_fix=fix, xac_lambda=3.0)
    out = concept_losses(feats, batch, cfg, "clip")
    u, z, c = (leaves[k].detach().double() for k in ("image", "patches", "concepts"))
    owners, ids = batch.concept_owner.tolist(), batch.concept_ids.tolist()
    npc = _brute(_Global(u), c, owners, ids, form, fix, 10.0, -2.0)
    xac = _brute(_Pooled(z, c, 3.0), c, owners, ids, form, fix, 10.0, -2.0)
    assert out["concept_npc"].item() == pytest.approx(npc, rel=1e-5)
    assert out["concept_xac"].item() == pytest.approx(xac, rel=1e-5)
    # the fix really changes the positives of this batch (id 11 and 12 recur across images)
    assert (out["concept_diag_false_negative_share"].item() > 0) == fix


def test_positive_mask_false_negative_rule():
    owner = torch.tensor([0, 0, 1, 2, 2])
    ids = torch.tensor([7, 8, 7, 9, 8])
    img = torch.arange(3)
    assert positive_mask(img, owner, ids, False).tolist() == [
        [True, True, False, False, False], [False, False, True, False, False],
        [False, False, False, True, True]]
    assert positive_mask(img, owner, ids, True).tolist() == [
        [True, True, True, False, True], [True, False, True, False, False],
        [False, True, False, True, True]]


def test_positive_mask_matches_pairwise_rule_on_random_ids():
    """The fixed-shape id table against the [N, N] definition: many repeated ids, unsorted owners,
    images without concepts, and a local image block that starts past global image 0."""
    gen = torch.Generator().manual_seed(3)
    for n in (1, 7, 40):
        owner = torch.randint(0, 9, (n,), generator=gen)
        ids = torch.randint(-3, 4, (n,), generator=gen) * 1_000_003
        img = torch.arange(2, 8)
        own = owner[None, :] == img[:, None]
        same_id = ids[:, None] == ids[None, :]
        ref = (own[:, :, None] & same_id[None]).any(1)  # [B, N]: an own concept m with ids[m] == ids[n]
        assert torch.equal(positive_mask(img, owner, ids, True), ref)


def test_form_follows_global_loss_and_weights_select_terms(debug_checks):
    assert resolve_form("auto", "siglip") == "sigmoid" and resolve_form("auto", "clip") == "softmax"
    assert resolve_form("softmax", "siglip") == "softmax"
    _, feats, batch = _global_batch()
    out = concept_losses(feats, batch, _cfg(xac_weight=0.0), "clip")
    assert "concept_npc" in out and "concept_xac" not in out
    assert concept_losses(feats, batch, _cfg(npc_weight=0.0, xac_weight=0.0), "clip") == {}
    feats.logit_bias = None
    with pytest.raises(ValueError, match="logit_bias"):
        concept_losses(feats, batch, _cfg(), "siglip")
    batch.concept_owner = torch.tensor([0, 1, 9] + [0] * 8)
    with pytest.raises(ValueError, match="concept_owner"):  # reads values: train.debug_checks
        concept_losses(feats, batch, _cfg(), "clip")


# ------------------------------------------------------------------------------- XAC invariants
def _zc(b=3, t=T, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return _unit(b, t, D, gen=gen).double(), _unit(n, D, gen=gen).double()


def test_closed_form_equals_explicit_pooling_values_and_gradients():
    z, c = _zc()
    z1, c1 = z.clone().requires_grad_(), c.clone().requires_grad_()
    z2, c2 = z.clone().requires_grad_(), c.clone().requires_grad_()
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 6, generator=gen)
    closed = xac_scores(z1, c1, lam=2.5)
    explicit = xac_scores_explicit(z2, c2, lam=2.5)
    assert torch.allclose(closed, explicit.float(), atol=1e-6)
    (closed * w).sum().backward()
    (explicit * w).sum().backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-5) and torch.allclose(c1.grad, c2.grad, atol=1e-5)


def test_chunking_under_a_tiny_budget_changes_nothing():
    z, c = _zc(n=11)
    assert chunk_size(3, T, 11, 1e-6) == 1  # forces one concept per chunk (checkpointed)
    z1, c1 = z.float().requires_grad_(), c.float().requires_grad_()
    z2, c2 = z.float().requires_grad_(), c.float().requires_grad_()
    a = xac_scores(z1, c1, 1.0, memory_budget_mb=1e-6)
    b = xac_scores(z2, c2, 1.0, memory_budget_mb=512)
    assert torch.allclose(a, b, atol=1e-6)
    a.pow(2).sum().backward()
    b.pow(2).sum().backward()
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6) and torch.allclose(c1.grad, c2.grad, atol=1e-6)


def test_lambda_to_zero_is_mean_pooling():
    z, c = _zc()
    mean = F.normalize(z.mean(1), dim=-1)  # [B, D]
    expected = mean @ c.t()
    assert torch.allclose(xac_scores(z, c, lam=1e-7).double(), expected, atol=1e-6)
    assert not torch.allclose(xac_scores(z, c, lam=20.0).double(), expected, atol=1e-3)


def test_single_token_reduces_xac_to_npc_on_that_token():
    for form, glob in (("sigmoid", "siglip"), ("softmax", "clip")):
        leaves, feats, batch = _global_batch()
        feats.patches = leaves["patches"][:, 2:3]  # T = 1
        cfg = _cfg(form=form)
        xac = concept_losses(feats, batch, cfg, glob)["concept_xac"]
        feats.image = leaves["patches"][:, 2]
        npc = concept_losses(feats, batch, cfg, glob)["concept_npc"]
        assert torch.allclose(xac, npc, atol=1e-6), form


def test_permutations_change_nothing():
    leaves, feats, batch = _global_batch()
    cfg = _cfg(form="softmax", xac_lambda=4.0)
    ref = concept_losses(feats, batch, cfg, "clip")
    gen = torch.Generator().manual_seed(3)
    feats.patches = leaves["patches"][:, torch.randperm(T, generator=gen)]
    perm = torch.randperm(batch.concept_owner.shape[0], generator=gen)
    feats.concepts = leaves["concepts"][perm]
    batch.concept_owner = batch.concept_owner[perm]
    batch.concept_ids = batch.concept_ids[perm]
    out = concept_losses(feats, batch, cfg, "clip")
    for key in ("concept_npc", "concept_xac"):
        assert torch.allclose(out[key], ref[key], atol=1e-6), key


def test_no_concepts_gives_a_connected_zero():
    _, feats, batch = _global_batch()
    feats.concepts = feats.concepts[:0]
    batch.concept_owner = batch.concept_owner[:0]
    batch.concept_ids = batch.concept_ids[:0]
    out = concept_losses(feats, batch, _cfg(), "clip")
    assert out["concept_npc"].item() == 0.0 and out["concept_xac"].item() == 0.0
    (out["concept_npc"] + out["concept_xac"]).backward()  # no error: still part of the graph


# ------------------------------------------------------------------------------- 1 rank == 2 ranks
_GRAD_KEYS = ("image", "patches", "concepts", "scale", "bias")


def _grad(x: torch.Tensor) -> torch.Tensor:
    return x.grad.clone() if x.grad is not None else torch.zeros_like(x)


def _run(leaves, feats, batch, form, glob):
    out = {}
    for term in ("concept_npc", "concept_xac"):
        for v in leaves.values():
            v.grad = None
        cfg = _cfg(form=form, npc_weight=float(term == "concept_npc"), xac_weight=float(term == "concept_xac"),
                   xac_lambda=2.0, memory_budget_mb=1e-6 if form == "softmax" else 512.0)
        loss = concept_losses(feats, batch, cfg, glob)[term]
        loss.backward()
        out[(form, term)] = {"loss": loss.detach(), **{k: _grad(leaves[k]) for k in _GRAD_KEYS}}
    return out


def _rank_case(rank: int, world: int) -> dict:
    out = {}
    for name, split in (("split", SPLIT), ("empty", SPLIT_EMPTY)):
        b, owners, ids = split[rank]
        leaves, feats, batch = _make(b, owners, ids, seed=rank)
        for form, glob in (("sigmoid", "siglip"), ("softmax", "clip")):
            out.update({(name, *k): v for k, v in _run(leaves, feats, batch, form, glob).items()})
    return out


@pytest.mark.slow
def test_one_rank_equals_two_gloo_ranks_with_different_concept_counts():
    ranks = run_on_ranks(_rank_case, 2)
    for name, split in (("split", SPLIT), ("empty", SPLIT_EMPTY)):
        leaves, feats, batch = _global_batch(split)
        single = {}
        for form, glob in (("sigmoid", "siglip"), ("softmax", "clip")):
            single.update(_run(leaves, feats, batch, form, glob))
        for key, ref in single.items():
            r0, r1 = ranks[0][(name, *key)], ranks[1][(name, *key)]
            key = (name, *key)
            # mean of per-rank values = single-process value
            assert torch.allclose((r0["loss"] + r1["loss"]) / 2, ref["loss"], atol=1e-5), key
            # DeepSpeed averages gradients over ranks: each rank's feature gradient / W = single gradient
            for k in ("image", "patches", "concepts"):
                got = torch.cat([r0[k], r1[k]]) / 2
                assert got.shape == ref[k].shape and torch.allclose(got, ref[k], atol=1e-5), (key, k)
            for k in ("scale", "bias"):  # replicated parameters: average of the ranks' gradients
                assert torch.allclose((r0[k] + r1[k]) / 2, ref[k], atol=1e-5), (key, k)
            assert r0["image"].shape[0] == split[0][0] and r0["concepts"].shape[0] == len(split[0][1])
