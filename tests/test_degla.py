"""DeGLA losses (docs/losses.md §4) against brute-force loops, the released TGC bug, masks and 2 gloo ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from powerclip.config import DeglaLossConfig
from powerclip.data.batch import Batch
from powerclip.losses.degla import TERMS, degla_losses, needs_teacher
from powerclip.model.features import Features
from tests.dist_helpers import run_on_ranks

CFG = DeglaLossConfig(enabled=True)


def _unit(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _case(g: int = 5, n: int = 4, d: int = 8, seed: int = 0, drop: bool = True):
    gen = torch.Generator().manual_seed(seed)
    student = Features(image=_unit(g, d, gen=gen), text=_unit(g, d, gen=gen),
                       logit_scale=torch.tensor(7.0, dtype=torch.float64), negatives=_unit(g, n, d, gen=gen))
    teacher = Features(image=_unit(g, d, gen=gen), text=_unit(g, d, gen=gen),
                       logit_scale=torch.tensor(7.0, dtype=torch.float64), negatives=_unit(g, n, d, gen=gen))
    valid = torch.ones(g, n, dtype=torch.bool)
    if drop:  # samples with fewer than K negatives, one with none at all
        valid[1, 2:] = False
        valid[3, :] = False
    batch = Batch(keys=[str(i) for i in range(g)], images=torch.zeros(g, 3, 2, 2),
                  text=torch.zeros(g, 4, dtype=torch.long), neg_valid=valid)
    return student, teacher, batch


def _nll(logits: list[float], target: int) -> float:
    m = max(logits)
    return -(logits[target] - m - math.log(sum(math.exp(v - m) for v in logits)))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def brute_force(s: Features, t: Features, valid: torch.Tensor, tgc_scale: float) -> dict[str, float]:
    """Plain loops over the flat layout: negative (g, k) is column G + g*K + k."""
    g, k = valid.shape
    sc = float(s.logit_scale)
    flat_neg = s.negatives.reshape(g * k, -1)
    i2t, t2i, igc, tgc = 0.0, 0.0, 0.0, 0.0
    for i in range(g):
        cols = [sc * _dot(s.image[i], s.text[j]) for j in range(g)]
        cols += [sc * _dot(s.image[i], flat_neg[gg * k + kk]) for gg in range(g) for kk in range(k)
                 if valid[gg, kk]]
        i2t += _nll(cols, i)
        t2i += _nll([sc * _dot(s.text[i], s.image[j]) for j in range(g)], i)
        own = [kk for kk in range(k) if valid[i, kk]]
        igc += _nll([sc * _dot(s.image[i], s.text[i])]
                    + [sc * _dot(s.image[i], flat_neg[i * k + kk]) for kk in own], 0)
        tgc += _nll([tgc_scale * _dot(s.text[i], t.text[i])]
                    + [tgc_scale * _dot(s.text[i], flat_neg[i * k + kk]) for kk in own], 0)
    sq, count = 0.0, 0
    for i in range(g):
        sq += float(((s.image[i] - t.image[i]) ** 2).sum()) + float(((s.text[i] - t.text[i]) ** 2).sum())
        count += 2
        for kk in range(k):
            if valid[i, kk]:
                sq += float(((s.negatives[i, kk] - t.negatives[i, kk]) ** 2).sum())
                count += 1
    return {"degla_base": (i2t + t2i) / (2 * g), "degla_igc": igc / g, "degla_tgc": tgc / g,
            "degla_distill": sq / count}


def released_tgc(s: Features, t: Features, k: int, tgc_scale: float) -> torch.Tensor:
    """The released DeGLA code's TGC, counter-example: its mask TILES the identity over the negative
    block (``mask_0.repeat(1, K)``), so caption g meets negatives g, G+g, 2G+g... of the flat
    [G*K] block, which in the interleaved layout (g*K + k) belong to other samples."""
    g = s.text.shape[0]
    columns = torch.cat([t.text, s.negatives.reshape(g * k, -1)])
    logits = tgc_scale * s.text @ columns.T
    mask0 = torch.full((g, g), float("-inf"), dtype=logits.dtype)
    mask0.fill_diagonal_(0)
    logits = logits + torch.cat([mask0, mask0.repeat(1, k)], dim=1)
    return F.cross_entropy(logits, torch.arange(g))


def test_matches_brute_force():
    s, t, batch = _case()
    got = degla_losses(s, t, batch, CFG)
    want = brute_force(s, t, batch.neg_valid, CFG.tgc_scale)
    assert set(got) == set(TERMS)
    for key in TERMS:
        assert got[key].item() == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


def test_tgc_uses_own_negatives_not_the_released_tiling():
    s, t, batch = _case(g=6, n=3, drop=False)
    ours = degla_losses(s, t, batch, CFG)["degla_tgc"].item()
    want = brute_force(s, t, batch.neg_valid, CFG.tgc_scale)["degla_tgc"]
    buggy = released_tgc(s, t, 3, CFG.tgc_scale).item()
    assert ours == pytest.approx(want, rel=1e-6)
    assert abs(buggy - want) > 1e-2, "the counter-example must differ from the correct TGC"
    # the bug is exactly the tiling: store negative (g, k) at flat row k*G + g and the released code
    # computes the correct TGC, so its mask reads the tiled layout, not ours (g*K + k)
    tiled = s.negatives.permute(1, 0, 2).reshape(18, -1).reshape(6, 3, -1)
    s_tiled = Features(image=s.image, text=s.text, logit_scale=s.logit_scale, negatives=tiled)
    assert released_tgc(s_tiled, t, 3, CFG.tgc_scale).item() == pytest.approx(want, rel=1e-6)


def test_invalid_negatives_are_ignored():
    s, t, batch = _case()
    ref = degla_losses(s, t, batch, CFG)
    garbage = s.negatives.clone()
    garbage[~batch.neg_valid] = F.normalize(torch.randn(int((~batch.neg_valid).sum()), 8,
                                                        dtype=torch.float64), dim=-1)
    t_garbage = t.negatives.clone()
    t_garbage[~batch.neg_valid] = 0.0
    s2 = Features(image=s.image, text=s.text, logit_scale=s.logit_scale, negatives=garbage)
    t2 = Features(image=t.image, text=t.text, logit_scale=t.logit_scale, negatives=t_garbage)
    got = degla_losses(s2, t2, batch, CFG)
    for key in TERMS:
        assert got[key].item() == pytest.approx(ref[key].item(), rel=1e-9), key


def test_all_valid_default_and_fewer_slots_equivalence():
    # the last slot invalid everywhere == the same batch built with K-1 slots
    s, t, batch = _case(drop=False)
    batch.neg_valid[:, -1] = False
    short = lambda f: Features(image=f.image, text=f.text, logit_scale=f.logit_scale,  # noqa: E731
                               negatives=f.negatives[:, :-1].contiguous())
    b_short = Batch(keys=batch.keys, images=batch.images, text=batch.text, neg_valid=None)
    a = degla_losses(s, t, batch, CFG)
    b = degla_losses(short(s), short(t), b_short, CFG)
    for key in TERMS:
        assert a[key].item() == pytest.approx(b[key].item(), rel=1e-9), key


def test_sum_reduction_is_the_released_summed_mse():
    # the released recipe: F.mse_loss(student, teacher, reduction="sum") over images, captions and
    # negatives; with our per-vector mean the same weight would be (2G + valid) times weaker
    s, t, batch = _case()
    valid = batch.neg_valid
    want = (F.mse_loss(s.image, t.image, reduction="sum") + F.mse_loss(s.text, t.text, reduction="sum")
            + F.mse_loss(s.negatives[valid], t.negatives[valid], reduction="sum")).item()
    summed = degla_losses(s, t, batch, DeglaLossConfig(enabled=True, distill_reduction="sum"))["degla_distill"]
    mean = degla_losses(s, t, batch, CFG)["degla_distill"]
    assert summed.item() == pytest.approx(want, rel=1e-6)  # the losses sum in fp32
    assert summed.item() == pytest.approx(mean.item() * (2 * 5 + int(valid.sum())), rel=1e-6)


def test_degla_presets_use_the_released_distillation_strength():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("degla_tiny_cpu.yaml", "degla_vitb32_coco.yaml"):
        d = yaml.safe_load((root / name).read_text())["loss"]["degla"]
        assert (d["distill_reduction"], d["distill_weight"]) == ("sum", 0.005), name


def test_teacher_equal_student_gives_zero_distillation():
    s, _, batch = _case()
    out = degla_losses(s, s, batch, CFG)
    assert out["degla_distill"].item() == 0.0
    assert out["degla_tgc"].item() > 0.0  # the negatives still compete


def test_teacher_none_only_for_negclip():
    s, _, batch = _case()
    with pytest.raises(ValueError, match="teacher"):
        degla_losses(s, None, batch, CFG)
    negclip = DeglaLossConfig(enabled=True, tgc_weight=0.0, distill_weight=0.0)
    assert not needs_teacher(negclip) and needs_teacher(CFG)
    out = degla_losses(s, None, batch, negclip)
    assert out["degla_tgc"].item() == 0.0 and out["degla_distill"].item() == 0.0


def test_gradients_do_not_reach_the_teacher():
    s, t, batch = _case()
    for f in (s, t):
        for name in ("image", "text", "negatives"):
            setattr(f, name, getattr(f, name).clone().requires_grad_())
    out = degla_losses(s, t, batch, CFG)
    sum(out.values()).backward()
    assert t.image.grad is None and t.text.grad is None and t.negatives.grad is None
    assert s.negatives.grad[~batch.neg_valid].abs().max() == 0  # masked negatives get no gradient
    assert s.negatives.grad[batch.neg_valid].abs().max() > 0


# ------------------------------------------------------------------ 1 rank vs 2 gloo ranks
G, N, DIN, D = 6, 3, 5, 4


def _global_inputs():
    gen = torch.Generator().manual_seed(3)
    x = {"img": torch.randn(G, DIN, generator=gen), "txt": torch.randn(G, DIN, generator=gen),
         "neg": torch.randn(G, N, DIN, generator=gen), "proj": torch.randn(DIN, D, generator=gen),
         "t_proj": torch.randn(DIN, D, generator=gen)}
    valid = torch.ones(G, N, dtype=torch.bool)
    valid[0, 1:] = False
    valid[4, :] = False
    valid[5, 2] = False
    x["valid"] = valid
    return x


def _run(rows: slice, cfg: DeglaLossConfig = CFG) -> dict:
    """Loss + gradients of a tiny linear 'model' on the rows of the global batch this rank holds."""
    x = _global_inputs()
    proj = x["proj"].clone().requires_grad_()
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)

    def feats(p: torch.Tensor, ls: torch.Tensor) -> Features:
        return Features(image=F.normalize(x["img"][rows] @ p, dim=-1), text=F.normalize(x["txt"][rows] @ p, dim=-1),
                        logit_scale=ls.exp(), negatives=F.normalize(x["neg"][rows] @ p, dim=-1))

    student = feats(proj, log_scale)
    with torch.no_grad():
        teacher = feats(x["t_proj"], log_scale)
    batch = Batch(keys=[], images=torch.zeros(rows.stop - rows.start, 1), text=torch.zeros(1),
                  neg_valid=x["valid"][rows])
    out = degla_losses(student, teacher, batch, cfg)
    total = out["degla_base"] + 0.1 * out["degla_igc"] + 0.1 * out["degla_tgc"] + out["degla_distill"]
    total.backward()
    return {"terms": {k: v.detach() for k, v in out.items()}, "proj_grad": proj.grad, "scale_grad": log_scale.grad}


def _rank_fn(rank: int, world: int, reduction: str = "mean") -> dict:
    b = G // world
    return _run(slice(rank * b, (rank + 1) * b), DeglaLossConfig(enabled=True, distill_reduction=reduction))


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_two_ranks_match_one_rank(reduction: str):
    single = _run(slice(0, G), DeglaLossConfig(enabled=True, distill_reduction=reduction))
    ranks = run_on_ranks(_rank_fn, 2, reduction)
    for key in TERMS:  # mean over ranks of the per-rank values == single-process value
        mean = sum(r["terms"][key] for r in ranks) / 2
        assert mean.item() == pytest.approx(single["terms"][key].item(), rel=1e-5), key
    # DeepSpeed averages gradients over ranks: that average equals the single-process gradient
    avg_grad = sum(r["proj_grad"] for r in ranks) / 2
    torch.testing.assert_close(avg_grad, single["proj_grad"], rtol=1e-5, atol=1e-6)
    avg_scale = sum(r["scale_grad"] for r in ranks) / 2
    torch.testing.assert_close(avg_scale, single["scale_grad"], rtol=1e-5, atol=1e-6)
