"""No command deletes or overwrites what it did not create, and outputs follow the process umask.

Every writer is run for real (the ``powerclip`` command or the tool's script, on files the test
writes) against an output path that already holds someone else's files: a training run, the folder
of runs around it, a folder with a stray file, another tool's shards. Each must refuse in one line
and leave every byte where it was; a new folder, an empty one, or the command's own earlier output
is accepted (an earlier export is replaced whole).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from powerclip.cli import main as cli_main
from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent
UMASK = 0o027  # group may read, others nothing: distinguishable from the default 022 and from 0600/0700
TIMEOUT = 300  # a subprocess imports torch and DeepSpeed: seconds on an idle machine, more under load


def _train_job(rank: int, world: int, run_dir: str, private: bool) -> dict:
    from powerclip.train.loop import train

    cfg = tiny_config([f"train.run_dir={run_dir}", "data.batch_size=2", "train.zero_stage=2", "train.steps=2",
                       "train.log_every=1", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
                       f"checkpoint.private={str(private).lower()}"])
    return {k: v for k, v in train(cfg, build_loader=MemoryLoader).items() if k != "losses"}


def _train_under_umask(run: Path, private: bool) -> Path:
    old = os.umask(UMASK)  # the spawned ranks inherit it
    try:
        run_on_ranks(_train_job, 1, str(run), private)
    finally:
        os.umask(old)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """runs/a: a real 2-step run (checkpoint every step) written under umask 027."""
    root = tmp_path_factory.mktemp("runs_parent") / "runs"
    _train_under_umask(root / "a", private=False)
    return root


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: "still there, bit for bit"."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _powerclip(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "powerclip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    text = (r.stdout + r.stderr).strip()
    assert "Traceback" not in text, text
    line = [x for x in text.splitlines() if "error" in x]
    assert len(line) == 1, text
    for n in needles:
        assert n in line[0], (n, line[0])
    return line[0]


# ------------------------------------------------------------------------------------- export
def test_export_refuses_the_run_its_parent_and_foreign_folders(runs: Path, tmp_path: Path, capsys):
    run = runs / "a"
    before = _digests(runs)
    # the fault that deleted a run: --out the run itself (one real command, stderr checked whole)
    r = _powerclip("export", str(run), "--out", str(run))
    _one_line_error(r, str(run), "training run")
    assert "Setting accelerator" not in r.stderr  # DeepSpeed's CPU fallback warning stays quiet
    # the parent of runs, the checkpoints folder, a folder holding someone's file
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    for out, needle in ((runs, "holds the training run a/"), (run / "checkpoints", "holds checkpoints"),
                        (foreign, "exists and is not a previous export")):
        capsys.readouterr()
        assert cli_main(["export", str(run), "--out", str(out)]) == 2, out
        err = capsys.readouterr().err.strip()
        assert err == f"powerclip export: error: --out {out}: {needle}" + err.split(needle, 1)[1], err
        assert "\n" not in err
    assert _digests(runs) == before
    assert (foreign / "todo.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_export_replaces_only_a_previous_export(runs: Path, tmp_path: Path, capsys):
    run = runs / "a"
    out = tmp_path / "exp"
    out.mkdir()  # an empty folder is fine
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    first = _digests(out)
    assert set(first) == {"open_clip_config.json", "open_clip_model.safetensors"}
    # a previous export is replaced (swapped: nothing of the old one, nothing aside, left behind)
    (out / "open_clip_model.safetensors").write_bytes(b"old weights")
    assert cli_main(["export", str(run), "--out", str(out), "--tag", "step_00000001"]) == 0
    assert set(_digests(out)) == set(first)
    assert (out / "open_clip_model.safetensors").read_bytes() != b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    # once someone adds a file, it is no longer only an export: refused, both files kept
    (out / "results.json").write_text("{}")
    capsys.readouterr()
    assert cli_main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: exists and is not a previous export" in err and "Traceback" not in err
    assert (out / "results.json").read_text() == "{}"


def test_export_os_error_is_one_line_with_the_path_and_the_fix(runs: Path, tmp_path: Path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert cli_main(["export", str(runs / "a"), "--out", str(blocker / "exp")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"powerclip export: error: {blocker}: File exists (a file is in the way: choose another path)"
    assert blocker.read_text() == "x"


# -------------------------------------------------------------------------------- permissions
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_export_and_checkpoints_follow_the_umask(runs: Path, tmp_path: Path):
    run = runs / "a"
    tag = run / "checkpoints" / "step_00000002"
    assert _mode(run / "checkpoints") == _mode(tag) == 0o750
    files = [p for p in tag.iterdir() if p.is_file()]
    assert files and all(_mode(p) == 0o640 for p in files), {p.name: oct(_mode(p)) for p in files}
    out = tmp_path / "exp"
    r = _powerclip("export", str(run), "--out", str(out), umask=UMASK)
    assert r.returncode == 0, r.stderr
    assert _mode(out) == 0o750  # not the 0700 of a temporary folder
    assert {p.name: _mode(p) for p in out.iterdir()} == {"open_clip_config.json": 0o640,
                                                         "open_clip_model.safetensors": 0o640}
    # --private asks for owner-only
    private = tmp_path / "private"
    assert cli_main(["export", str(run), "--out", str(private), "--private"]) == 0
    assert _mode(private) == 0o700 and all(_mode(p) == 0o600 for p in private.iterdir())


def test_checkpoint_private_makes_checkpoints_and_exports_owner_only(tmp_path: Path):
    run = _train_under_umask(tmp_path / "priv", private=True)
    ckpt = run / "checkpoints"
    assert _mode(ckpt) == 0o700
    for p in ckpt.rglob("*"):
        if p.parent != ckpt or p.is_dir():  # everything inside a tag folder (``latest`` sits beside them)
            assert _mode(p) == (0o700 if p.is_dir() else 0o600), p
    out = tmp_path / "exp"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0  # the run's config asks for private
    assert _mode(out) == 0o700 and all(_mode(p) == 0o600 for p in out.iterdir())


# ------------------------------------------------------------------------------- shard tools
def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _foreign_shards(folder: Path) -> dict[str, str]:
    """A folder holding another tool's shard set (names a shard tool would write), digested."""
    folder.mkdir(parents=True)
    (folder / "00000.tar").write_bytes(b"someone else's shard")
    (folder / "sizes.json").write_text('{"00000.tar": 1}')
    (folder / "manifest.json").write_text("{}")
    return _digests(folder)


def _tool(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)


def test_build_shards_refuses_a_foreign_folder_and_resumes_its_own(tmp_path: Path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        (src / f"img{i}.png").write_bytes(_png())
        (src / f"img{i}.txt").write_text(f"a red square number {i}")
    foreign = tmp_path / "foreign"
    before = _foreign_shards(foreign)
    common = ["--parser", "rule", "--shard-size", "2", "--no-progress"]
    r = _tool("build_shards.py", str(src), "--out", str(foreign), *common)
    _one_line_error(r, str(foreign), "not an output folder of tools/build_shards.py")
    assert _digests(foreign) == before
    # the input folder as output: refused too (it holds the images)
    src_before = _digests(src)
    _one_line_error(_tool("build_shards.py", str(src), "--out", str(src), *common), str(src))
    assert _digests(src) == src_before
    # its own output: built, then resumed by the same command
    out = tmp_path / "built"
    assert _tool("build_shards.py", str(src), "--out", str(out), *common).returncode == 0
    assert (out / "00001.tar").is_file()
    assert _tool("build_shards.py", str(src), "--out", str(out), *common).returncode == 0


def test_make_synthetic_refuses_a_foreign_folder_and_regenerates_its_own(tmp_path: Path):
    foreign = tmp_path / "foreign"
    before = _foreign_shards(foreign)
    small = ["--train-shards", "1", "--per-shard", "4", "--image-size", "16"]
    r = _tool("make_synthetic.py", "--out", str(foreign), *small)
    _one_line_error(r, str(foreign), "not a synthetic dataset")
    assert _digests(foreign) == before
    out = tmp_path / "synth"
    assert _tool("make_synthetic.py", "--out", str(out), *small).returncode == 0
    first = _digests(out)
    assert _tool("make_synthetic.py", "--out", str(out), *small).returncode == 0  # its own: same bytes again
    assert _digests(out) == first


@pytest.mark.parametrize("script", ["annotate_shards.py", "make_negatives.py"])
def test_shard_copying_tools_refuse_a_foreign_folder(script: str, synthetic_root: Path, tmp_path: Path):
    shards = str(synthetic_root / "val" / "{00000..00000}.tar")
    foreign = tmp_path / "foreign"
    before = _foreign_shards(foreign)
    out_flag = "--out" if script == "annotate_shards.py" else "--output"
    extra = ["--parser", "rule"] if script == "annotate_shards.py" else ["-k", "2"]
    r = _tool(script, "--input", shards, out_flag, str(foreign), *extra, "--no-progress")
    assert r.returncode in (1, 2), (r.stdout, r.stderr)  # the tools' exit code for bad input
    assert f"{foreign}: exists and is not an output folder of tools/{script}" in r.stderr
    assert "Traceback" not in r.stderr
    assert _digests(foreign) == before
    # a new folder, then the same command again (resumes in its own folder)
    out = tmp_path / "own"
    for _ in range(2):
        r = _tool(script, "--input", shards, out_flag, str(out), *extra, "--no-progress")
        assert r.returncode == 0, r.stderr
    assert (out / "00000.tar").is_file()


def test_compare_methods_refuses_a_foreign_folder_and_cleans_only_its_runs(tmp_path: Path):
    foreign = tmp_path / "foreign"
    before = _foreign_shards(foreign)
    r = _tool("compare_methods.py", "--out", str(foreign), "--smoke")
    assert r.returncode != 0 and "not an earlier tools/compare_methods.py output" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and _digests(foreign) == before
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import compare_methods as cm
    finally:
        sys.path.remove(str(ROOT / "tools"))
    # a run folder without the tool's record keeps its checkpoints; one it trained loses them
    for name, trained in (("other", False), ("mine", True)):
        (tmp_path / name / "checkpoints" / "step_1").mkdir(parents=True)
        if trained:
            (tmp_path / name / "compare_trained.json").write_text("{}")
        cm._cleanup(tmp_path / name)
    assert (tmp_path / "other" / "checkpoints" / "step_1").is_dir()
    assert not (tmp_path / "mine" / "checkpoints").exists()


# --------------------------------------------------------------------------------------- eval
def test_eval_out_overwrites_only_an_earlier_result(tmp_path: Path):
    from tests.test_eval_support import make_export, write_winoground

    model = make_export(tmp_path / "m")
    data = write_winoground(tmp_path / "wino")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    r = _powerclip("eval", "--model", str(model), "--task", "winoground", "--data", str(data), "--out", str(notes))
    _one_line_error(r, str(notes), "not an earlier evaluation result")
    assert notes.read_text() == '{"mine": 1}'
    # an earlier result (clip_benchmark's schema, as eval writes it) is replaced
    out = tmp_path / "res.json"
    out.write_text(json.dumps({"dataset": "winoground", "model": "old", "pretrained": "old",
                               "task": "image_caption_selection", "metrics": {}}))
    r = _powerclip("eval", "--model", str(model), "--task", "winoground", "--data", str(data), "--out", str(out))
    assert r.returncode == 0, r.stderr
    new = json.loads(out.read_text())
    assert new["model"] != "old" and new["metrics"]
