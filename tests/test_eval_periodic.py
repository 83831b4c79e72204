"""Periodic evaluation inside the real training loop (2 gloo ranks, ZeRO-2 and ZeRO-3), and
``powerclip eval`` on the run folder (consolidated by powerclip.export) giving the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from powerclip.cli import main as powerclip_main
from tests.dist_helpers import run_on_ranks
from tests.test_eval_support import write_sugarcrepe, write_synthetic
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config


def _train_with_eval(rank: int, world: int, run_dir: str, stage: int, tasks: list[str]) -> dict:
    from powerclip.train.loop import train

    cfg = tiny_config([f"train.run_dir={run_dir}", "data.batch_size=2", f"train.zero_stage={stage}",
                       "train.steps=2", "train.log_every=1", "optim.lr=1e-3", "optim.warmup_steps=1",
                       "checkpoint.every_steps=2", "eval.every_steps=2", "eval.batch_size=3",
                       f"eval.tasks={json.dumps(tasks)}"])
    return train(cfg, build_loader=MemoryLoader)["losses"]


def _tb_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # ZeRO-3: the partitioned case; 2 ranks, plain gather, in test_eval.py
def test_periodic_eval_in_training_matches_powerclip_eval_on_the_run(tmp_path, stage):
    sc = write_sugarcrepe(tmp_path / "sc", tasks=("swap_att",), n=5)
    syn = write_synthetic(tmp_path / "syn", n=7)
    run = tmp_path / "run"
    run_on_ranks(_train_with_eval, 2, str(run), stage, [f"sugar_crepe:{sc}", f"synthetic:{syn}"])

    recs = json.loads((run / "eval" / "step_00000002.json").read_text())
    during = {r["dataset"]: r for r in recs}
    assert set(during) == {"sugar_crepe/swap_att", "synthetic", "synthetic/retrieval", "synthetic/swap-att",
                           "synthetic/replace-rel", "synthetic/add-obj"}
    assert all(r["step"] == 2 and set(r) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
               for r in recs)
    tags = _tb_tags(run)
    assert "eval/sugar_crepe/swap_att/acc" in tags and "eval/synthetic/acc1" in tags

    # standalone evaluation of the run folder (checkpoint at step 2, consolidated by powerclip.export)
    out = tmp_path / "after"
    assert powerclip_main(["eval", "--model", str(run), "--task", "sugar_crepe", "--data", str(sc),
                           "--task", "synthetic", "--data", str(syn), "--out", str(out), "--batch-size", "3"]) == 0
    after = {r["dataset"]: r for r in (json.loads(p.read_text()) for p in out.glob("*.json"))}
    assert set(after) == set(during)
    for ds, r in during.items():
        for k, v in r["metrics"].items():
            assert after[ds]["metrics"][k] == pytest.approx(v, abs=1e-9), (ds, k)
