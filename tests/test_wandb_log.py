"""wandb beside TensorBoard (``log.wandb``), in wandb's offline mode (no network, files in tmp).

* 2 gloo ranks train with log.wandb on: rank 0 alone writes one wandb run, and every scalar the
  TensorBoard event files hold (tag, step, value) is in that run's history, read back from the
  offline ``.wandb`` file (a LevelDB-style log of wandb's protobuf records); a resumed run writes
  into the same wandb run id; the name and tags are the configured ones;
* with log.wandb off, powerclip never imports wandb (a finder that refuses ``wandb`` records who
  asked), and asking for it where it cannot be imported fails with one line naming the extra.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config

# no module-level import of wandb: the spawned ranks import this module, and the "off" test checks
# that nothing imported it


def read_wandb_records(path: Path) -> list:
    """Every protobuf ``Record`` of an offline run's ``run-<id>.wandb`` file.

    The file is a 7-byte header (``:W&B``, magic 0xBEE1, version) followed by 32 KiB blocks of
    chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), LevelDB's log format."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < 7:  # created, header not written yet
        return []
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(path: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """step -> {key: value} of the run's history records, and the run record's id / name / tags."""
    history: dict[int, dict[str, float]] = {}
    run = {}
    # wandb's writer is its own process (wandb-core): ``finish()`` can return before the file holds every
    # record (about 1 run in 30 here: the run record missing at the first read, there a minute later).
    # The run is complete once its exit record is written; wait for that, with room for a busy machine.
    deadline = time.monotonic() + 60
    records = read_wandb_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = read_wandb_records(path)
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
        elif kind == "run":
            run = {"id": rec.run.run_id, "name": rec.run.display_name, "tags": list(rec.run.tags)}
    return history, run


def tensorboard_scalars(tb_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def _cfg(root: str, steps: int, *extra: str):
    return tiny_config([f"train.run_dir={root}/run", "data.batch_size=2", "train.zero_stage=1",
                        f"train.steps={steps}", "train.log_every=1", "checkpoint.every_steps=2",
                        "optim.warmup_steps=1", "log.wandb.enabled=true", "log.wandb.project=powerclip-test",
                        "log.wandb.name=tiny", "log.wandb.tags=[a, b]", *extra])


def _train_job(rank: int, world: int, root: str) -> dict:
    import sys

    from powerclip.train.loop import train

    train(_cfg(root, 3), build_loader=MemoryLoader)
    train(_cfg(root, 5), build_loader=MemoryLoader)  # resumes from the checkpoint of step 3
    return {"imported": "wandb" in sys.modules}


@pytest.mark.slow
def test_every_tensorboard_scalar_reaches_wandb_from_rank_0(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                     ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_on_ranks(_train_job, 2, str(tmp_path))
    run = tmp_path / "run"
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # rank 0 only, once per start; rank 1 wrote none
    rid = (run / "wandb_run_id").read_text().strip()
    assert all(f.name == f"run-{rid}.wandb" for f in files)  # the resumed start continued the same run
    history: dict[int, dict[str, float]] = {}
    for f in files:
        h, meta = wandb_history(f)
        assert meta == {"id": rid, "name": "tiny", "tags": ["a", "b"]}
        for step, items in h.items():
            history.setdefault(step, {}).update(items)
    tb = tensorboard_scalars(run / "tb")
    assert {step for _, step in tb} == {1, 2, 3, 4, 5}
    assert len({tag for tag, _ in tb}) >= 8  # loss, lr, logit scale, perf... all of them
    for (tag, step), value in tb.items():
        assert tag in history[step], (tag, step)
        # TensorBoard stores float32, wandb the float64 that was logged
        assert history[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)


def test_run_logger_sends_evaluation_scalars_to_wandb_too(tmp_path, monkeypatch):
    """The periodic evaluation logs through ``RunLogger.add_scalar``: both sinks get it."""
    pytest.importorskip("wandb")
    from powerclip.config import WandbConfig
    from powerclip.train.logging import RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    logger = RunLogger(tmp_path / "run", True, None, wandb=WandbConfig(enabled=True, id="evalrun"))
    logger.scalars(7, {"loss/total": 0.5})
    logger.add_scalar("eval/synthetic/top1", 0.25, 7)
    logger.flush()
    logger.close()
    history, meta = wandb_history(next((tmp_path / "run").glob("wandb/offline-run-*/run-evalrun.wandb")))
    assert meta["id"] == "evalrun" and meta["name"] == "run"  # name: the run folder's
    assert history[7]["eval/synthetic/top1"] == 0.25 and history[7]["loss/total"] == 0.5
    assert tensorboard_scalars(tmp_path / "run" / "tb") == {("loss/total", 7): 0.5, ("eval/synthetic/top1", 7): 0.25}


# ------------------------------------------------------------------------------ off: no import
def _off_job(rank: int, world: int, root: str) -> dict:
    import importlib.abc
    import sys

    already = "wandb" in sys.modules
    askers: list[str] = []

    class RefuseWandb(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] != "wandb":
                return None
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
            askers.append(frame.f_code.co_filename if frame is not None else "?")
            raise ModuleNotFoundError("No module named 'wandb'", name=name)

    sys.meta_path.insert(0, RefuseWandb())
    import powerclip
    from powerclip.config import ConfigError, WandbConfig
    from powerclip.train.logging import RunLogger
    from powerclip.train.loop import train

    cfg = tiny_config([f"train.run_dir={root}/run", "data.batch_size=2", "train.steps=2", "train.zero_stage=0"])
    losses = train(cfg, build_loader=MemoryLoader)["losses"]
    package = str(Path(powerclip.__file__).parent)
    out = {"already": already, "imported": "wandb" in sys.modules, "losses": losses,
           "powerclip_askers": [a for a in askers if a.startswith(package)]}
    try:
        RunLogger(Path(root) / "on", True, None, wandb=WandbConfig(enabled=True))
    except ConfigError as e:
        out["error"] = str(e)
    out["control"] = [Path(a).name for a in askers if a.startswith(package)]  # the finder does see powerclip
    return out


@pytest.mark.slow
def test_wandb_off_imports_nothing_and_on_without_the_package_fails_in_one_line(tmp_path):
    r = run_on_ranks(_off_job, 1, str(tmp_path))[0]
    assert not r["already"] and len(r["losses"]) == 2
    assert r["powerclip_askers"] == [] and not r["imported"]
    assert r["error"] == ("log.wandb.enabled=true but wandb is not installed: pip install 'powerclip[wandb]' "
                          "(or set log.wandb.enabled=false)")
    assert torch.isfinite(torch.tensor(r["losses"])).all()
    assert r["control"] == ["wandb_log.py"]
