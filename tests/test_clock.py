"""Intervals are measured on a monotonic clock: a wall clock that steps back (NTP, a node's clock
being fixed by an administrator) must not postpone ``checkpoint.every_minutes`` checkpoints.

The training run is real (1 gloo rank, DeepSpeed on CPU); only the wall clock of its process is
replaced by one that jumps back an hour once the first step has run.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config

STEPS = 5
HOUR = 3600.0


def _stepped_back_job(rank: int, world: int, run_dir: str) -> list[str]:
    """Train STEPS steps with a checkpoint due every 6 ms of elapsed time while ``time.time`` reads an
    hour earlier from the second batch on; returns the checkpoint folders written."""
    from powerclip.train.loop import train

    real_time = time.time
    stepped = {"back": False}

    def wall_clock() -> float:
        return real_time() - (HOUR if stepped["back"] else 0.0)

    time.time = wall_clock  # this spawned process's clock only

    class SteppingLoader(MemoryLoader):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if i == 1:  # the first step ran (and its timed checkpoint was due): now the clock steps
                    stepped["back"] = True
                yield batch

    cfg = tiny_config([f"train.run_dir={run_dir}", "data.batch_size=2", "train.zero_stage=1",
                       f"train.steps={STEPS}", "train.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=1",
                       "checkpoint.every_steps=0", "checkpoint.every_minutes=0.0001",
                       f"checkpoint.keep_last={STEPS + 1}"])
    train(cfg, build_loader=SteppingLoader)
    assert stepped["back"] and time.time() < real_time() - HOUR / 2  # the jump really happened
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir())


def test_every_minutes_checkpoints_continue_after_the_wall_clock_steps_back(tmp_path):
    # the decision is taken as a step starts: a step that starts right after a save may not be due
    # yet, the next one is (a step takes far more than 6 ms), so at least every other step saves. A wall-clock interval reads "minus an hour" after the jump
    # and saves nothing more until the last step (always saved).
    (saved,) = run_on_ranks(_stepped_back_job, 1, str(tmp_path / "run"))
    steps = [int(name.removeprefix("step_")) for name in saved]
    assert steps[-1] == STEPS, saved
    after_jump = [s for s in steps if 1 < s < STEPS]
    assert len(after_jump) >= (STEPS - 2) // 2, f"timed checkpoints stopped after the clock stepped back: {saved}"
