"""One host synchronisation per training step with the method losses on: powerset + NPC + XAC, in the
softmax (CLIP) and the sigmoid (SigLIP) concept forms, on the real loader over synthetic shards.

Counts like tests/test_step_sync.py (calls made from powerclip source files, by file:line, steps by
difference of a long and a short run), and also the operations whose OUTPUT SHAPE depends on tensor
values: boolean-mask indexing, ``nonzero``, ``unique``, ``masked_select``. On a GPU each of those waits
for the device to learn the size, so they are host synchronisations too, though nothing is read.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_on_ranks
from tests.test_step_sync import PKG, Counter
from tests.tiny import tiny_config

SHAPE_FUNCS = ((torch, "nonzero"), (torch.Tensor, "nonzero"), (torch, "unique"), (torch.Tensor, "unique"),
               (torch, "masked_select"), (torch.Tensor, "masked_select"), (torch, "unique_consecutive"))


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class ShapeSyncCounter(Counter):
    """``Counter`` plus value-dependent output shapes (counted as kind ``sync``)."""

    def _wrap_getitem(self) -> None:
        real = torch.Tensor.__getitem__
        counter = self

        def getitem(t, index):
            if _bool_index(index):
                caller = sys._getframe(1)
                if caller.f_code.co_filename.startswith(PKG):
                    counter.calls["sync"] += 1
                    counter.where[f"sync(mask) {caller.f_code.co_filename[len(PKG) + 1:]}:{caller.f_lineno}"] += 1
            return real(t, index)

        self.saved.append((torch.Tensor, "__getitem__", real))
        torch.Tensor.__getitem__ = getitem

    def __enter__(self) -> ShapeSyncCounter:
        super().__enter__()
        for owner, name in SHAPE_FUNCS:
            self._wrap(owner, name, "sync")
        self._wrap_getitem()
        return self


def _job(rank: int, world: int, root: str, shards: str, extra: tuple[str, ...]) -> dict:
    from powerclip.train.loop import train

    out = {}
    for steps in (2, 4):
        cfg = tiny_config([f"data.sources=[{{shards: '{shards}'}}]", "data.batch_size=4", "data.workers=0",
                           "data.shuffle_buffer=8", "data.concepts=true", "data.num_regions=5",
                           "data.max_phrases=8", f"train.run_dir={root}/s{steps}", "train.zero_stage=2",
                           f"train.steps={steps}", "train.log_every=1", "optim.warmup_steps=1",
                           "checkpoint.every_steps=0", "checkpoint.every_minutes=1000",
                           "loss.powerset.weight=0.2", "loss.concept.npc_weight=1.0",
                           "loss.concept.xac_weight=1.0", *extra], image_size=32)
        with ShapeSyncCounter() as c:
            res = train(cfg)
        out[steps] = {"calls": dict(c.calls), "where": dict(c.where), "loss": res["losses"]}
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("form", "world"), [("softmax", 1), ("sigmoid", 1), ("softmax", 2)])
def test_method_losses_one_sync_per_step(tmp_path: Path, synthetic_root: Path, form: str, world: int):
    """1 rank: exactly the step's one sync. 2 ranks: plus ONE size exchange (per-rank phrase and
    concept counts vary; powerset and concept terms share it), read as ``.cpu()`` + ``.tolist()``."""
    glob = "clip" if form == "softmax" else "siglip"
    extra = (f"loss.global_loss={glob}", f"loss.concept.form={form}", "loss.concept.false_negative_fix=true",
             *(("model.init_logit_bias=-10",) if glob == "siglip" else ()))
    shards = f"{synthetic_root}/train/{{00000..00002}}.tar"
    results = run_on_ranks(_job, world, str(tmp_path), shards, extra)
    for r in results:
        assert all(math.isfinite(v) for v in r[4]["loss"])
        where = {k: r[4]["where"].get(k, 0) - r[2]["where"].get(k, 0) for k in r[4]["where"]}
        where = {k: v for k, v in where.items() if v}
        syncs = {k: v for k, v in where.items() if k.startswith("sync")}
        exchange = sum(v for k, v in syncs.items() if k.startswith("sync distributed.py"))
        assert sum(syncs.values()) - exchange == 2, where  # 2 steps: one synchronisation each (step_sync)
        assert exchange == (0 if world == 1 else 2 * 2), where
