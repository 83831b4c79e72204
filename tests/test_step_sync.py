"""One host synchronisation and one collective per training step, counted on 2 real gloo ranks.

The counting wraps ``Tensor.item``-style methods and ``torch.distributed`` collectives; the real calls
still run. A call is attributed to powerclip when its immediate caller is a powerclip source file
(DeepSpeed's own gradient collectives and torch internals are not ours to count). Steps are counted
by difference: a 5-step run minus a 2-step run of the same config, so start-up, the final checkpoint
and shutdown cancel out.
"""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import powerclip
from powerclip.data.batch import Batch
from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config

PKG = str(Path(powerclip.__file__).parent)
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "barrier", "gather", "scatter", "reduce")


class Uint8Loader:
    """Deterministic uint8 batches (what the real loader ships), with skip counters that grow."""

    def __init__(self, cfg, rank: int, world_size: int, state: dict | None = None):
        self.b, self.rank, self.k = cfg.data.batch_size, rank, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 * self.k + self.rank)
            text = torch.zeros(self.b, 77, dtype=torch.long)
            text[:, 0], text[:, 1:6], text[:, 6] = 49406, torch.randint(1, 4000, (self.b, 5), generator=g), 49407
            self.k += 1
            yield Batch(keys=[str(i) for i in range(self.b)], text=text,
                        images=torch.randint(0, 256, (self.b, 3, 32, 32), generator=g, dtype=torch.uint8))

    def state_dict(self) -> dict:
        return {"k": self.k}

    def counters(self) -> dict[str, int]:
        return {"bad_image": self.k, "a_new_reason": 1}


class Counter:
    """Counts calls made from powerclip source files, by kind and by file:line."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.where: collections.Counter[str] = collections.Counter()
        self.saved: list[tuple[object, str, object]] = []

    def _wrap(self, owner, name: str, kind: str) -> None:
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PKG):
                self.calls[kind] += 1
                self.where[f"{kind} {caller.f_code.co_filename[len(PKG) + 1:]}:{caller.f_lineno}"] += 1
            return real(*args, **kwargs)

        self.saved.append((owner, name, real))
        setattr(owner, name, counted)

    def __enter__(self) -> Counter:
        for m in SYNC_METHODS:
            self._wrap(torch.Tensor, m, "sync")
        for c in COLLECTIVES:
            self._wrap(dist, c, "collective")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, real in reversed(self.saved):
            setattr(owner, name, real)


def _count_job(rank: int, world: int, root: str, extra: tuple[str, ...]) -> dict:
    from powerclip.train.loop import train

    out = {}
    for steps in (2, 5):
        cfg = tiny_config([f"train.run_dir={root}/s{steps}", "data.batch_size=4", "train.zero_stage=2",
                           f"train.steps={steps}", "train.log_every=1", "optim.warmup_steps=1",
                           "checkpoint.every_steps=0", "checkpoint.every_minutes=1000", *extra])
        with Counter() as c:
            res = train(cfg, build_loader=Uint8Loader)
        out[steps] = {"calls": dict(c.calls), "where": dict(c.where), "loss": res["losses"]}
    return out


@pytest.mark.slow
def test_one_sync_and_one_collective_per_step(tmp_path: Path):
    results = run_on_ranks(_count_job, 2, str(tmp_path), ())
    for r in results:
        assert all(math.isfinite(v) for v in r[5]["loss"])
        per3 = {k: r[5]["calls"].get(k, 0) - r[2]["calls"].get(k, 0) for k in ("sync", "collective")}
        where = {k: r[5]["where"].get(k, 0) - r[2]["where"].get(k, 0) for k in r[5]["where"]}
        where = {k: v for k, v in where.items() if v}
        assert per3 == {"sync": 3, "collective": 3}, where  # 3 steps: one of each per step


def _reduce_job(rank: int, world: int) -> dict:
    from powerclip.train.step_sync import HostStats, reduce_step

    loss = torch.tensor(1.0 + rank)
    terms = {"a": torch.tensor(2.0 * rank), "b": torch.tensor(3.0)}
    host = HostStats(data_wait_frac=0.1 * (rank + 1), peak_mem_mb=100.0 + rank, step_time_s=1.0 + rank,
                     grad_norm=torch.tensor(5.0), counters={"bad_image": rank + 1, "weird": 2}, valid=True)
    ok = reduce_step(loss, terms, torch.tensor(4.0 + rank), host, time_due=rank == 0)
    nan = reduce_step(torch.tensor(float("nan")) if rank == 1 else loss, terms, torch.tensor(4.0), None,
                      time_due=rank == 1)
    first = reduce_step(loss, terms, torch.tensor(4.0), HostStats(), False)
    return {"ok": ok.__dict__, "nan": nan.__dict__, "first": first.__dict__}


def test_reduce_step_on_two_ranks():
    results = run_on_ranks(_reduce_job, 2)
    for r in results:
        ok = r["ok"]
        assert ok["applied"] and ok["loss"] == 1.5 and ok["terms"] == {"a": 1.0, "b": 3.0}
        assert ok["logit_scale"] == 4.0 and ok["checkpoint_time_due"]  # rank 0's value and clock
        p = ok["previous"]
        assert p["optim/grad_norm"] == 5.0 and p["perf/peak_mem_mb"] == 101.0 and p["perf/step_time_max_s"] == 2.0
        assert math.isclose(p["perf/data_wait_frac"], 0.15) and math.isclose(p["perf/data_wait_frac_max"], 0.2)
        assert p["data/skipped_bad_image"] == 3 and p["data/skipped_other"] == 4 and p["data/skipped_samples"] == 7
        assert not r["nan"]["applied"] and not r["nan"]["checkpoint_time_due"]  # rank 1's clock is not asked
        assert r["first"]["previous"] == {} and r["first"]["applied"]
