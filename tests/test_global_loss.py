"""Global CLIP / SigLIP losses: against open_clip's losses and a brute-force formula on one process,
and 1 rank vs 2 gloo ranks on the same global batch (loss and gradients)."""

import math

import open_clip
import torch
import torch.nn.functional as F

from powerclip.losses.global_loss import clip_loss, global_loss, siglip_loss
from powerclip.model.features import Features
from tests.dist_helpers import run_on_ranks

G, D = 8, 16


def _global_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(G, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(G, D, generator=g, dtype=torch.float64), dim=-1)
    return {"image": img, "text": txt, "scale": torch.tensor(math.log(10.0), dtype=torch.float64),
            "bias": torch.tensor(-3.0, dtype=torch.float64)}


def _ours(kind: str, image, text, log_scale, bias):
    feats = Features(image=image, text=text, logit_scale=log_scale.exp(), logit_bias=bias)
    return global_loss(feats, kind)


def _leaves(data):
    return [data[k].clone().requires_grad_() for k in ("image", "text", "scale", "bias")]


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def test_clip_matches_open_clip_and_brute_force():
    data = _global_batch()
    img, txt, ls, bias = _leaves(data)
    ours = _ours("clip", img, txt, ls, None)
    ref = open_clip.ClipLoss()(img.float(), txt.float(), ls.exp().float())
    # brute force: the textbook symmetric InfoNCE, one row at a time
    s = ls.exp()
    brute = 0.0
    for i in range(G):
        brute = brute - 0.5 * torch.log_softmax(s * img[i] @ txt.T, 0)[i] / G
        brute = brute - 0.5 * torch.log_softmax(s * txt[i] @ img.T, 0)[i] / G
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.double(), brute, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(ours, [img, txt, ls]), _grads(brute, [img, txt, ls])):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_siglip_matches_open_clip_and_brute_force():
    data = _global_batch()
    img, txt, ls, bias = _leaves(data)
    ours = _ours("siglip", img, txt, ls, bias)
    ref = open_clip.loss.SigLipLoss()(img.float(), txt.float(), ls.exp().float(), bias.float())
    brute = 0.0
    for i in range(G):
        for j in range(G):
            z = 1.0 if i == j else -1.0
            brute = brute - F.logsigmoid(z * (ls.exp() * img[i] @ txt[j] + bias)) / G
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.double(), brute, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(ours, [img, txt, ls, bias]), _grads(brute, [img, txt, ls, bias])):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_siglip_without_bias_fails_clearly():
    data = _global_batch()
    try:
        _ours("siglip", data["image"], data["text"], data["scale"], None)
    except ValueError as e:
        assert "init_logit_bias" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def _rank_case(rank: int, world: int, data: dict) -> dict:
    b = G // world
    chunk = {k: (v[rank * b:(rank + 1) * b] if v.ndim else v) for k, v in data.items()}
    out = {}
    for kind in ("clip", "siglip"):
        img, txt, ls, bias = _leaves(chunk)
        loss = _ours(kind, img, txt, ls, bias if kind == "siglip" else None)
        out[kind] = (loss.detach(), *[None if g is None else g.detach() for g in _grads(loss, [img, txt, ls, bias])])
    # open_clip's own distributed ClipLoss (local_loss + gather_with_grad) on the same ranks
    img, txt, ls, _ = _leaves(chunk)
    ref = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
        img.float(), txt.float(), ls.exp().float())
    out["open_clip"] = ref.detach()
    return out


def test_two_ranks_equal_one_rank():
    data = _global_batch(1)
    r0, r1 = run_on_ranks(_rank_case, 2, data)
    for kind in ("clip", "siglip"):
        img, txt, ls, bias = _leaves(data)
        single = _ours(kind, img, txt, ls, bias if kind == "siglip" else None)
        grads = _grads(single, [img, txt, ls, bias])
        # loss: the mean of the per-rank losses is the single-process loss
        torch.testing.assert_close((r0[kind][0] + r1[kind][0]) / 2, single.detach(), rtol=1e-6, atol=1e-7)
        # feature grads: each rank's chunk carries W x the single-process gradient (the gather's
        # backward sums all ranks); DeepSpeed's mean over ranks divides that W back out
        for idx in (1, 2):
            torch.testing.assert_close(torch.cat([r0[kind][idx], r1[kind][idx]]) / 2, grads[idx - 1],
                                       rtol=1e-5, atol=1e-7)
        # shared scalars (scale, bias): the rank-mean of their gradients is the single-process one
        for idx in ((3, 4) if kind == "siglip" else (3,)):
            torch.testing.assert_close((r0[kind][idx] + r1[kind][idx]) / 2, grads[idx - 1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r0["clip"][0], r0["open_clip"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r1["clip"][0], r1["open_clip"], rtol=1e-6, atol=1e-6)


def test_fp32_inputs_give_fp32_loss():
    data = _global_batch()
    loss = clip_loss(data["image"].half(), data["text"].half(), data["scale"].exp().half())
    assert loss.dtype == torch.float32
    loss = siglip_loss(data["image"].bfloat16(), data["text"].bfloat16(), data["scale"].exp(), data["bias"])
    assert loss.dtype == torch.float32
