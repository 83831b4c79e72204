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
    from powerclip.eval.model_io import load_model
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
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert f"powerclip export: error: {shard}: refusing to load" in out
    assert not marker.exists()
    # the untouched earlier checkpoint still exports (weights-only consolidation of real ZeRO-2 shards)
    assert cli_main(["export", str(run), "--tag", "step_00000003", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "open_clip_model.safetensors").is_file()


def test_truncated_and_unreadable_shards_name_the_file(tmp_path, base_run, capsys):
    run = _copy(base_run, tmp_path / "run")
    tag = run / "checkpoints" / "step_00000004"
    shard = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert cli_main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert f"{shard}: unreadable checkpoint file" in capsys.readouterr().out
    if os.geteuid() != 0:  # root reads chmod-000 files anyway
        model = tag / "mp_rank_00_model_states.pt"
        model.chmod(0)
        try:
            assert cli_main(["export", str(run), "--tag", "step_00000004", "--out", str(tmp_path / "o")]) == 2
            assert f"{model}: cannot read: Permission denied" in capsys.readouterr().out
        finally:
            model.chmod(0o644)
