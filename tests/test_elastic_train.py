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
from tests.tiny import tiny_config, tiny_model_config


@pytest.mark.slow
def test_torchrun_resume_on_another_nproc_per_node(six_shards, tmp_path):  # noqa: F811 - the fixture
    """The launch path: ``torchrun --nproc_per_node 2`` then ``--nproc_per_node 1`` on one run folder."""
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    cfg = {"data": {"sources": [{"shards": f"{six_shards}/train/{{00000..00005}}.tar"}], "batch_size": 6,
                    "workers": 0, "resampled": False, "shuffle_buffer": 10},
           "model": {"config": tiny_model_config()}, "train": {"steps": 2, "zero_stage": 2, "log_every": 1}}
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    logs = []
    for nproc, steps in ((2, 2), (1, 3)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "--log-dir", str(tmp_path / "torchrun-logs"),  # (its default is a new /tmp folder per launch)
               "-m", "powerclip", "train", "-c", str(config), f"train.run_dir={tmp_path / 'run'}",
               f"train.steps={steps}"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        logs.append(res.stdout + res.stderr)
    assert "global batch 12 kept, data.batch_size 6 -> 12" in logs[1]
    assert "elastic resume" in logs[1]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000003"


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


def test_global_batch_kept_or_refused():
    from powerclip.config import ConfigError
    from powerclip.train.elastic import adjust_global_batch

    cfg = tiny_config(["data.batch_size=6", "train.accum_steps=2"])
    saved = {"world_size": 2, "global_batch": 24}
    assert adjust_global_batch(cfg, saved, 4, True).data.batch_size == 3  # 24 = 4 ranks x 2 x 3
    assert adjust_global_batch(cfg, saved, 2, True) is cfg  # same world size: nothing to adjust
    with pytest.raises(ConfigError, match=r"global batch of 24 on 5 ranks.*train.keep_global_batch=false"):
        adjust_global_batch(cfg, saved, 5, True)
    free = tiny_config(["data.batch_size=6", "train.accum_steps=2", "train.keep_global_batch=false"])
    assert adjust_global_batch(free, saved, 5, True).data.batch_size == 6  # the user's choice
