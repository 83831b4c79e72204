"""The trainer's own progress: what the loop carries from step to step and a checkpoint restores.

Kept apart from DeepSpeed's state (weights, optimiser, LR schedule, its own step counters) and
from each rank's private state (data cursor, RNG), which the checkpoint stores beside it. The
counters are global (every rank holds the same values), so rank 0's copy in the checkpoint is the
run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_SAVED = ("step", "samples_seen", "skipped_steps")


@dataclass
class TrainState:
    """Optimiser steps taken, samples consumed and steps skipped (non-finite loss) so far.

    ``resumed_step`` is not saved: the step this process started from when it resumed a checkpoint
    (None for a fresh run), which the logger and ``checkpoint.prune_inherited`` need.
    """

    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    resumed_step: int | None = None

    def advance(self, global_batch: int, applied: bool) -> None:
        """One optimiser step done: a skipped step still consumed its ``global_batch`` samples."""
        self.step += 1
        self.samples_seen += global_batch
        self.skipped_steps += 0 if applied else 1

    def state_dict(self) -> dict[str, int]:
        """The saved counters, as plain ints in a fixed key order (the checkpoint's client state)."""
        return {key: int(getattr(self, key)) for key in _SAVED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's counters; this process then counts as resumed at that step."""
        missing = [key for key in _SAVED if key not in state]
        if missing:
            raise KeyError(f"checkpoint client state lacks the trainer counters {missing}")
        for key in _SAVED:
            setattr(self, key, int(state[key]))
        self.resumed_step = self.step

    def prune_before(self, prune_inherited: bool) -> int | None:
        """With ``checkpoint.prune_inherited``: older checkpoints than the resumed one may be pruned."""
        return self.resumed_step if prune_inherited else None
