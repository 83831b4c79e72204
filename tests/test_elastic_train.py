"""Elastic resume of a whole training run: 2 ranks (ZeRO-2) stop mid-epoch, 1 rank (stage 0) goes on
and stops, 3 ranks (ZeRO-3) finish the epoch. Real shards, real loader, real gloo ranks.

Over the three runs the consumed sample keys are exactly the epoch's keys, each once; the global
batch of 12 is kept (6 per rank, then 12, then 4); losses are finite, the step and samples-seen
counters carry over and the run ends at train.steps. A global batch the new world size does not
divide is refused with a message naming the keys."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from tests.dist_helpers import run_on_ranks
from tests.test_data_elastic import PER_SHARD, SHARDS, six_shards  # noqa: F401 - the shared fixture
from tests.tiny import tiny_config


class RecordingLoader:
    """``powerclip.data.build_loader`` that appends the keys of every batch it hands out to a file."""

    def __init__(self, cfg, rank: int, world_size: int, state=None):
        from powerclip.data import build_loader

        self.inner = build_loader(cfg, rank, world_size, state=state)
        self.log = Path(cfg.train.run_dir) / f"keys_{cfg.train.steps}_{rank}.jsonl"

    def __iter__(self):
        for batch in self.inner:
            with open(self.log, "a") as f:
                f.write(json.dumps(batch.keys) + "\n")
            yield batch

    def state_dict(self):
        return self.inner.state_dict()

    def counters(self):
        return self.inner.counters()


def _cfg(root: str, run: str, steps: int, stage: int, batch: int = 6):
    return tiny_config([f"data.sources=[{{shards: '{root}/train/{{00000..00005}}.tar'}}]",
                        f"data.batch_size={batch}", "data.workers=0", "data.resampled=false",
                        "data.shuffle_buffer=10", f"train.run_dir={run}", f"train.steps={steps}",
                        f"train.zero_stage={stage}", "optim.lr=1e-3", "optim.warmup_steps=1", "train.log_every=1"])


def _job(rank: int, world: int, root: str, run: str, steps: int, stage: int, batch: int = 6) -> dict:
    from powerclip.train.loop import train

    out = train(_cfg(root, run, steps, stage, batch), build_loader=RecordingLoader)
    return {k: out[k] for k in ("step", "samples_seen", "losses")}


def test_two_one_three_ranks_one_epoch(six_shards, tmp_path):  # noqa: F811 - the fixture
    root, run = str(six_shards), str(tmp_path / "run")
    a = run_on_ranks(_job, 2, root, run, 3, 2)[0]  # 36 samples
    b = run_on_ranks(_job, 1, root, run, 5, 0)[0]  # 24 more, batch 12 on one rank
    c = run_on_ranks(_job, 3, root, run, 8, 3)[0]  # the last 36, batch 4 on three ranks
    assert (a["step"], b["step"], c["step"]) == (3, 5, 8)
    assert (a["samples_seen"], b["samples_seen"], c["samples_seen"]) == (36, 60, 96)
    assert len(b["losses"]) == 2 and len(c["losses"]) == 3
    assert all(math.isfinite(x) for x in a["losses"] + b["losses"] + c["losses"])
    per_phase = {}
    for f in sorted(Path(run).glob("keys_*.jsonl")):
        steps = int(f.name.split("_")[1])
        per_phase.setdefault(steps, []).extend(json.loads(line) for line in f.read_text().splitlines())
    assert sorted({len(b) for b in per_phase[3]} | {len(b) for b in per_phase[5]} | {len(b) for b in per_phase[8]}
                  ) == [4, 6, 12]  # the per-rank batch followed the world size
    keys = [k for batches in per_phase.values() for b in batches for k in b]
    assert Counter(keys) == Counter(f"train_{i:08d}" for i in range(SHARDS * PER_SHARD))

    # every checkpoint of the three layouts exports to open_clip (ZeRO-2 x2, stage 0 x1, ZeRO-3 x3)
    from powerclip.export import export_checkpoint

    for tag in ("step_00000003", "step_00000005", "step_00000008"):
        out = export_checkpoint(run, tmp_path / tag, tag=tag)
        assert (Path(out) / "open_clip_model.safetensors").is_file()


def _bad_job(rank: int, world: int, root: str, run: str) -> str:
    from powerclip.config import ConfigError
    from powerclip.train.loop import train

    with pytest.raises(ConfigError) as e:
        train(_cfg(root, run, 6, 2, batch=3), build_loader=RecordingLoader)
    return str(e.value)


def test_global_batch_not_divisible_is_refused(six_shards, tmp_path):  # noqa: F811 - the fixture
    root, run = str(six_shards), str(tmp_path / "run")
    run_on_ranks(_job, 1, root, run, 1, 2, 3)  # global batch 3 on one rank
    msg = run_on_ranks(_bad_job, 2, root, run)[0]
    assert "global batch of 3 on 2 ranks" in msg and "train.keep_global_batch=false" in msg
