"""The run folder across restarts: a resume that is refused changes nothing, every file read back is
checked against its schema, a full or read-only disk is one line, and ``keep_last`` bounds the
folder across restarts without touching another run's checkpoints.

Real tiny runs (1 gloo rank, DeepSpeed ZeRO-2 on CPU, a checkpoint every step); each process start
is a separate spawned process, because "what this process wrote" must not carry over between
restarts. The disk tests mount a small tmpfs (root only; skipped with the reason otherwise).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from powerclip.checkpoints import integrity, layout, ownership
from powerclip.cli import main as cli_main
from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config

CK = "checkpoints"


def _cfg(run_dir: Path, steps: int, extra: tuple[str, ...] = (), **model):
    return tiny_config([f"train.run_dir={run_dir}", "data.batch_size=2", "train.zero_stage=2",
                        f"train.steps={steps}", "train.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=1",
                        "checkpoint.every_steps=1", *extra], **model)


def _train_jobs(rank: int, world: int, jobs: list[dict]) -> list[dict]:
    """Run each job (run_dir, steps, extra overrides, model kwargs, optional remount) in turn, in
    this one process; per job the final step or the error as ``Type: message``."""
    from powerclip.train.loop import train

    out = []
    for job in jobs:
        if job.get("remount"):
            subprocess.run(["mount", "-o", f"remount,size={job['remount']}", job["mount"]], check=True)
        try:
            res = train(_cfg(Path(job["run"]), job["steps"], tuple(job.get("extra", ())), **job.get("model", {})),
                        build_loader=MemoryLoader)
            out.append({"step": res["step"]})
        except Exception as e:  # noqa: BLE001 - the test asserts on the message
            out.append({"error": f"{type(e).__name__}: {e}"})
    return out


def _run(jobs: list[dict]) -> list[dict]:
    return run_on_ranks(_train_jobs, 1, jobs)[0]


def _digests(root: Path, skip: tuple[str, ...] = (".powerclip.lock",)) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def _tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / CK).iterdir() if p.is_dir())


def _reseal(tag_dir: Path) -> None:
    """Rewrite checksums.json to match the folder (what a careful forger does)."""
    files = {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": integrity.file_sha256(p)}
             for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != integrity.MANIFEST}
    (tag_dir / integrity.MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """RUN with checkpoints step_00000001..3 (keep_last 3), latest -> step_00000003."""
    run = tmp_path_factory.mktemp("run_folder") / "base"
    assert _run([{"run": str(run), "steps": 3}]) == [{"step": 3}]
    return run


@pytest.mark.slow
# ----------------------------------------------------------------- a changed model is refused first
def test_resume_with_another_model_shape_is_refused_before_anything_changes(tmp_path, base_run, capsys):
    runs = {name: tmp_path / name for name in ("embed", "layers")}
    for run in runs.values():
        shutil.copytree(base_run, run)
    before = {name: _digests(run) for name, run in runs.items()}
    res = _run([{"run": str(runs["embed"]), "steps": 4, "model": {"embed_dim": 32}},
                {"run": str(runs["layers"]), "steps": 4, "extra": ["model.config.vision_cfg.layers=3"]}])
    tag = runs["embed"] / CK / "step_00000003"
    err = res[0]["error"]
    assert err.startswith(f"ConfigError: cannot resume {tag}: it holds another model shape (model.config.embed_dim "
                          "is 32 in the config, 64 in the checkpoint: "), err
    assert "parameter(s) differ in shape, e.g." in err and "model.pretrained=<this run> checkpoint.resume=none" in err
    assert "\n" not in err
    err = res[1]["error"]
    assert "model.config.vision_cfg.layers is 3 in the config, 2 in the checkpoint: the parameters differ: " in err
    assert "only in this model (e.g. clip.visual.transformer.resblocks.2." in err
    for name, run in runs.items():  # config.yaml, metrics, checkpoints: all as they were
        assert _digests(run) == before[name]
    # so the run still exports with its own config (the refused config was never saved)
    assert cli_main(["export", str(runs["embed"]), "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()


# ------------------------------------------------------------------- schema of every file read back
MALFORMED_MANIFESTS = {
    "files_list": {"files": []},
    "entry_int": {"files": {"mp_rank_00_model_states.pt": 5}},
    "files_null": {"files": None},
    "top_list": [1, 2],
    "no_files": {"algorithm": "sha256"},
    "escaping_name": {"files": {"../../config.yaml": {"size": 1, "sha256": "0" * 64}}},
    "size_str": {"files": {"run.json": {"size": "46", "sha256": "0" * 64}}},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MALFORMED_MANIFESTS))
def test_malformed_manifest_is_a_damaged_checkpoint_for_export(tmp_path, base_run, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    manifest = run / CK / "step_00000003" / integrity.MANIFEST
    manifest.write_text(json.dumps(MALFORMED_MANIFESTS[case]))
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"powerclip export: error: {manifest}: malformed checksums.json: "), out
    assert "\n" not in out and not (tmp_path / "out").exists()
    with pytest.raises(integrity.CheckpointIntegrityError, match="malformed checksums.json"):
        integrity.verify(manifest.parent)
    # an older intact checkpoint of the same run still exports
    assert cli_main(["export", str(run), "--tag", "step_00000002", "--out", str(tmp_path / "ok")]) == 0


@pytest.mark.slow
def test_malformed_manifest_latest_and_client_state_on_resume(tmp_path, base_run):
    """Resume: a malformed manifest or ``latest`` falls back to the newest good checkpoint (and says
    why); a client state of another shape behind valid checksums is refused naming the file."""
    names = [f"manifest_{c}" for c in ("files_list", "entry_int", "files_null")] + ["latest_path", "latest_binary",
                                                                                 "client_state"]
    runs = {n: tmp_path / n for n in names}
    for n, run in runs.items():
        shutil.copytree(base_run, run)
        tag = run / CK / "step_00000003"
        if n.startswith("manifest_"):
            (tag / integrity.MANIFEST).write_text(json.dumps(MALFORMED_MANIFESTS[n[len("manifest_"):]]))
        elif n == "latest_path":
            (run / CK / "latest").write_text("../../elsewhere/step_00000009")
        elif n == "latest_binary":
            (run / CK / "latest").write_bytes(b"\xff\xfe\x00step")
        else:  # weights-only readable, checksums resealed: only the schema can tell
            states = tag / "mp_rank_00_model_states.pt"
            sd = torch.load(states, weights_only=True)
            sd["powerclip"]["ranks"] = 5
            torch.save(sd, states)
            _reseal(tag)
    before = _digests(runs["client_state"])
    res = dict(zip(names, _run([{"run": str(runs[n]), "steps": 4, "extra": ["checkpoint.keep_last=5"]}
                                for n in names])))
    for n in names[:-1]:
        assert res[n] == {"step": 4}, (n, res[n])
        log = (runs[n] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in log] == [1, 2, 3, 4]  # step 3 recomputed from step 2's checkpoint
        assert layout.read_latest(runs[n] / CK) == "step_00000004"
    aside = [t for t in _tags(runs["manifest_files_list"]) if t.startswith("step_00000003.aside-")]
    assert len(aside) == 1  # the damaged checkpoint kept, moved out of the new save's way
    states = runs["client_state"] / CK / "step_00000003" / "mp_rank_00_model_states.pt"
    assert res["client_state"]["error"] == (f"CheckpointError: {states}: malformed powerclip client state: 'ranks' "
                                            "is not a list of 1 {data, rng} entries (one per saving rank); resume "
                                            "from another checkpoint (checkpoint.resume=PATH)")
    assert _digests(runs["client_state"]) == before


@pytest.mark.slow
def test_malformed_latest_is_refused_by_export_in_one_line(tmp_path, base_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / CK / "latest").write_text("../../other/checkpoints/step_00000001")
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().out.strip() == (
        f"powerclip export: error: {run / CK / 'latest'}: holds '../../other/checkpoints/step_00000001', not the "
        "name of a checkpoint folder beside it such as 'step_00001000' (damaged?); repair it, or name one checkpoint "
        "folder to read")


def test_metrics_records_of_another_shape_are_kept_aside_on_resume(tmp_path):
    from powerclip.train.logging import RunLogger

    lines = ['{"step": 1, "loss": 1.0}', "[1, 2]", '{"step": "2"}', "7", '{"loss": 3.0}', '{"step": 2, "loss": 2.0}',
             '{"step": 3, "loss": 0.5}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    RunLogger(tmp_path, True, resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [lines[0], lines[5]]
    assert (tmp_path / "metrics.jsonl.cut").read_text().splitlines() == lines[1:5] + [lines[6]]


def test_broken_run_config_names_the_file_and_line(tmp_path):
    from powerclip.config import ConfigError, load_config

    bad = tmp_path / "config.yaml"
    bad.write_text("train:\n  steps: 3\n  run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid YAML .*at line 4, column 1"):
        load_config(bad)
    bad.write_bytes(b"train:\n  steps: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not (valid YAML|a text file)"):
        load_config(bad)


def test_run_mark_of_another_shape_is_never_proof_of_ownership(tmp_path):
    tag = tmp_path / layout.tag_for(1)
    tag.mkdir()
    (tag / "w.pt").write_bytes(b"w")
    rid = ownership.new_run_id()
    for text in ("[]", '{"run_id": 5}', '{"run_id": "../x"}', "\xff"):
        (tag / ownership.RUN_FILE).write_text(text)
        assert ownership.run_of(tag) is None
        assert not ownership.half_written(tag, rid)
    ownership.write_run_mark(tag, rid)
    assert ownership.half_written(tag, rid)
    (tag / "notes.txt").write_text("mine")  # someone's file inside: not a half-written save any more
    assert not ownership.half_written(tag, rid)


@pytest.mark.slow
# ----------------------------------------------------------------- keep_last across restarts
def test_keep_last_bounds_the_folder_across_four_restarts_and_spares_others(tmp_path, base_run):
    """A fresh run and 4 restarts (separate processes) with keep_last=2: this run's checkpoints are
    pruned to the newest 2; another run's checkpoint, one written before run identities existed and
    one of this run holding a file someone added are all kept, bit for bit."""
    run = tmp_path / "run"
    keep = ["checkpoint.keep_last=2"]
    assert _run([{"run": str(run), "steps": 2, "extra": keep}]) == [{"step": 2}]
    assert _tags(run) == ["step_00000001", "step_00000002"]
    # another run's checkpoint copied in, and an old-style one without run.json (resealed)
    shutil.copytree(base_run / CK / "step_00000001", run / CK / "step_00000000")
    legacy = run / CK / "step_00000001"
    (legacy / ownership.RUN_FILE).unlink()
    _reseal(legacy)
    (run / CK / "step_00000002" / "notes.txt").write_text("a person's notes")
    kept = {t: _digests(run / CK / t) for t in ("step_00000000", "step_00000001", "step_00000002")}
    for steps in (3, 4, 5, 6):  # four restarts, one step each
        assert _run([{"run": str(run), "steps": steps, "extra": keep}]) == [{"step": steps}]
    assert _tags(run) == ["step_00000000", "step_00000001", "step_00000002", "step_00000005", "step_00000006"]
    for t, d in kept.items():
        assert _digests(run / CK / t) == d
    rid = ownership.run_of(run / CK / "step_00000006")
    assert rid is not None and ownership.run_of(run / CK / "step_00000005") == rid
    assert ownership.run_of(run / CK / "step_00000000") not in (None, rid)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    # a run started over from another folder's checkpoint is a new run: it prunes none of those
    other = tmp_path / "other"
    shutil.copytree(run / CK / "step_00000006", other / CK / "step_00000006")
    src = other / CK / "step_00000006"
    assert _run([{"run": str(run), "steps": 8, "extra": [*keep, f"checkpoint.resume={src}"]}]) == [{"step": 8}]
    assert _tags(run) == ["step_00000000", "step_00000001", "step_00000002", "step_00000005", "step_00000006",
                          "step_00000007", "step_00000008"]


# ----------------------------------------------------------------- a full or read-only disk
@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 80 MB tmpfs: room for one checkpoint of the tiny model (53 MB), not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"mounting a tmpfs is not permitted here ({getattr(e, 'stderr', '') or e}); the disk-full "
                    "and read-only tests need it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _size(tag_dir: Path) -> int:
    return sum(e["size"] for e in integrity.parse_manifest(tag_dir / integrity.MANIFEST).values())


@pytest.mark.slow
def test_disk_full_is_one_line_half_save_swept_and_the_run_resumes(small_disk):
    run = small_disk / "run"
    keep = ["checkpoint.keep_last=1"]
    res = _run([{"run": str(run), "steps": 3, "extra": keep},  # step 1 fits, step 2 fills the disk
                {"run": str(run), "steps": 3, "extra": keep}])  # the disk is still full
    ck = run / CK
    needed = _size(ck / "step_00000001")
    err = res[0]["error"]
    assert err.startswith(f"StorageError: {ck / 'step_00000002'}: out of disk space while saving the checkpoint: it "
                          f"needs about {needed:,} bytes ("), err
    assert err.endswith(f"free; free space (or lower checkpoint.keep_last, or move train.run_dir) and rerun: the run "
                        f"resumes from {ck / 'step_00000001'}")
    assert "\n" not in err
    assert layout.read_latest(ck) == "step_00000001"
    integrity.verify(ck / "step_00000001")  # the last good checkpoint is intact
    assert not (ck / "step_00000002" / integrity.MANIFEST).exists()  # the half-written save
    err = res[1]["error"]
    assert err.startswith(f"StorageError: {ck}: not enough disk space for a checkpoint: the newest checkpoint needs "
                          f"about {needed:,} bytes ("), err
    assert err.endswith("free; free space (or move train.run_dir) and rerun (nothing was written)")
    before = _digests(run)
    # space returns: the run resumes from step 1, the half-written step 2 goes once step 2 is saved
    res = _run([{"run": str(run), "steps": 3, "extra": keep, "remount": "200m", "mount": str(small_disk)}])
    assert res == [{"step": 3}]
    assert _tags(run) == ["step_00000003"]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert before["config.yaml"] == _digests(run)["config.yaml"]


def test_read_only_run_folder_is_one_line(small_disk, tmp_path):
    run = small_disk / "run"
    run.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"config": tiny_config().model.config}, "data": {"sources": [
        {"shards": str(tmp_path / "{00000..00001}.tar")}]}}))
    proc = subprocess.run([sys.executable, "-m", "powerclip", "train", "-c", str(config), f"train.run_dir={run}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Errno" not in proc.stderr, proc.stderr
    # `powerclip train` checks the run folder before anything starts (the run lock would refuse it too,
    # for an entry that skips the check, with its own one line)
    assert [x for x in proc.stderr.splitlines() if "error" in x] == [
        f"powerclip train: error: train.run_dir={run}: cannot write in {run} (Read-only file system); "
        "choose a writable train.run_dir or fix its permissions"], proc.stderr
