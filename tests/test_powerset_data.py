"""The powerset loss on real loader batches from synthetic shards, for every data-side ablation
(tree nodes vs single tokens, random vs stored regions) and every loss-side one (T1 only, T2 only,
singletons only, exact), with gradients reaching the model's parameters."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from powerclip.config import PowersetLossConfig
from powerclip.data import build_loader, model_geometry
from powerclip.data.device import to_device
from powerclip.losses.powerset import TERMS, powerset_loss
from powerclip.model.factory import create_model
from tests.tiny import tiny_config

LOSS_VARIANTS = [{}, {"use_t1": False}, {"use_t2": False}, {"singletons_only": True}, {"exact": True}]


@pytest.mark.parametrize("unit,source", [("tree", "random"), ("token", "precomputed")])
def test_loss_runs_on_loader_batches(synthetic_root: Path, unit: str, source: str):
    cfg = tiny_config([f"data.sources=[{{shards: '{synthetic_root}/train/{{00000..00002}}.tar'}}]",
                       "data.batch_size=6", "data.workers=0", "data.num_regions=5",
                       f"data.phrase_unit={unit}", f"data.region_source={source}"])
    geo = model_geometry(cfg)
    batch = to_device(next(iter(build_loader(cfg, 0, 1))), "cpu", None, geo.mean, geo.std)  # uint8 → normalised
    assert batch.region_masks.shape[1] == 5 and batch.phrase_tokens is not None
    nodes = batch.phrase_tokens & batch.phrase_valid[..., None]
    sizes = nodes.sum(-1)  # tokens per valid node; node 0 is the root (the whole caption)
    if unit == "token":
        assert ((sizes[:, 1:] == 1) | ~batch.phrase_valid[:, 1:]).all()
    else:
        assert (sizes[:, 1:][batch.phrase_valid[:, 1:]] >= 1).all()
    torch.manual_seed(0)
    model = create_model(cfg.model)
    for variant in LOSS_VARIANTS:
        model.zero_grad()
        feats = model(batch, dense=True)
        out = powerset_loss(feats, batch, PowersetLossConfig(weight=1.0, tau=0.01, margin=1.0, **variant))
        assert set(out) == set(TERMS) and all(math.isfinite(v.item()) for v in out.values()), variant
        out["powerset"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), variant
        assert sum(g.abs().sum() for g in grads) > 0, variant
