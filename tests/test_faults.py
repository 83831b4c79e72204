"""Faults and hostile files: nothing lost, nothing executed, nothing hangs.

One real training run (1 gloo rank, ZeRO-2, a checkpoint every step) is made once; each test copies
it and damages the copy. Resumes that need DeepSpeed run together in one spawned process
(``_resume_job``) to keep the suite inside the CI budget.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from powerclip.cli import main as cli_main
from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config

STEPS = 4


def _cfg(run_dir: Path, steps: int = STEPS, extra: tuple[str, ...] = ()):
    return tiny_config([f"train.run_dir={run_dir}", "data.batch_size=2", "train.zero_stage=2",
                        f"train.steps={steps}", "train.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=1",
                        "checkpoint.every_steps=1", "checkpoint.keep_last=3", *extra])


def _train_job(rank: int, world: int, run_dir: str) -> dict:
    from powerclip.train.loop import train

    return {k: v for k, v in train(_cfg(Path(run_dir)), build_loader=MemoryLoader).items() if k != "losses"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """RUN/checkpoints/step_0000000{2,3,4} + latest -> step_00000004, metrics.jsonl of 4 steps."""
    run = tmp_path_factory.mktemp("faults") / "base"
    run_on_ranks(_train_job, 1, str(run))
    return run


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst, symlinks=True)
    return dst


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest): "still there bit for bit"."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


class _Exploit:
    """Unpickling this runs ``open(marker, 'w').write('pwned')``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# ---------------------------------------------------------------------------- 1. code execution
def test_hostile_stage0_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000001"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000001")
    from powerclip.config import save_config

    save_config(tiny_config([f"train.run_dir={run}"]), run)
    marker = tmp_path / "pwned"
    bad = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": _Exploit(marker)}, bad)
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert f"powerclip export: error: {bad}: refusing to load" in out
    assert "would run code" in out
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # model.pretrained and eval --model go through the same consolidation
    from powerclip.eval_io.model_io import load_model
    from powerclip.model.factory import create_model

    with pytest.raises(Exception, match=f"{bad}: refusing to load"):
        create_model(tiny_config([f"model.pretrained={run}"]).model)
    with pytest.raises(FileNotFoundError, match=f"{bad}: refusing to load"):
        load_model(run)
    assert not marker.exists()


def test_hostile_zero_optimizer_shard_is_refused_and_runs_nothing(tmp_path, base_run, capsys):
    run = _copy(base_run, tmp_path / "run")
    shard = run / "checkpoints" / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert shard.is_file()
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "x": _Exploit(marker)}}, shard)
    _reseal(shard)  # an attacker rewrites the manifest too: the load itself must refuse
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert f"powerclip export: error: {shard}: refusing to load" in out
    assert not marker.exists()
    # the untouched earlier checkpoint still exports (weights-only consolidation of real ZeRO-2 shards)
    assert cli_main(["export", str(run), "--tag", "step_00000003", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "open_clip_model.safetensors").is_file()


def _reseal(path: Path) -> None:
    import json

    manifest = path.parent / "checksums.json"
    m = json.loads(manifest.read_text())
    m["files"][path.name] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest.write_text(json.dumps(m))


def test_truncated_and_unreadable_shards_name_the_file(tmp_path, base_run, capsys):
    run = _copy(base_run, tmp_path / "run")
    tag = run / "checkpoints" / "step_00000004"
    shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().out.strip() == (f"powerclip export: error: {shard}: {len(data) // 2} bytes, "
                                               f"the checkpoint wrote {len(data)} (truncated?)")
    _reseal(shard)  # past the checksums (or a checkpoint without them): the load names the file
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"{shard}: unreadable checkpoint file (truncated or corrupted?)" in capsys.readouterr().out
    model = tag / "mp_rank_00_model_states.pt"
    if os.geteuid() != 0:  # root reads chmod-000 files anyway
        model.chmod(0)
        try:
            assert cli_main(["export", str(run), "--tag", "step_00000004", "--out", str(tmp_path / "o")]) == 2
            assert f"{model}: cannot read: Permission denied" in capsys.readouterr().out
        finally:
            model.chmod(0o644)
    model.unlink()  # a file that cannot be opened at all (root's stand-in for chmod 000): a folder
    model.mkdir()
    assert cli_main(["export", str(run), "--tag", "step_00000004", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().out.strip() == \
        f"powerclip export: error: {model}: missing (listed in checksums.json)"


# ------------------------------------------------- 2/3. 'latest' faults, integrity, fallback, pruning
class _Records:
    """Collects powerclip's log lines in the spawned rank (the test asserts on them)."""

    def __init__(self) -> None:
        import logging

        self.lines: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda r: self.lines.append(r.getMessage())  # type: ignore[method-assign]
        logging.getLogger("powerclip").addHandler(handler)
        logging.getLogger("powerclip").setLevel(logging.INFO)


def _resume_job(rank: int, world: int, runs: list[str], steps: int) -> dict:
    """Resume each run to ``steps``; per run the result or the error, and the log lines."""
    from powerclip.train.loop import train

    rec = _Records()
    out = {}
    for run in runs:
        rec.lines.clear()
        try:
            res = train(_cfg(Path(run), steps=steps), build_loader=MemoryLoader)
            out[run] = {"step": res["step"], "log": list(rec.lines)}
        except Exception as e:  # noqa: BLE001 - the test asserts on the message
            out[run] = {"error": f"{type(e).__name__}: {e}", "log": list(rec.lines)}
    return out


def _steps(run: Path, name: str = "metrics.jsonl") -> list[int]:
    import json

    return [json.loads(x)["step"] for x in (run / name).read_text().splitlines()]


def _tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def test_latest_faults_corruption_and_fallback(tmp_path, base_run):
    ck = "checkpoints"
    runs = {name: _copy(base_run, tmp_path / name) for name in
            ("missing", "empty", "dangling", "flipped", "truncated", "killed_save", "none_complete")}
    (runs["missing"] / ck / "latest").unlink()
    (runs["empty"] / ck / "latest").write_text("")
    (runs["dangling"] / ck / "latest").write_text("step_00000009")
    shard = "step_00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray((runs["flipped"] / ck / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (runs["flipped"] / ck / shard).write_bytes(bytes(data))
    (runs["truncated"] / ck / shard).write_bytes(bytes(data[:1000]))
    # what kill -9 in the middle of saving step 4 leaves: latest still on step 3, step 4 unsealed
    (runs["killed_save"] / ck / "latest").write_text("step_00000003")
    (runs["killed_save"] / ck / "step_00000004" / "checksums.json").unlink()
    (runs["killed_save"] / ck / shard).write_bytes(bytes(data[:1000]))
    for tag in ("step_00000002", "step_00000003", "step_00000004"):
        (runs["none_complete"] / ck / tag / "checksums.json").unlink()
    (runs["none_complete"] / ck / "latest").unlink()
    before = {name: _digests(run / ck) for name, run in runs.items()}
    metrics_before = (base_run / "metrics.jsonl").read_text()

    res = run_on_ranks(_resume_job, 1, [str(r) for r in runs.values()], 5)[0]
    res = {name: res[str(run)] for name, run in runs.items()}

    base_tags = ["step_00000002", "step_00000003", "step_00000004"]
    for name, why in (("missing", "latest is missing"), ("empty", "latest is empty"),
                      ("dangling", "latest names 'step_00000009', which does not exist")):
        run, r = runs[name], res[name]
        assert r.get("step") == 5, r
        assert (f"resuming from the newest complete checkpoint {run / ck / 'step_00000004'} instead: "
                f"{run / ck / 'latest'}"[:-len("latest")] + why) in r["log"], r["log"]
        assert f"resumed from {run / ck / 'step_00000004'} at step 4" in r["log"]
        # keep_last=3 spans the restart: the oldest checkpoint of this run went, the others are
        # unchanged bit for bit
        assert _tags(run) == base_tags[1:] + ["step_00000005"]
        now = _digests(run / ck)
        assert {k: v for k, v in now.items() if k.split("/")[0] in base_tags} == \
               {k: v for k, v in before[name].items() if k.split("/")[0] in base_tags[1:]}
        assert _steps(run) == [1, 2, 3, 4, 5]
        assert (run / ck / "latest").read_text() == "step_00000005"

    for name, msg in (("flipped", "sha256 differs from checksums.json (corrupted)"),
                      ("truncated", "1000 bytes, the checkpoint wrote")):
        run, r = runs[name], res[name]
        assert r.get("step") == 5, r
        warn = [x for x in r["log"] if x.startswith("resuming from the newest complete checkpoint")]
        assert len(warn) == 1 and warn[0].startswith(
            f"resuming from the newest complete checkpoint {run / ck / 'step_00000003'} instead: "
            f"{run / ck / shard}: {msg}"), r["log"]
        assert f"resumed from {run / ck / 'step_00000003'} at step 3" in r["log"]
        # the damaged step 4 was moved aside, not overwritten or deleted: its bytes are all still there
        aside = [t for t in _tags(run) if t.startswith("step_00000004.aside-")]
        assert len(aside) == 1
        assert {k.replace(aside[0], "step_00000004", 1): v for k, v in _digests(run / ck).items()
                if k.startswith(aside[0])} == {k: v for k, v in before[name].items()
                                                if k.startswith("step_00000004/")}
        assert _steps(run) == [1, 2, 3, 4, 5]
        assert _steps(run, "metrics.jsonl.cut") == [4]  # the lost step's record is kept, not erased

    r = res["killed_save"]
    assert r.get("step") == 5, r
    assert f"resumed from {runs['killed_save'] / ck / 'step_00000003'} at step 3" in r["log"]
    assert not any(x.startswith("resuming from the newest") for x in r["log"])  # latest was right

    r, run = res["none_complete"], runs["none_complete"]
    assert r["error"].startswith(f"CheckpointIntegrityError: {run / ck}: no complete checkpoint to resume "
                                 f"from ({run / ck / 'latest'} is missing; ")
    assert "refusing to start over it" in r["error"]
    assert _digests(run / ck) == before["none_complete"]  # untouched
    assert (run / "metrics.jsonl").read_text() == metrics_before


def test_export_verifies_checksums_and_refuses_nonfinite(tmp_path, base_run, capsys):
    run = _copy(base_run, tmp_path / "run")
    shard = run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().out.strip() == \
        f"powerclip export: error: {shard}: sha256 differs from checksums.json (corrupted)"
    from powerclip.export import ExportError, export_open_clip
    from powerclip.model import create_model, model_cfg_dict

    cfg = tiny_config()
    model = create_model(cfg.model)
    with torch.no_grad():
        model.clip.visual.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"refusing to export non-finite weights: 1 tensors hold NaN/inf, "
                                          r"e.g. \['visual.conv1.weight'\]"):
        export_open_clip(model, model_cfg_dict(cfg.model), {}, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


# ---------------------------------------------------------------------------- 4. run-folder lock
_HOLD = ("import sys, time\nfrom powerclip.train.run_lock import RunLock\nRunLock(sys.argv[1]).acquire()\n"
         "print('locked', flush=True)\ntime.sleep(600)\n")


def _hold_lock(run: Path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_run_lock_refuses_second_run_and_frees_on_kill_9(tmp_path, base_run):
    import signal
    import socket

    from powerclip.train.run_lock import RunLock, RunLockError

    run = _copy(base_run, tmp_path / "run")
    before = _digests(run)
    holder = _hold_lock(run)
    try:
        from powerclip.train.dist_env import DistEnv
        from powerclip.train.loop import _lock_run_dir  # what train() does first, on every rank

        with pytest.raises(RunLockError) as err:
            _lock_run_dir(run, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                       backend="gloo"))
        host = socket.gethostname()
        assert str(err.value).startswith(f"run folder {run} is in use by another run (pid {holder.pid} "
                                         f"on {host}, since ")
        assert str(err.value).endswith(f"lock file {run}/.powerclip.lock); refusing to start a second run on it")
        after = _digests(run)
        assert {k: v for k, v in after.items() if k != ".powerclip.lock"} == \
               {k: v for k, v in before.items() if k != ".powerclip.lock"}  # nothing written, nothing lost
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(run).acquire()  # the kernel dropped the dead holder's lock
    lock.release()


def test_run_lock_takes_over_stale_locks_of_dead_holders(tmp_path, monkeypatch, caplog):
    import fcntl
    import json
    import subprocess
    import sys

    from powerclip.train.run_lock import LOCK_NAME, RunLock, RunLockError

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"  # the Slurm client's answers for a live and an ended job
    squeue.write_text('#!/bin/sh\nif [ "$3" = 111 ]; then echo RUNNING; exit 0; fi\n'
                      'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    import socket

    cases = [({"host": socket.gethostname(), "pid": int(dead)}, f"pid {dead} no longer exists"),
             ({"host": "node-gone", "pid": 7, "slurm_job_id": "222"}, "Slurm job 222 is no longer running"),
             ({"host": "node-busy", "pid": 7, "slurm_job_id": "111"}, None)]
    for i, (holder, why) in enumerate(cases):
        run = tmp_path / f"run{i}"
        run.mkdir()
        # a lock that outlived its holder (as on NFS): held here, recording the dead holder
        fd = os.open(run / LOCK_NAME, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({**holder, "started": "then"}).encode())
        try:
            if why is None:
                with pytest.raises(RunLockError, match="in use by another run .pid 7 on node-busy, Slurm job 111"):
                    RunLock(run).acquire()
                continue
            with caplog.at_level("WARNING", logger="powerclip"):
                lock = RunLock(run).acquire()
            assert f"taking over a stale lock (pid {holder['pid']} on {holder['host']}" in caplog.text
            assert why in caplog.text
            assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(RunLockError, match=f"pid {os.getpid()} on"):
                RunLock(run).acquire()  # and the new lock is really held
            lock.release()
        finally:
            os.close(fd)


# ------------------------------------------------------- 5. no valid sample: fail, do not spin forever
def _bomb_png() -> bytes:
    """A 10000 x 10000 PNG of zeros: ~100 KB on disk, 100 MP (300 MB as RGB) if decoded."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_with_no_valid_sample_fails_with_shards_and_reasons(tmp_path, workers):
    import json
    import tarfile
    import warnings

    import webdataset as wds
    from PIL import Image

    from powerclip.data import build_loader
    from powerclip.data.loader import DataError

    with tarfile.open(tmp_path / "a_empty.tar", "w"):
        pass
    with wds.TarWriter(str(tmp_path / "b_nojson.tar")) as w:
        w.write({"__key__": "s0", "txt": b"a cat"})
        w.write({"__key__": "s1", "txt": b"a dog"})
    with wds.TarWriter(str(tmp_path / "c_bomb.tar")) as w:
        w.write({"__key__": "bomb", "png": _bomb_png(), "json": json.dumps({"caption": "zeros"}).encode()})
    (tmp_path / "d_garbage.tar").write_bytes(b"\x00not a tar" * 100)
    shards = [str(tmp_path / n) for n in ("a_empty.tar", "b_nojson.tar", "c_bomb.tar", "d_garbage.tar")]
    cfg = tiny_config([f"data.sources=[{{shards: '{tmp_path}/{{a_empty,b_nojson,c_bomb,d_garbage}}.tar'}}]",
                       "data.resampled=false", "data.shard_shuffle=false", f"data.workers={workers}",
                       "data.batch_size=2", "data.shuffle_buffer=1"])
    loader = build_loader(cfg, 0, 1)
    with pytest.raises(DataError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL warns at open; we refuse to decode
        next(iter(loader))
    msg = (f"no valid sample in 3 passes over the 4 shards of rank 0 worker slot 0: {', '.join(shards)}; "
           "skipped samples by reason: bad_image=3, empty_shard=3, missing_json=6, truncated_tar=3")  # 3 rounds
    assert msg in str(err.value)
    from powerclip.errors import one_line

    assert one_line(err.value) == msg  # what `powerclip train` prints, also when a worker raised it


# ---------------------------------------------------------------- 6. config validation, one-line errors
@pytest.mark.parametrize("override, message", [
    ("data.context_length=64", "data.context_length=64 differs from the model's text context length 77 "
                               "(model.config.text_cfg.context_length or model.name)"),
    ("train.log_every=0", "train.log_every must be > 0, got 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
    ("optim.betas=[-0.1, 0.9]", "optim.betas[0] must be in [0, 1), got -0.1"),
    ("data.augment_scale=[0.9, 0.5]", "data.augment_scale must be [min, max] with 0 < min <= max <= 1, "
                                      "got [0.9, 0.5]"),
    ("data.augment_scale=[0.0, 1.0]", "data.augment_scale must be [min, max] with 0 < min <= max <= 1, "
                                      "got [0.0, 1.0]"),
    ("optim.lr=.nan", "optim.lr must be > 0, got nan"),
    ("loss.powerset.margin=.inf", "loss.powerset.margin must be a finite number, got inf"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1], got 2.0"),
    ("model.init_logit_scale=9", "model.init_logit_scale (9.0) must be <= model.logit_scale_max"),
])
def test_config_ranges_are_checked_at_load_time(override, message):
    from powerclip.config import ConfigError

    with pytest.raises(ConfigError) as err:
        tiny_config([override])
    assert str(err.value).startswith(message)


def test_error_after_start_up_is_one_line_naming_the_holder(tmp_path, synthetic_root):
    import subprocess
    import sys

    import yaml

    from tests.tiny import tiny_model_config

    run = tmp_path / "run"
    run.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"config": tiny_model_config()}, "train": {"run_dir": str(run)},
                                      "data": {"sources": [{"shards": str(synthetic_root / "train" / "00000.tar")}]}}))
    holder = _hold_lock(run)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        for k in list(env):  # a plain single process, whatever earlier tests left in os.environ
            if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or k.startswith("SLURM_"):
                env.pop(k)
        proc = subprocess.run([sys.executable, "-m", "powerclip", "train", "-c", str(config)], env=env,
                              capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("powerclip train: error")]
    assert errors == [f"powerclip train: error (rank 0): run folder {run} is in use by another run "
                      f"(pid {holder.pid} on {__import__('socket').gethostname()}, since "
                      + errors[0].split(", since ", 1)[1]] if errors else False, proc.stderr[-3000:]
    assert errors[0].endswith("refusing to start a second run on it")
    assert not (run / "config.yaml").exists()  # refused before anything was written


# ------------------------------------------------- 7. skipped samples logged (first N), dropped fields counted
def test_skips_are_logged_first_n_per_reason_and_dropped_fields_counted(tmp_path, synthetic_root, caplog):
    import json

    import webdataset as wds

    from powerclip.data import build_loader
    from powerclip.data.loader import SKIP_LOG_FIRST
    from powerclip.data.stream import read_shard

    good = list(read_shard(str(synthetic_root / "train" / "00000.tar")))[:4]
    shard = tmp_path / "s.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(SKIP_LOG_FIRST + 2):
            w.write({"__key__": f"nojson_{i}", "png": good[0]["png"]})
        for i, s in enumerate(good):
            ann = json.loads(s["json"])
            ann["phrases"] = [{"label": "NP", "start": 500, "end": 510}, {"label": "NP", "start": 0, "end": 0}]
            ann["concepts"] = [{"text": ""}, {"text": "  "}, {"text": "a thing"}]
            ann["negatives"] = [{"text": ""}, {"text": "a wrong thing"}]
            ann["boxes"] = [[0.0, 0.0, 1.0, 1.0]] * 12 + [[2.0, 2.0, 3.0, 3.0]]  # 10 used, 2 over, 1 outside
            w.write({"__key__": f"good_{i}", "png": s["png"], "json": json.dumps(ann).encode()})
    cfg = tiny_config([f"data.sources=[{{shards: '{shard}'}}]", "data.resampled=false", "data.workers=0",
                       "data.batch_size=4", "data.shuffle_buffer=1", "data.concepts=true", "data.num_negatives=1",
                       "data.region_source=precomputed"])
    loader = build_loader(cfg, 0, 1)
    with caplog.at_level("WARNING", logger="powerclip.data"):
        next(iter(loader))
    logged = [r.getMessage() for r in caplog.records if r.name == "powerclip.data.loader"]
    assert logged == [f"skipped sample nojson_{i} of {shard}: missing_json" for i in range(SKIP_LOG_FIRST)] + \
        ["more samples skipped for missing_json in worker slot 0: counted, no longer logged"]
    assert loader.counters() == {"missing_json": SKIP_LOG_FIRST + 2, "field_phrase_span": 8,
                                 "field_concept_empty": 8, "field_negative_empty": 4,
                                 "field_box_outside_crop": 4, "field_box_over_max": 8}


def test_rare_valid_samples_are_not_mistaken_for_a_barren_stream(tmp_path, synthetic_root):
    from itertools import islice

    import webdataset as wds

    from powerclip.data import build_loader
    from powerclip.data.stream import read_shard

    good = list(read_shard(str(synthetic_root / "train" / "00000.tar")))[0]
    with wds.TarWriter(str(tmp_path / "rare.tar")) as w:
        for i in range(9):
            w.write({"__key__": f"bad_{i}", "png": good["png"]})
            if i == 4:
                w.write({"__key__": "good", "png": good["png"], "json": good["json"]})
    cfg = tiny_config([f"data.sources=[{{shards: '{tmp_path}/rare.tar'}}]", "data.workers=0",
                       "data.batch_size=1", "data.shuffle_buffer=4"])
    loader = build_loader(cfg, 0, 1)
    assert [b.keys for b in islice(iter(loader), 6)] == [["good"]] * 6
    counts = loader.counters()
    assert set(counts) == {"missing_json"} and 9 * 5 <= counts["missing_json"] <= 9 * 6  # 6 visits, all read


# --------------------------------------------- 8. build_shards: links out of the input, truncated input tars
def test_build_shards_refuses_links_leaving_the_input_and_keeps_samples_before_a_cut(tmp_path):
    import io
    import json
    import tarfile

    import webdataset as wds
    from PIL import Image

    from powerclip.data.build import build_shards
    from powerclip.data.stream import read_shard

    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (v, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(1))
    (outside / "secret.txt").write_text("the private caption")
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png(2))
    (src / "a.txt").write_text("a red square")
    (src / "b.png").symlink_to(outside / "secret.png")  # image leaves the folder
    (src / "b.txt").write_text("caption of b")
    (src / "c.png").write_bytes(png(3))
    (src / "c.txt").symlink_to(outside / "secret.txt")  # caption leaves the folder
    (src / "sub" / "d.png").symlink_to(src / "a.png")  # a link inside the folder is fine
    (src / "sub" / "d.txt").write_text("a linked square")
    m = build_shards([str(src)], tmp_path / "out", parser="rule", progress=False)
    assert m["num_samples"] == 2 and m["follow_links"] is False
    assert m["refused_links"] == [
        {"link": str(src / "b.png"), "target": str(outside / "secret.png"), "input": str(src / "b.png")},
        {"link": str(src / "c.txt"), "target": str(outside / "secret.txt"), "input": str(src / "c.png")}]
    caps = {s["txt"].decode() for s in read_shard(str(tmp_path / "out" / "00000.tar"))}
    assert caps == {"a red square", "a linked square"}
    m = build_shards([str(src)], tmp_path / "out_follow", parser="rule", progress=False, follow_links=True)
    assert m["num_samples"] == 4 and m["refused_links"] == []

    # an img2dataset tar cut in the middle: the samples before the cut are kept, the cut one reported
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    with wds.TarWriter(str(i2d / "00000.tar")) as w:
        for i in range(6):
            w.write({"__key__": f"{i:09d}", "png": png(10 * i), "txt": f"sample {i}".encode()})
    data = (i2d / "00000.tar").read_bytes()
    with tarfile.open(i2d / "00000.tar") as tf:
        cut_member = [x for x in tf.getmembers() if x.name == "000000003.png"][0]
    (i2d / "00000.tar").write_bytes(data[: cut_member.offset_data + 20])  # inside sample 3's image
    m = build_shards([str(i2d)], tmp_path / "out_i2d", parser="rule", progress=False)
    caps = sorted(s["txt"].decode() for s in read_shard(str(tmp_path / "out_i2d" / "00000.tar")))
    assert caps == ["sample 0", "sample 1", "sample 2"]
    assert m["num_samples"] == 3
    assert m["skipped"] == [
        {"input": f"{i2d / '00000.tar'}#000000003", "reason": "unreadable: ReadError"},
        {"input": f"{i2d / '00000.tar'}#<truncated after 4 samples: ReadError: unexpected end of data>",
         "reason": "truncated_tar"}]
    assert json.loads((tmp_path / "out_i2d" / "sizes.json").read_text()) == {"00000.tar": 3}


# ------------------------------------------------------------- 9. the LLM key never leaves the process
def test_llm_key_echoed_by_the_server_is_redacted_everywhere(tmp_path, monkeypatch, caplog):
    import json
    import logging
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from powerclip.negatives.llm import ChatClient, LLMError, LLMGenerator, ResponseCache

    secret = "sk-proj-Zx81kQ0wPd93LmA7tYv2"
    calls = []

    class Echo(BaseHTTPRequestHandler):
        """A server that echoes the request's headers back: in an error body, then in its answer."""

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(self.headers.get("Authorization"))
            auth = self.headers.get("Authorization")
            if len(calls) == 1:
                payload = {"error": {"message": f"invalid key; you sent Authorization: {auth}, "
                                                f"api_key={secret}, truncated {secret[:12]}, masked sk-****{secret[-9:]}"}}
                return self._send(401, payload)
            captions = json.loads(body["messages"][-1]["content"])
            answer = [{"id": c["id"], "swap_nouns": f"{c['caption']} {auth}", "replace_nouns": f"{secret} ok"}
                      for c in captions]
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": json.dumps(answer)}}]})

        def _send(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PCLIP_FAULT_KEY", secret)
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1?api_key={secret}"
        client = ChatClient(url, "m", api_key_env="PCLIP_FAULT_KEY", max_retries=0, sleep=lambda s: None)
        cache = ResponseCache(tmp_path / "cache.sqlite")
        gen = LLMGenerator(client, cache, ["swap_nouns", "replace_nouns"], batch_size=2, workers=1)
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(LLMError) as err:
                client.complete([{"role": "user", "content": "[]"}])
            out = gen.generate(["a dog on a sofa", "a cat on a mat"])
        cache.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert calls[0] == f"Bearer {secret}"  # the real key was sent
    assert str(err.value) == (f"http://127.0.0.1:{httpd.server_address[1]}/v1?api_key=[REDACTED]: HTTP 401 "
                              "(not retryable): Error code: 401 - invalid key; you sent Authorization: [REDACTED] "
                              "[REDACTED], api_key=[REDACTED], truncated [REDACTED], masked sk-****[REDACTED]")
    assert out[0] == {"swap_nouns": "a dog on a sofa Bearer [REDACTED]", "replace_nouns": "[REDACTED] ok"}
    stored = (tmp_path / "cache.sqlite").read_bytes()
    for text in (str(err.value), caplog.text, repr(client), json.dumps(out), json.dumps(dict(gen.stats)),
                 stored.decode("latin-1")):
        assert secret not in text and secret[:12] not in text and secret[-9:] not in text


# ------------------------------------------------------ 10. eval: an export whose config disagrees with its weights
def test_eval_refuses_exports_whose_config_disagrees_with_the_weights(tmp_path, caplog, capsys):
    import json

    from powerclip.eval_io.model_io import ExportMismatchError, load_model
    from powerclip.export import export_open_clip
    from powerclip.model import create_model, model_cfg_dict, preprocess_cfg, reference_model

    cfg = tiny_config()
    mc = model_cfg_dict(cfg.model)
    good = export_open_clip(create_model(cfg.model), mc, preprocess_cfg(reference_model(mc)), tmp_path / "good")

    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        shutil.copytree(good, d)
        c = json.loads((d / "open_clip_config.json").read_text())
        edit(c)
        (d / "open_clip_config.json").write_text(json.dumps(c))
        return d

    ctx = variant("ctx", lambda c: c["model_cfg"]["text_cfg"].update(context_length=64))
    img = variant("img", lambda c: c["model_cfg"]["vision_cfg"].update(image_size=64))
    pre = variant("pre", lambda c: c["preprocess_cfg"].update(size=[64, 64]))
    mean = variant("mean", lambda c: c["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5]))
    with pytest.raises(ExportMismatchError) as e:
        load_model(ctx)
    assert str(e.value) == (f"{ctx}: weight positional_embedding has shape [77, 64] but open_clip_config.json "
                            "builds [64, 64] (model_cfg.text_cfg.context_length); refusing to evaluate a model "
                            "its config does not describe")
    with pytest.raises(ExportMismatchError, match=r"weight visual.positional_embedding has shape \[17, 64\] but "
                                                  r"open_clip_config.json builds \[65, 64\] \(model_cfg.vision_cfg"):
        load_model(img)
    with pytest.raises(ExportMismatchError, match=r"preprocess_cfg.size=\[64, 64\] but the model takes \[32, 32\] px"):
        load_model(pre)
    with caplog.at_level("WARNING", logger="powerclip.eval"):
        loaded = load_model(mean)  # a legitimate choice, but not what the model was exported with: warned
    assert loaded.model is not None
    assert (f"{mean / 'open_clip_config.json'}: preprocess_cfg.mean=[0.5, 0.5, 0.5] differs from the model's "
            "default [0.48145466, 0.4578275, 0.40821073]") in caplog.text
    assert cli_main(["eval", "--model", str(ctx), "--task", "synthetic", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"powerclip eval: error: {ctx}: weight positional_embedding has shape [77, 64]")
