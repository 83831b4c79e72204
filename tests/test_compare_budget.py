"""tools/compare_budget.py (sizing a comparison to a wall-time budget) against schedules worked out by
hand, and tools/compare_methods.py's --budget-minutes end to end: a real probe on this machine, the
refusal of a budget nothing fits, the sizing kept by a rerun, and the steps a known cost scales to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_budget as cb  # noqa: E402
import compare_methods as cm  # noqa: E402


def _job(name: str, seconds: float, *after: str) -> cb.PlannedJob:
    return cb.PlannedJob(name, tuple(after), name, int(seconds))


def test_simulate_is_the_pools_first_in_first_out_schedule():
    # plan order S A D B C; B and C wait for S. Two workers, by hand: S 0-10, A 0-8, D 8-12 (submitted at 0,
    # ahead of B and C), B 10-15, C 12-15: 15 s. One worker: the sum. Many: the critical path S then B.
    jobs = [_job("S", 10), _job("A", 8), _job("D", 4), _job("B", 5, "S"), _job("C", 3, "S")]
    costs = {j.name: cb.Cost(fixed_s=0.0, step_s=1.0) for j in jobs}
    assert cb.simulate(jobs, costs, 2) == 15
    assert cb.simulate(jobs, costs, 1) == 30
    assert cb.simulate(jobs, costs, 9) == 15
    # a fixed part counts once per job: with 2 s more per job on one worker, 10 s more
    assert cb.simulate(jobs, {k: cb.Cost(2.0, 1.0) for k in costs}, 1) == 40
    # FIFO, not shortest-first: a long job queued first delays a short one behind it
    fifo = [_job("L", 10), _job("M", 10), _job("X", 1, "L"), _job("Y", 20)]
    # L 0-10, M 0-10, Y 10-30 (submitted at 0, ahead of X), X 10-11: 30 s
    assert cb.simulate(fifo, {j.name: cb.Cost(0.0, 1.0) for j in fifo}, 2) == 30
    # jobs that become ready when different jobs end queue in that order, not the plan's: S0 and S1 end
    # together at 10; S0 (submitted first) is taken first and queues A0, B0; A0 runs 10-20 in its slot; S1
    # then queues A1, B1 behind B0, which runs 10-40; A1 20-30, B1 30-60. (In plan order, A0 A1 then B0
    # B1, it would end at 50: the comparison's loop submits a job's dependants when that job ends.)
    seeds = [_job("S0", 10), _job("S1", 10), _job("A0", 10, "S0"), _job("A1", 10, "S1"), _job("B0", 30, "S0"),
             _job("B1", 30, "S1")]
    assert cb.simulate(seeds, {j.name: cb.Cost(0.0, 1.0) for j in seeds}, 2) == 60
    with pytest.raises(ValueError, match="not in the plan"):
        cb.simulate([_job("B", 1, "nope")], {"B": cb.Cost(0.0, 1.0)}, 1)
    with pytest.raises(ValueError, match="a cycle"):
        cb.simulate([_job("P", 1, "Q"), _job("Q", 1, "P")], {"P": cb.Cost(0.0, 1.0), "Q": cb.Cost(0.0, 1.0)}, 1)


def test_simulate_runs_the_comparisons_own_plan(tmp_path):
    """The default plan (3 seeds, every arm): each start before the runs it feeds; with every job 1 s and
    workers enough for all, the longest chain is a start, its zeta fit, a PowerCLIP arm: 3 s."""
    args = cm.build_parser().parse_args(["--out", str(tmp_path)])
    jobs = cm.planned(cm.plan(args, tmp_path))
    assert len(jobs) == 3 * (len(cm.ALL_ARMS) + 3)  # two starts and a zeta fit per seed
    ones = {j.workload: cb.Cost(1.0, 0.0) for j in jobs}
    assert cb.simulate(jobs, ones, 100) == 3
    assert cb.simulate(jobs, ones, 1) == len(jobs)
    assert {j.workload: j.steps for j in jobs}["clip"] == 300 and {j.workload: j.steps for j in jobs}["zeta"] == 0


def test_step_time_skips_the_first_third():
    assert cb.step_time([5.0, 4.0, 1.0, 2.0, 3.0, 1.5]) == 1.75  # the median of the last four
    with pytest.raises(ValueError):
        cb.step_time([])


def test_choose_scale_takes_the_largest_plan_inside_the_margin():
    jobs = lambda scale: [cb.PlannedJob("run", (), "w", cb.scaled_steps(100, scale))]  # noqa: E731
    costs = {"w": cb.Cost(fixed_s=0.0, step_s=1.0)}
    # 100 s of steps; inside 0.9 x 100 s: x0.9
    assert cb.choose_scale(100, 0, 0, 1, jobs, costs) == cb.Sizing(0.9, 90.0)
    # 30 s already spent and 10 s of imports leave 50 s: x0.5
    assert cb.choose_scale(100, 30, 10, 1, jobs, costs) == cb.Sizing(0.5, 90.0)
    with pytest.raises(cb.BudgetError, match=r"at 0.25 of its steps is predicted to take 25 s, more than 0.9 of "
                                             r"the budget of 20 s"):
        cb.choose_scale(20, 0, 0, 1, jobs, costs)
    assert cb.scaled_steps(3, 0.25) == 1 and cb.scaled_steps(1200, 0.65) == 780


def _base(out: Path) -> list[str]:
    return ["--out", str(out), "--seeds", "1", "--train-shards", "1", "--per-shard", "16", "--batch", "8",
            "--binding-pairs", "16", "--boot", "200", "--probe-steps", "4", "--jobs", "2"]


def _steps(run: Path) -> int:
    return yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"]


@pytest.mark.slow
def test_budget_probes_this_machine_refuses_what_cannot_fit_and_scales_the_steps(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = _base(out) + ["--arms", "clip_ft", "--scratch-steps", "12", "--pretrain-steps", "12", "--ft-steps", "6"]
    # 3 s: the probe alone takes longer, so no plan fits: one line, after the probe, nothing trained
    with pytest.raises(SystemExit, match=r"^error: --budget-minutes 0.05: the plan at 0.25 of its steps is predicted "
                                         r"to take \d+ s, more than 0.9 of the budget of 3 s \(probe on this machine: "):
        cm.main(argv + ["--budget-minutes", "0.05"])
    measured = json.loads((out / "probe.json").read_text())
    assert set(measured["costs"]) == {"pretrained", "clip_ft"}  # one per workload of the plan
    assert all(c["step_s"] > 0 and c["fixed_s"] > 0 for c in measured["costs"].values())
    assert measured["steps"] == 4 and not (out / "runs").exists() and not (out / "budget.json").exists()
    rows = [json.loads(x) for x in (out / "probe" / "clip_ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["step_s"] > 0 for r in rows)

    # known costs (100 s a step, far above the second or two this rerun spends before sizing) in place of
    # the measured ones, which a rerun reuses. By hand: the start (12 steps), then clip_ft (6): 1,800 s;
    # a budget of 20 min leaves 1,080 s inside the margin. x0.6: 7 + 4 steps, 1,100 s, too long; x0.55:
    # 7 (6.6) + 3 (3.3), 1,000 s
    measured["costs"] = {k: {"fixed_s": 0.0, "step_s": 100.0} for k in measured["costs"]}
    measured["setup_s"] = 0.0
    (out / "probe.json").write_text(json.dumps(measured))
    assert cm.main(argv + ["--budget-minutes", "20"]) == 0
    sized = json.loads((out / "budget.json").read_text())
    assert sized["scale"] == 0.55 and sized["steps"] == {"scratch_steps": 7, "pretrain_steps": 7, "ft_steps": 3}
    assert sized["predicted_s"] == pytest.approx(1000, abs=60)
    assert _steps(out / "runs" / "pretrain" / "seed0") == 7 and _steps(out / "runs" / "clip_ft" / "seed0") == 3
    report = (out / "report.md").read_text()
    assert ("* budget: 20 min: a 4-step probe of each of the plan's 2 workloads (2 at once, " in report
            and "the plan's steps x0.55 (7 from scratch, 7 pretraining, 3 fine-tuning)" in report)
    # a rerun keeps the first sizing whatever budget it is given
    capsys.readouterr()
    assert cm.main(argv + ["--budget-minutes", "0.05"]) == 0
    assert "steps kept from this comparison's first sizing" in capsys.readouterr().out
