"""powerclip.launch without a cluster (fast): flags → config → submitit parameters, the rendezvous
variables from submitit's real Slurm job environment (agreeing with the trainer's own Slurm mapping),
the requeue cap, restarts switching to ``latest``, the USR2 guard in forked children, and the sbatch
templates' shared body. The real-cluster tests are in tests/test_slurm.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from powerclip.config import ConfigError, load_config
from powerclip.launch import cli
from powerclip.launch.dist import dist_env_from_job, master_port_for
from powerclip.launch.job import LedgerError, RequeueLedger, TrainJob, _ignore_user_signal_in_children
from powerclip.launch.submit import check_slurm_config, executor_parameters

REPO = Path(__file__).resolve().parents[1]
BASE = ["model.name=ViT-B-32"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    args.extra = rest
    return args


@pytest.mark.parametrize("text,minutes", [("90", 90), ("1:30:00", 90), ("30:00", 30), ("0:00:30", 1),
                                          ("1-12:00:00", 2160), ("2-0", 2880)])
def test_parse_time(text, minutes):
    assert cli.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["abc", "0", "1:2:3:4"])
def test_parse_time_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--time"):
        cli.parse_time(text)


def test_flags_override_config_and_map_to_submitit(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {name: ViT-B-32}\nslurm: {nodes: 1, partition: cpu, time_minutes: 30}\n")
    args = _parse(["-c", str(cfg_file), "slurm.nodes=3", "optim.lr=1e-4", "--nodes", "4",
                   "--gpus-per-node", "8", "--partition", "gpu", "--time", "24:00:00", "--account", "proj",
                   "--setup", "module load cuda/12.1", "--signal-delay", "240", "--max-requeues", "5"])
    cfg = load_config(args.config, [*args.overrides, *args.extra, *cli.slurm_overrides(args)])
    assert cfg.optim.lr == 1e-4
    s = cfg.slurm
    assert (s.nodes, s.gpus_per_node, s.partition, s.time_minutes) == (4, 8, "gpu", 1440)  # flags win
    assert (s.account, s.setup, s.signal_delay_s, s.max_requeues) == ("proj", ["module load cuda/12.1"], 240, 5)
    p = executor_parameters(cfg)
    assert p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8  # one task per GPU
    assert p["nodes"] == 4 and p["timeout_min"] == 1440 and p["slurm_partition"] == "gpu"
    assert p["slurm_signal_delay_s"] == 240 and p["slurm_account"] == "proj"
    assert p["slurm_setup"] == ["module load cuda/12.1"]
    assert p["slurm_additional_parameters"]["requeue"] is True
    assert p["cpus_per_task"] == cfg.data.workers + 1  # not derived from anything the flags said


@pytest.mark.parametrize("overrides, cpus", [(["data.workers=8", "slurm.gpus_per_node=8"], 9),
                                             (["data.workers=0", "slurm.gpus_per_node=1"], 1),
                                             (["data.workers=8", "slurm.gpus_per_node=8",
                                               "slurm.cpus_per_task=4"], 4),  # explicit wins
                                             (["data.workers=8", "slurm.gpus_per_node=0"], 1)])
def test_cpus_per_task_follow_the_loader_workers_on_gpus(overrides, cpus):
    assert executor_parameters(load_config(None, [*BASE, *overrides]))["cpus_per_task"] == cpus


def test_cpu_tasks_when_no_gpus():
    cfg = load_config(None, [*BASE, "slurm.gpus_per_node=0", "slurm.tasks_per_node=2",
                             "slurm.extra={mail-type: END}"])
    p = executor_parameters(cfg)
    assert p["tasks_per_node"] == 2 and "gpus_per_node" not in p
    assert p["cpus_per_task"] == 1  # gloo tasks: the trainer is the bottleneck, cores are scarce
    assert p["slurm_additional_parameters"] == {"requeue": True, "mail-type": "END"}


def test_submitit_accepts_the_parameters(tmp_path):
    """The parameter names are submitit's: AutoExecutor checks every ``slurm_*`` name against its
    Slurm executor even when another backend is chosen (``local`` needs no srun); nothing is submitted.
    The translation into #SBATCH lines is checked on the real cluster (tests/test_slurm.py)."""
    from powerclip.launch.submit import make_executor

    cfg = load_config(None, [*BASE, f"train.run_dir={tmp_path}", "slurm.gpus_per_node=4", "slurm.qos=high",
                             "slurm.mem_gb=64", "slurm.constraint=a100", "slurm.exclude=n1",
                             "slurm.account=proj", "slurm.partition=gpu", "slurm.setup=[module load x]"])
    ex = make_executor(cfg, cluster="local")
    assert ex.cluster == "local"
    assert (tmp_path / "slurm").is_dir()
    with pytest.raises(NameError, match="no_such_option"):  # and it would catch a wrong name
        ex.update_parameters(slurm_no_such_option=1)


@pytest.mark.parametrize("override,match", [("slurm.nodes=0", "slurm.nodes"),
                                            ("slurm.signal_delay_s=3600", "below the time limit"),
                                            ("slurm.gpus_per_node=-1", "slurm.gpus_per_node"),
                                            ("slurm.cpus_per_task=-1", "slurm.cpus_per_task")])
def test_bad_slurm_config(override, match):
    cfg = load_config(None, [*BASE, "slurm.time_minutes=60", override])
    with pytest.raises(ConfigError, match=match):
        check_slurm_config(cfg)


SLURM_TASK_ENV = {"SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
                  "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "9",
                  "SLURM_LOCALID": "1", "SLURM_NTASKS": "16", "SUBMITIT_EXECUTOR": "slurm"}


def test_rendezvous_from_submitit_job_environment(monkeypatch):
    """submitit's real SlurmJobEnvironment over a task's SLURM_* variables (rank 9 of 2x8)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    for k, v in SLURM_TASK_ENV.items():
        monkeypatch.setenv(k, v)
    values = dist_env_from_job(SlurmJobEnvironment())
    assert values == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                      "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 12345 % 20000)}
    assert master_port_for("12345_3") == 32345 and master_port_for("7", fixed=29500) == 29500


def test_port_and_master_agree_with_trainer_slurm_mapping(monkeypatch):
    """The sbatch path (trainer maps SLURM_* itself) and the submitit path pick the same master."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    from powerclip.train.dist_env import export_env_from_launcher

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "x")  # recorded, so the values the trainer's mapping sets are undone
        monkeypatch.delenv(k)
    for k, v in SLURM_TASK_ENV.items():
        monkeypatch.setenv(k, v)
    ours = dist_env_from_job(SlurmJobEnvironment())
    export_env_from_launcher()
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        assert os.environ[k] == ours[k], k


def test_checkpoint_only_resubmits_up_to_the_cap(tmp_path, monkeypatch):
    import submitit

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    cfg = load_config(None, [*BASE, f"train.run_dir={tmp_path}", "slurm.max_requeues=2"])
    job = TrainJob(cfg, entry="tests.slurm_cluster:resumable_entry")
    first, second, third = job.checkpoint(), job.checkpoint(), job.checkpoint()
    assert isinstance(first, submitit.helpers.DelayedSubmission) and first.function is job
    assert isinstance(second, submitit.helpers.DelayedSubmission)
    assert third is None  # cap reached: submitit ends the job instead of requeuing
    ledger = RequeueLedger(tmp_path).read()
    assert ledger["count"] == 2 and [e["job_id"] for e in ledger["events"]] == ["77", "77"]
    assert not (tmp_path / "checkpoints").exists()  # no save from the signal handler
    # the cap lives in the run folder: a new submission of the same run shares it
    assert TrainJob(cfg).checkpoint() is None


@pytest.mark.parametrize("text", ['{"count": "1", "events": []}', '{"count": 1, "events": null}', "[1]", "{bad"])
def test_requeue_ledger_of_another_shape_stops_requeueing_naming_the_file(tmp_path, monkeypatch, caplog, text):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    cfg = load_config(None, [*BASE, f"train.run_dir={tmp_path}", "slurm.max_requeues=2"])
    ledger = RequeueLedger(tmp_path)
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_text(text)
    with pytest.raises(LedgerError, match=f"^{ledger.path}: (malformed|unreadable) .*; fix or delete it$"):
        ledger.read()
    assert TrainJob(cfg).checkpoint() is None  # no requeue on a cap that cannot be read, no traceback
    assert f"not requeuing job 77: {ledger.path}: " in caplog.text
    assert ledger.path.read_text() == text  # left for the user to look at


def test_start_records_skip_damaged_lines_and_name_a_damaged_latest(tmp_path):
    from powerclip.launch.job import latest_text, read_starts

    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "starts.jsonl").write_text('{"job_id": "1"}\n[1]\n{"job_id": "2", "cut\n7\n')
    assert read_starts(tmp_path) == [{"job_id": "1"}]
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\xfe")
    assert latest_text(tmp_path / "checkpoints" / "latest").startswith(f"damaged: {tmp_path}/checkpoints/latest: ")


def test_restart_resumes_from_latest_whatever_resume_said(tmp_path, monkeypatch):
    cfg = load_config(None, [*BASE, f"train.run_dir={tmp_path}", "checkpoint.resume=/pretrained/run"])
    job = TrainJob(cfg)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert job._cfg_for_this_start().checkpoint.resume == "/pretrained/run"  # not under Slurm
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert job._cfg_for_this_start().checkpoint.resume == "/pretrained/run"  # first start
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    # requeued before this run saved anything: still the submitted source
    assert job._cfg_for_this_start().checkpoint.resume == "/pretrained/run"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000010")
    assert job._cfg_for_this_start().checkpoint.resume == "latest"  # a requeued restart
    assert job.cfg.checkpoint.resume == "/pretrained/run"  # the submitted config is untouched


def test_user_signal_ignored_in_forked_children(tmp_path):
    """Slurm signals every process of the step; only the task's own process may run checkpoint()."""
    marker = tmp_path / "calls"
    previous = signal.getsignal(signal.SIGUSR2)

    def handler(sig, frame):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")

    try:
        signal.signal(signal.SIGUSR2, handler)
        _ignore_user_signal_in_children(signal.SIGUSR2)
        pid = os.fork()
        if pid == 0:  # child: wait for the signal, then leave without running pytest's teardown
            try:
                time.sleep(1)
            finally:
                os._exit(0)
        time.sleep(0.3)
        os.kill(pid, signal.SIGUSR2)
        os.waitpid(pid, 0)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.1)
        assert marker.read_text().split() == [str(os.getpid())]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sbatch_templates_share_the_tested_body():
    """test_slurm.py runs pretrain.sbatch for real; every template must carry the same body."""
    texts = {p.name: p.read_text() for p in sorted((REPO / "slurm").glob("*.sbatch"))}
    assert {"pretrain.sbatch", "degla.sbatch"} <= set(texts)
    bodies = {name: t[t.index("# ---- body"):] for name, t in texts.items()}
    assert len(set(bodies.values())) == 1, "template bodies differ; keep them identical"
    for name, text in texts.items():
        assert subprocess.run(["bash", "-n", str(REPO / "slurm" / name)]).returncode == 0, name
        header = text[:text.index("# ---- body")]
        for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@", "#SBATCH --open-mode=append"):
            assert line in header, (name, line)
        tasks = int(header.split("--ntasks-per-node=")[1].split()[0])
        gpus = int(header.split("--gpus-per-node=")[1].split()[0])
        assert tasks == gpus, f"{name}: one task per GPU"
    body = next(iter(bodies.values()))
    for needle in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "scontrol show hostnames",
                   "-m powerclip train", "scontrol requeue", "export TORCH_NCCL_ASYNC_ERROR_HANDLING=",
                   "export NCCL_DEBUG=", "train.dist_timeout_s="):
        assert needle in body


def test_sbatch_passes_the_timeout_override_only_when_asked(tmp_path):
    """Run the template's body with stand-in srun/scontrol: DIST_TIMEOUT_S becomes a config override."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho nodeA\n")
    # srun: run the task command once, as rank 0, printing the argv the trainer would get
    (bin_dir / "srun").write_text("#!/bin/bash\nshift\nexport SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1\n"
                                  "\"$@\"\n")
    (bin_dir / "python").write_text("#!/bin/sh\necho \"ARGS $* NCCL=$NCCL_DEBUG ASYNC=$TORCH_NCCL_ASYNC_ERROR_HANDLING\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "nodeA",
           "SLURM_NTASKS": "1"}
    script = str(REPO / "slurm" / "pretrain.sbatch")
    plain = subprocess.run(["bash", script, "cfg.yaml", "a=1"], env=env, capture_output=True, text=True, timeout=60)
    assert "ARGS -u -m powerclip train -c cfg.yaml a=1 NCCL=WARN ASYNC=1" in plain.stdout, plain.stdout + plain.stderr
    env.update(DIST_TIMEOUT_S="45", NCCL_DEBUG="INFO")
    timed = subprocess.run(["bash", script, "cfg.yaml"], env=env, capture_output=True, text=True, timeout=60)
    assert "ARGS -u -m powerclip train -c cfg.yaml train.dist_timeout_s=45 NCCL=INFO ASYNC=1" in timed.stdout, \
        timed.stdout + timed.stderr


# ------------------------------------------------------------ the trainer's launcher detection
SLURM_2x4 = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "PATH": "/nonexistent"}  # no scontrol: parsed here


@pytest.mark.parametrize("environ, expected", [
    # srun alone: everything from Slurm
    (SLURM_2x4, {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                 "MASTER_PORT": str(20000 + 123456 % 20000)}),
    # torchrun / deepspeed launcher: complete, nothing added even inside a Slurm allocation
    ({**SLURM_2x4, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, {}),
    # a launcher that sets RANK/WORLD_SIZE only: local rank and master from Slurm, not 0 / 127.0.0.1
    ({**SLURM_2x4, "RANK": "5", "WORLD_SIZE": "8"},
     {"LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}),
    # ... with MASTER_ADDR set but no port: the job's port
    ({**SLURM_2x4, "RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "login1"},
     {"LOCAL_RANK": "1", "MASTER_PORT": str(20000 + 123456 % 20000)}),
    # RANK/WORLD_SIZE without any Slurm variable: local rank = rank (then modulo the visible GPUs)
    ({"RANK": "3", "WORLD_SIZE": "4", "PATH": "/nonexistent"},
     {"LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}),
    # SLURM_STEP_NODELIST (this step's nodes) wins over the job's node list
    ({**SLURM_2x4, "SLURM_STEP_NODELIST": "gpu08,gpu09"},
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu08",
      "MASTER_PORT": str(20000 + 123456 % 20000)}),
    # a Slurm array job id "123_4" uses the main id for the port
    ({**SLURM_2x4, "SLURM_JOB_ID": "123_4"},
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "20123"}),
])
def test_launcher_env_combinations(environ, expected):
    from powerclip.train.dist_env import launcher_env

    assert launcher_env(environ) == expected


def test_launcher_env_single_process():
    from powerclip.train.dist_env import launcher_env

    got = launcher_env({"PATH": "/nonexistent"})
    assert {k: got[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(got["MASTER_PORT"]) < 65536
    assert "MASTER_PORT" not in launcher_env({"PATH": "/nonexistent", "MASTER_PORT": "4242"})  # kept


def test_free_port_can_be_bound_at_once():
    """The one port picker (rendezvous of single-process runs, tests, benchmarks) gives a usable port."""
    import socket

    from powerclip.train.dist_env import free_port

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises OSError (address in use) if the picker's socket still held it
        s.listen()
        assert s.getsockname()[1] == port


@pytest.mark.parametrize("nodelist, first", [("gpu[07-08],cpu1", "gpu07"), ("node3", "node3"),
                                             ("a-b[3,5-6]", "a-b3"), ("x1,x2", "x1")])
def test_first_host_without_scontrol(monkeypatch, nodelist, first):
    from powerclip.train.dist_env import first_host

    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host(nodelist) == first


@pytest.mark.parametrize("local_rank, visible, index", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1), (9, 4, 1)])
def test_cuda_index_is_local_rank_modulo_visible_devices(local_rank, visible, index):
    from powerclip.train.dist_env import cuda_index

    assert cuda_index(local_rank, visible) == index


def test_cuda_index_without_visible_devices():
    from powerclip.train.dist_env import cuda_index

    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES"):
        cuda_index(0, 0)


def test_rendezvous_failure_names_master_and_timeout(monkeypatch):
    """Rank 1 of 2 dialling a port where no rank 0 listens fails after train.dist_timeout_s, naming it."""
    from powerclip.train.dist_env import free_port, init_distributed

    port = free_port()  # a port nobody listens on
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    with pytest.raises(RuntimeError, match=rf"rank 1 of 2 could not join the process group at "
                                           rf"MASTER_ADDR:MASTER_PORT=127.0.0.1:{port} within 3 s"):
        init_distributed(timeout_s=3)
    assert time.time() - t0 < 120  # the timeout, not torch's default 30 min
