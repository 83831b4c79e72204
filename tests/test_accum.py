"""Feature-caching accumulation with cached gradients (train/accum.py): the surrogate passes give the
gradient of one big batch, the loss runs ONCE per optimiser step (its FLOPs are those of the big
batch's loss, not A times them), and a negative pool keeps working under accumulation."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from powerclip.config import LossConfig, PowersetLossConfig
from powerclip.data.batch import Batch
from powerclip.losses import pool
from powerclip.losses.composer import compose_losses
from powerclip.model.features import Features
from powerclip.train.accum import cached_loss, concat_batches, surrogate_passes
from tests.test_powerset import _features_batch

G, A = 8, 4


class _Model(torch.nn.Module):
    """A shared projection over fixed raw embeddings: every feature depends on the parameters."""

    def __init__(self, raw: Features):
        super().__init__()
        self.raw = raw
        d = raw.image.shape[1]
        gen = torch.Generator().manual_seed(1)
        dt = raw.image.dtype
        self.proj = torch.nn.Parameter(torch.eye(d, dtype=dt) + 0.2 * torch.randn(d, d, generator=gen, dtype=dt))
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=dt))

    def forward(self, rows: slice) -> Features:
        def f(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x[rows] @ self.proj, dim=-1)

        return Features(image=f(self.raw.image), text=f(self.raw.text), logit_scale=self.log_scale.exp(),
                        patches=f(self.raw.patches), tokens=f(self.raw.tokens))


def _slice(batch: Batch, rows: slice) -> Batch:
    out = {}
    for fl in fields(Batch):
        v = getattr(batch, fl.name)
        out[fl.name] = v[rows] if v is not None else None
    return Batch(**out)


def _cfg(spec: str) -> LossConfig:
    return LossConfig(powerset=PowersetLossConfig(weight=0.5, tau=0.01, margin=0.5, negative_pool=spec))


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def _big(spec: str):
    raw, batch = _features_batch(b=G, seed=4)
    model = _Model(raw)
    loss, _ = compose_losses(model(slice(0, G)), batch, _cfg(spec))
    loss.backward()
    # the loss alone (forward + backward to its input features), for the cost comparison
    with torch.no_grad():
        f = model(slice(0, G))
    leaves = [x.requires_grad_() for x in (f.image, f.text, f.patches, f.tokens)]
    with FlopCounterMode(display=False) as fc:
        again, _ = compose_losses(f, batch, _cfg(spec))
        torch.autograd.grad(again, leaves)
    return loss.detach(), _grads(model), fc.get_total_flops()


def _accumulated(spec: str):
    raw, batch = _features_batch(b=G, seed=4)
    model = _Model(raw)
    rows = [slice(j * (G // A), (j + 1) * (G // A)) for j in range(A)]
    full = concat_batches([_slice(batch, r) for r in rows])
    calls = []

    def compose(f: Features):
        calls.append(1)
        return compose_losses(f, full, _cfg(spec))

    with torch.no_grad():
        cached = [model(r) for r in rows]
    with FlopCounterMode(display=False) as fc:
        loss, _, _, grads = cached_loss(cached, compose)
        g = grads()
    loss_flops = fc.get_total_flops()
    for part in surrogate_passes(rows, model, lambda: g):
        part.backward()
    return loss.detach(), _grads(model), loss_flops, len(calls)


@pytest.mark.parametrize("spec", ["all", "sample:3"])
def test_accumulation_equals_big_batch_and_runs_the_loss_once(spec):
    pool.set_step(5)
    big_loss, big_grads, big_flops = _big(spec)
    acc_loss, acc_grads, acc_flops, calls = _accumulated(spec)
    assert calls == 1  # the loss over A*B rows runs once, not once per micro-batch
    assert acc_loss.item() == pytest.approx(big_loss.item(), rel=1e-6)
    for a, b in zip(acc_grads, big_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(g.abs().max() > 0 for g in big_grads)
    # the loss part of the step costs the big batch's loss once (the surrogates add only dot products)
    assert acc_flops == big_flops


def test_sampled_pool_cost_grows_linearly_with_rows():
    """With a pool that binds, the dense term scores rows x (1 positive + N): doubling the rows at a
    fixed pool doubles the work (4x with the 'all' pool). This is what makes A accumulated
    micro-batches cost A x one micro-batch."""
    from powerclip.losses.powerset import powerset_loss

    def flops(b: int, spec: str) -> int:
        pool.set_step(2)
        feats, batch = _features_batch(b=b, seed=3)
        for f in ("patches", "tokens"):
            getattr(feats, f).requires_grad_(True)
        with FlopCounterMode(display=False) as fc:
            powerset_loss(feats, batch, PowersetLossConfig(weight=1.0, negative_pool=spec))["powerset"].backward()
        return fc.get_total_flops()

    all_ratio = flops(64, "all") / flops(32, "all")
    pool_ratio = flops(64, "sample:16") / flops(32, "sample:16")
    assert all_ratio == pytest.approx(4.0, rel=0.05)
    assert pool_ratio == pytest.approx(2.0, rel=0.02)
