"""Launching on a REAL two-node Slurm cluster (brought up by tests/slurm_cluster.py: two slurmd in
their own network namespaces, nodes pcn1 and pcn2 on a private bridge of this machine).

Every job is 2 nodes x 1 CPU task, so rank 0 and rank 1 run on different nodes and reach each other
only through MASTER_ADDR, which must be the first node of the job's node list.

* USR2 (what Slurm sends before the time limit / at preemption) to a ``powerclip submit`` job running
  a toy trainer (fast to start): the rendezvous variables every task sees, submitit calling
  ``TrainJob.checkpoint()`` on rank 0, which only resubmits, and the restart resuming;
* ``sbatch slurm/pretrain.sbatch`` for real on configs/tiny_cpu.yaml (32 px), with its time-limit
  trap fired (and declining, MAX_REQUEUES=0): the uninterrupted reference; each rank logs its node;
* the same tiny training through ``powerclip submit``, requeued with ``scontrol requeue`` as soon as
  its first checkpoint exists: it resumes from the latest checkpoint and its per-step losses equal
  the uninterrupted run's;
* a 2-node job stopped after its first checkpoint and started again on 1 node: the elastic resume
  (2 ranks -> 1, global batch kept) trains to the end;
* a task that dials the wrong MASTER_PORT: the job fails within ``train.dist_timeout_s`` with a
  message naming MASTER_ADDR:MASTER_PORT, instead of hanging.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmUnavailable, ensure_cluster, job_state, toy_expected, wait_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
STEPS = 40  # tiny training: checkpoints every 2 steps; the requeue must land before the end, so the job
# must still be running when `scontrol requeue` reaches it, even on an idle machine
JOB_TIMEOUT = 420  # seconds a single job may take on a 2-core machine busy with another CPU-heavy job
# (a job's start-up alone, Python + torch + DeepSpeed imports on both nodes, took ~4 min there once)


_SUBMITTED: list[str] = []  # job ids these tests started: cancelled at the end if still queued/running


@pytest.fixture(scope="module")
def cluster():
    t0 = time.time()
    try:
        info = ensure_cluster()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster on this machine: {e}")
    print(f"\nSlurm cluster {'started' if info.started else 'reused'} in {time.time() - t0:.1f} s: {info}")
    if len(info.nodes) < 2:
        pytest.skip(f"the Slurm cluster has nodes {info.nodes}; these tests need two")
    yield info
    leftover = [j for j in _SUBMITTED if job_state(j) in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED")]
    if leftover:  # a failed test must not leave its job holding the node's CPUs
        subprocess.run(["scancel", *leftover], capture_output=True, timeout=30)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    env.pop("RANK", None)  # a launcher's variables in the test process must not leak into jobs
    env.pop("WORLD_SIZE", None)
    return env


def _submit(config: Path, run_dir: Path, *overrides: str, entry: str | None = None,
            env: dict[str, str] | None = None) -> str:
    """``powerclip submit`` as a user runs it; returns the job id it prints."""
    cmd = [sys.executable, "-m", "powerclip", "submit", "-c", str(config), f"train.run_dir={run_dir}",
           *overrides, "--nodes", "2", "--tasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--time", "10", "--signal-delay", "60"]
    if entry:
        cmd += ["--entry", entry]
    out = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = re.search(r"submitted job (\d+)", out.stdout)
    assert m, out.stdout
    _SUBMITTED.append(m.group(1))
    assert (run_dir / "config.yaml").is_file()  # resolved config in the run folder at submission
    return m.group(1)


def _results(run_dir: Path, job_id: str, tasks: int = 2) -> list:
    """Every task's result through submitit (errors re-raised with the task's log)."""
    import submitit

    from powerclip.launch.submit import wait_for_result

    job = submitit.SlurmJob(folder=run_dir / "slurm", job_id=job_id, tasks=tuple(range(tasks)))
    return wait_for_result(job, poll_s=0.5, timeout_s=JOB_TIMEOUT)


def _starts(run_dir: Path) -> list[dict]:
    from powerclip.launch.job import read_starts

    return read_starts(run_dir)


def _latest(run_dir: Path) -> str | None:
    p = run_dir / "checkpoints" / "latest"
    return p.read_text().strip() if p.is_file() else None


def _wait_until(cond, timeout: float, what: str, job_id: str, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        state = job_state(job_id)
        assert state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), f"job {job_id} is {state} " \
            f"while waiting for {what}"
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what} (job {job_id} {job_state(job_id)})")


# ----------------------------------------------------------------------------- tiny config
@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory, synthetic_root) -> Path:
    """configs/tiny_cpu.yaml (the preset users run) pointed at the session's synthetic shards,
    STEPS steps, 32 px, batch 8 per rank, no loader workers (2 cores), checkpoints every 2 steps."""
    import yaml

    overrides = {
        "data": {"sources": [{"shards": str(synthetic_root / "train" / "{00000..00002}.tar")}],
                 "batch_size": 8, "workers": 0, "shuffle_buffer": 32},
        "train": {"steps": STEPS, "log_every": 1, "precision": "fp32"},
        "optim": {"warmup_steps": 1, "lr": 1e-3},
        "checkpoint": {"every_steps": 2, "every_minutes": 0.0, "keep_last": 2, "resume": "latest"},
        "eval": {"every_steps": 0},
    }
    data = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    data["model"]["config"]["vision_cfg"]["image_size"] = 32  # the synthetic shards' size
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path_factory.mktemp("slurm_cfg") / "tiny_slurm.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def plain_yaml(tmp_path_factory) -> Path:
    """Smallest valid config for the plumbing entries (they never build the model)."""
    path = tmp_path_factory.mktemp("slurm_plain") / "plain.yaml"
    path.write_text("model: {name: ViT-B-32}\n")
    return path


# ----------------------------------------------------------------------------------- tests
def test_usr2_rendezvous_checkpoint_resubmits_and_resumes(cluster, plain_yaml, tmp_path):
    """A 2-task job through ``powerclip submit`` (toy trainer, fast to start):

    * every task sees RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* exported from the job environment, and
      gloo collectives over them work;
    * USR2 (the time-limit / preemption signal): submitit calls TrainJob.checkpoint() on rank 0,
      which records the requeue in RUN/slurm/requeues.json and only resubmits; the restart resumes
      from the toy checkpoint and ends with the uninterrupted value.
    """
    run = tmp_path / "usr2"
    steps = 12
    t0 = time.time()
    jid = _submit(plain_yaml, run, f"train.steps={steps}", "slurm.max_requeues=2",
                  entry="tests.slurm_cluster:resumable_entry", env=_env(POWERCLIP_TOY_STEP_S="1.0"))  # 9+ s between step 3 and the end: USR2 lands under load
    state = run / "toy_state.json"
    _wait_until(lambda: state.exists() and json.loads(state.read_text())["step"] >= 3, JOB_TIMEOUT,
                "toy step 3", jid)
    subprocess.run(["scancel", "--signal=USR2", jid], check=True, capture_output=True, timeout=30)
    results = _results(run, jid)
    print(f"USR2-requeued toy job {jid}: {time.time() - t0:.1f} s")

    for r in results:
        env = r["env"]
        assert r["world"] == 2
        assert env["RANK"] == str(r["rank"]) and env["LOCAL_RANK"] == "0"
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "1"
        assert env["MASTER_ADDR"] == cluster.nodes[0]  # the first node of the job's node list
        assert env["hostname"] == env["SLURMD_NODENAME"] == cluster.nodes[r["rank"]]
        assert env["MASTER_PORT"] == str(20000 + int(jid) % 20000)
        assert env["SLURM_JOB_ID"] == jid
    assert [r["rank"] for r in results] == [0, 1]
    script = (run / "slurm" / f"{jid}_submission.sh").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR2@60" in script
    assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --nodes=2" in script

    ledger = json.loads((run / "slurm" / "requeues.json").read_text())
    assert ledger["count"] == 1 and ledger["events"][0]["job_id"] == jid
    from submitit.core.utils import DelayedSubmission

    # the resubmitted pickle: our TrainJob again, with submitit's timeout countdown started at
    # slurm.max_requeues (2) and used once (submitit counts any USR2 in a job with a limit under
    # 10 minutes as a time-out)
    resubmitted = DelayedSubmission.load(run / "slurm" / f"{jid}_submitted.pkl")
    assert type(resubmitted.function).__name__ == "TrainJob" and resubmitted._timeout_countdown == 1
    starts = _starts(run)
    assert [s["restart_count"] for s in starts] == [0, 1]
    r0 = results[0]
    assert 3 <= r0["start_step"] < steps
    assert r0["value"] == pytest.approx(toy_expected(steps, 2))
    log = (run / "slurm" / f"{jid}_0_log.err").read_text() + (run / "slurm" / f"{jid}_0_log.out").read_text()
    assert "Calling checkpoint method" in log and "requeuing job" in log


@pytest.fixture(scope="module")
def sbatch_run(cluster, tiny_yaml, tmp_path_factory) -> dict:
    """(c) slurm/pretrain.sbatch for real on the tiny config, uninterrupted (its GPU and CPU counts
    overridden on the command line, as a CPU user would). A USR1 to the batch shell mid-run with
    MAX_REQUEUES=0 shows the trap fires and the script keeps waiting for srun to finish."""
    run = tmp_path_factory.mktemp("slurm_sbatch") / "run"
    run.mkdir()
    log = run.parent / "sbatch-%j.out"
    cmd = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
           "--cpus-per-task=1", "--time=10", f"--output={log}", f"--chdir={REPO}",
           str(REPO / "slurm" / "pretrain.sbatch"), str(tiny_yaml), f"train.run_dir={run}"]
    t0 = time.time()
    out = subprocess.run(cmd, env=_env(PYTHON=sys.executable, MAX_REQUEUES="0"), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    jid = out.stdout.strip().split(";")[0]
    _SUBMITTED.append(jid)
    _wait_until(lambda: _latest(run) is not None, JOB_TIMEOUT, "the first checkpoint", jid)
    first_checkpoint_s = time.time() - t0
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True, capture_output=True, timeout=30)
    state = wait_job(jid, JOB_TIMEOUT)
    seconds = time.time() - t0
    print(f"sbatch template job {jid} (2 nodes x 1 task, {STEPS} steps): {seconds:.1f} s")
    text = Path(str(log).replace("%j", jid)).read_text()
    return {"run": run, "job": jid, "state": state, "log": text, "seconds": seconds,
            "first_checkpoint_s": first_checkpoint_s}


def test_sbatch_template_trains(sbatch_run, cluster):
    text = sbatch_run["log"]
    assert sbatch_run["state"] == "COMPLETED", text[-3000:]
    first, second = cluster.nodes[:2]
    port = 20000 + int(sbatch_run["job"]) % 20000
    assert f"master {first}:{port}" in text  # the batch shell: first host of SLURM_JOB_NODELIST
    for rank, node in ((0, first), (1, second)):
        # the task line of the template, and the trainer's own line, each on a different node
        assert f"RANK={rank} LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR={first} MASTER_PORT={port} on {node}" in text, \
            text[-3000:]
        assert f"powerclip: rank {rank}/2 on {node} (local rank 0, cpu, gloo, master {first}:{port})" in text
    assert "NOT requeueing: 0 restarts already (MAX_REQUEUES=0)" in text
    assert re.search(rf"finished at step {STEPS}: loss [0-9.]+", text), text[-3000:]
    assert _latest(sbatch_run["run"]) == f"step_{STEPS:08d}"


def test_submit_tiny_training_requeued_midway_resumes(sbatch_run, tiny_yaml, tmp_path, cluster):
    """(a)+(b) the tiny training as a 2-task job through ``powerclip submit``, requeued with
    ``scontrol requeue`` as soon as its first checkpoint exists: the restart (same job id) resumes
    from the latest checkpoint, and the result ends with the same final loss as the uninterrupted
    sbatch run of the same config."""
    run = tmp_path / "requeued"
    t0 = time.time()
    jid = _submit(tiny_yaml, run)
    # the same job as the sbatch run up to its first checkpoint: wait for it scaled to what that run
    # measured on this machine at this load (3x, for a load that rises between the two jobs)
    wait_s = max(JOB_TIMEOUT, 3 * sbatch_run["first_checkpoint_s"])
    _wait_until(lambda: _latest(run) is not None, wait_s, "the first checkpoint", jid, poll=0.1)
    at_requeue = _latest(run)
    subprocess.run(["scontrol", "requeue", jid], check=True, capture_output=True, timeout=30)
    results = _results(run, jid)
    print(f"requeued tiny training job {jid}: {time.time() - t0:.1f} s (requeued at {at_requeue})")

    starts = _starts(run)
    assert [s["restart_count"] for s in starts] == [0, 1], starts
    assert {s["job_id"] for s in starts} == {jid} and starts[0]["world_size"] == 2
    assert starts[0]["latest_at_start"] is None
    resumed_from = starts[1]["latest_at_start"]
    assert resumed_from is not None and resumed_from >= at_requeue
    resumed_step = int(resumed_from.split("_")[-1])
    assert 0 < resumed_step < STEPS, "the job finished before the requeue reached it"
    r0, r1 = results
    assert r0["step"] == STEPS and r0["loss"] == pytest.approx(r1["loss"])
    assert len(r0["losses"]) == STEPS - resumed_step  # the restart ran only the remaining steps
    assert _latest(run) == f"step_{STEPS:08d}"
    rank0_log = (run / "slurm" / f"{jid}_0_log.err").read_text()
    rank1_log = (run / "slurm" / f"{jid}_1_log.err").read_text()
    first, second = cluster.nodes[:2]
    assert all(s["host"] == first and s["master"].startswith(f"{first}:") for s in starts), starts
    assert re.search(rf"powerclip: rank 0/2 on {first} \(local rank 0, cpu, gloo, master {first}:\d+\)", rank0_log)
    assert re.search(rf"powerclip: rank 1/2 on {second} \(local rank 0, cpu, gloo, master {first}:\d+\)", rank1_log)
    assert f"resumed from {run}/checkpoints/{resumed_from} at step {resumed_step}" in rank0_log
    # same losses, step by step, as the uninterrupted run (metrics.jsonl is cut back to the
    # checkpoint on resume, so the requeued run's file covers steps 1..STEPS once)
    ref, got = _metrics_losses(sbatch_run["run"]), _metrics_losses(run)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got, ref)
    assert r0["loss"] == pytest.approx(ref[STEPS], rel=1e-5, abs=1e-6)
    assert r0["losses"] == pytest.approx([ref[s] for s in range(resumed_step + 1, STEPS + 1)], rel=1e-5, abs=1e-6)


def _metrics_losses(run: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [int(r["step"]) for r in records]
    assert len(steps) == len(set(steps)), f"duplicate steps in {run}/metrics.jsonl: {steps}"
    return {int(r["step"]): float(r["loss"]) for r in records}


BAD_PORT_SCRIPT = """#!/bin/bash
# 2 nodes x 1 task; the task on the second node dials the wrong rendezvous port (a firewall or a
# MASTER_PORT that differs between nodes look the same to it)
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
srun --kill-on-bad-exit=1 bash -c '
  if [ "$SLURM_PROCID" = 1 ]; then export MASTER_PORT=$((MASTER_PORT + 1)); fi
  exec "$@"' task "$PYTHON" -u -m powerclip train -c "$@"
"""


def test_unreachable_master_port_fails_within_the_timeout(cluster, tiny_yaml, tmp_path):
    timeout_s = 5
    run = tmp_path / "badport"
    script = tmp_path / "badport.sbatch"
    script.write_text(BAD_PORT_SCRIPT)
    log = tmp_path / "badport-%j.out"
    t0 = time.time()
    out = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                          "--time=5", f"--output={log}", f"--chdir={REPO}", str(script), str(tiny_yaml),
                          f"train.run_dir={run}", f"train.dist_timeout_s={timeout_s}"],
                         env=_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    jid = out.stdout.strip().split(";")[0]
    _SUBMITTED.append(jid)
    state = wait_job(jid, JOB_TIMEOUT)
    seconds = time.time() - t0
    text = Path(str(log).replace("%j", jid)).read_text()
    print(f"wrong-port job {jid}: {state} after {seconds:.1f} s (timeout {timeout_s} s)")
    assert state == "FAILED", text[-3000:]
    port = 20000 + int(jid) % 20000
    first = cluster.nodes[0]
    # whichever gives up first (rank 0 waiting for its peer, or rank 1 dialling the wrong port; srun
    # then ends the other) names the rendezvous address it used and the config key of the timeout
    m = re.search(rf"rank ([01]) of 2 could not join the process group at MASTER_ADDR:MASTER_PORT={first}:(\d+) "
                  rf"within {float(timeout_s)} s \(train.dist_timeout_s\)", text)
    assert m, text[-3000:]
    assert int(m.group(2)) == port + int(m.group(1))  # rank 1 dialled port + 1
    assert "powerclip: rank" not in text  # no rank got past the rendezvous
    # start-up (imports on a loaded 2-core machine) + the timeout, not a hang until the time limit
    assert seconds < timeout_s + 120, seconds


def test_job_back_on_fewer_nodes_resumes_elastically(cluster, tiny_yaml, tmp_path):
    """A 2-node job stopped after its first checkpoint (a preemption) comes back as a 1-node job on
    the same run folder: it resumes from the checkpoint through the elastic path (2 ranks -> 1, the
    global batch kept) and trains to the end; every step is logged once."""
    run = tmp_path / "shrunk"
    run.mkdir()

    def sbatch(nodes: int) -> tuple[str, Path]:
        log = tmp_path / f"shrunk-{nodes}-%j.out"
        cmd = ["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", "--gpus-per-node=0",
               "--cpus-per-task=1", "--time=10", f"--output={log}", f"--chdir={REPO}",
               str(REPO / "slurm" / "pretrain.sbatch"), str(tiny_yaml), f"train.run_dir={run}"]
        out = subprocess.run(cmd, env=_env(PYTHON=sys.executable, MAX_REQUEUES="0"), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        jid = out.stdout.strip().split(";")[0]
        _SUBMITTED.append(jid)
        return jid, Path(str(log).replace("%j", jid))

    first, _ = sbatch(2)
    _wait_until(lambda: _latest(run) is not None, JOB_TIMEOUT, "the first checkpoint", first, poll=0.1)
    subprocess.run(["scancel", first], check=True, capture_output=True, timeout=30)
    wait_job(first, JOB_TIMEOUT)
    resumed_from = _latest(run)
    resumed_step = int(resumed_from.split("_")[-1])
    assert 0 < resumed_step < STEPS, "the first job finished before it was stopped"

    second, log = sbatch(1)
    state = wait_job(second, JOB_TIMEOUT)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "powerclip: rank 0/1 on" in text
    assert re.search(rf"elastic resume: {run}/checkpoints/step_\d+ was written by 2 ranks at ZeRO-\d, "
                     r"this run has 1 ranks", text), text[-3000:]
    assert "elastic resume on 1 ranks (checkpoint: 2): global batch 16 kept, data.batch_size 8 -> 16" in text, \
        text[-3000:]
    assert re.search(rf"finished at step {STEPS}: loss [0-9.]+", text), text[-3000:]
    assert _latest(run) == f"step_{STEPS:08d}"
    assert sorted(_metrics_losses(run)) == list(range(1, STEPS + 1))
