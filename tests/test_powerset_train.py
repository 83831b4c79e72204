"""The powerset term through the real trainer: synthetic shards (real parse-tree phrases and random
regions from the data loader), a tiny model, 2 gloo ranks at ZeRO-2; every powerset entry reaches
TensorBoard at every step and the objective actually contributes to the total loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from powerclip.losses.powerset import TERMS
from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config

STEPS = 3


def _job(rank: int, world: int, run_dir: str, synth: str) -> list[float]:
    from powerclip.train.loop import train

    cfg = tiny_config([
        f"data.sources=[{{shards: '{synth}/train/{{00000..00002}}.tar'}}]", "data.batch_size=4",
        "data.workers=0", "data.num_regions=6", "loss.powerset.weight=0.2", "loss.powerset.tau=0.01",
        f"train.run_dir={run_dir}", f"train.steps={STEPS}", "train.zero_stage=2", "train.log_every=1",
        "optim.lr=1e-3", "optim.warmup_steps=1", "checkpoint.every_steps=0"])
    return train(cfg)["losses"]


@pytest.mark.slow
def test_tiny_run_with_powerset_logs_every_term(tmp_path: Path, synthetic_root: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    r0, r1 = run_on_ranks(_job, 2, str(run_dir), str(synthetic_root))
    assert r0 == r1 and len(r0) == STEPS and all(math.isfinite(x) for x in r0)

    events = sorted((run_dir / "tb").glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {run_dir / 'tb'}"
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in TERMS:
        assert f"loss/{name}" in tags, (name, sorted(tags))
        values = [e.value for e in acc.Scalars(f"loss/{name}")]
        assert len(values) == STEPS and all(math.isfinite(v) for v in values), name
    # the objective is in the total: total = clip + 0.2 * powerset, as logged per step
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for rec in recs:
        assert rec["loss/powerset"] > 0
        assert rec["loss"] == pytest.approx(rec["loss/clip"] + 0.2 * rec["loss/powerset"], rel=1e-5)
