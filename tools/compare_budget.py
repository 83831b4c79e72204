"""Sizing tools/compare_methods.py's run to a wall-time budget (``--budget-minutes``).

Why: the GPU mode has to end inside a fixed window on a card whose speed for these tiny models
nobody here has measured (many small processes share one GPU, the loader and the evaluation run on
the host's cores). Step counts chosen by guess either waste the window or overrun it, and an overrun
loses the whole window. So the tool measures before it commits: a probe trains every workload of
the plan (each arm, each kind of start, the zeta fit) for a few steps, as many at once as the
comparison will run, on the machine itself; then the plan's step counts are scaled down (never up:
the plan's are the maximum) until the schedule, simulated with the measured costs, ends inside the
budget with a margin.

What the model of a job's time holds: a fixed part (start-up, data pipeline, the final checkpoint,
export and evaluation: what does not grow with the steps) and a per-step part, both measured under
the probe's concurrency; and once, the workers' imports. The schedule is the comparison's own: jobs
in plan order, each submitted once the jobs it waits for are done, run first-in first-out by a pool
of ``--jobs`` workers.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MARGIN = 0.9  # the simulated wall must end inside this share of the budget (the report, the prediction's error)
MIN_SCALE = 0.25  # below a quarter of the plan's steps the run is another experiment: refused instead
SCALES = [round(1 - 0.05 * i, 2) for i in range(int(round((1 - MIN_SCALE) / 0.05)) + 1)]  # 1.0, 0.95, ... 0.25


@dataclass(frozen=True)
class Cost:
    """One workload's measured cost: ``fixed_s + steps * step_s`` seconds per job."""

    fixed_s: float
    step_s: float

    def seconds(self, steps: int) -> float:
        return self.fixed_s + steps * self.step_s


@dataclass(frozen=True)
class PlannedJob:
    """What the simulation needs of a job: its name, whom it waits for, its workload and its steps."""

    name: str
    after: tuple[str, ...]
    workload: str
    steps: int


def step_time(step_seconds: Sequence[float]) -> float:
    """A probe's time per step: the median of its steps after the first third (the first steps
    carry one-off costs: allocator growth, cuDNN's autotuning, the loader's first shard)."""
    if not step_seconds:
        raise ValueError("no step times to measure")
    return statistics.median(step_seconds[len(step_seconds) // 3:])


def simulate(jobs: Sequence[PlannedJob], costs: dict[str, Cost], workers: int) -> float:
    """Seconds from the first submission to the last job's end: jobs in plan order are submitted
    once every job they wait for has finished, and a pool of ``workers`` runs them first in, first out.
    So the queue's order is the order in which the jobs became ready, not the plan's."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    names = {j.name for j in jobs}
    missing = [f"{j.name} waits for {a}" for j in jobs for a in j.after if a not in names]
    if missing:
        raise ValueError(f"jobs wait for jobs not in the plan: {missing}")
    pending, queue, done = list(jobs), [], set()
    running: list[tuple[float, int, str]] = []  # (end time, submission order, name)
    now, order = 0.0, 0
    while pending or queue or running:
        ready = [j for j in pending if all(a in done for a in j.after)]
        for j in ready:
            pending.remove(j)
            queue.append(j)
        while queue and len(running) < workers:
            j = queue.pop(0)
            heapq.heappush(running, (now + costs[j.workload].seconds(j.steps), order, j.name))
            order += 1
        if not running:
            raise ValueError(f"jobs that can never start (a cycle): {[j.name for j in pending]}")
        # one job ends at a time, as in the comparison's loop (two processes rarely end within one of its
        # turns): its dependants join the queue behind what is already there; of jobs ending together,
        # the one submitted first is taken first
        now, _, name = heapq.heappop(running)
        done.add(name)
    return now


@dataclass(frozen=True)
class Sizing:
    """The chosen scale of the plan's steps and the wall it predicts."""

    scale: float
    predicted_s: float


class BudgetError(ValueError):
    """No plan of at least MIN_SCALE of the steps fits the budget."""


def choose_scale(budget_s: float, spent_s: float, setup_s: float, workers: int,
                 jobs_at: Callable[[float], Sequence[PlannedJob]], costs: dict[str, Cost]) -> Sizing:
    """The largest scale in SCALES whose predicted wall (``spent_s`` already gone + the workers' imports
    + the simulated schedule of ``jobs_at(scale)``) ends inside MARGIN of ``budget_s``.

    Raises BudgetError, with the smallest plan's prediction, when none does."""
    smallest = math.inf
    for scale in SCALES:
        predicted = spent_s + setup_s + simulate(jobs_at(scale), costs, workers)
        if predicted <= MARGIN * budget_s:
            return Sizing(scale, predicted)
        smallest = predicted
    raise BudgetError(f"the plan at {MIN_SCALE:g} of its steps is predicted to take {smallest:.0f} s, more than "
                      f"{MARGIN:g} of the budget of {budget_s:.0f} s")


def scaled_steps(steps: int, scale: float) -> int:
    """``steps`` scaled, at least 1."""
    return max(1, round(steps * scale))
