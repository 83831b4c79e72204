"""Model and optimiser state across world sizes and ZeRO stages (powerclip.train.elastic).

2 ranks at ZeRO-2 train and save; 3 ranks at ZeRO-3 load it, train and save; 2 ranks at ZeRO-2 and
1 rank at stage 0 load that; the stage-0 rank trains and saves, and 2 ranks at ZeRO-1 load it. After every load the fp32 master weights and both Adam moments of every
parameter, read back through DeepSpeed's own ``safe_get_full_*`` (torch's optimizer state at stage
0), equal bit for bit those the saving engine held, the LR schedule continues, and a step after the
load gives a finite loss. Real gloo ranks, the tiny model, a few steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config


def _cfg(root: str, stage: int):
    return tiny_config([f"train.run_dir={root}", "data.batch_size=2", f"train.zero_stage={stage}",
                        "train.steps=8", "optim.lr=1e-3", "optim.warmup_steps=2"])


def _engine(cfg, world: int):
    from powerclip.checkpoints.codec import install_safe_checkpoint_engine
    from powerclip.model.factory import create_model
    from powerclip.train.engine import build_engine
    from powerclip.train.loop import seed_all

    seed_all(cfg.train.seed)
    engine, sched = build_engine(cfg, create_model(cfg.model), world)
    install_safe_checkpoint_engine(engine)
    engine.train()
    return engine, sched


def _steps(engine, cfg, rank: int, world: int, n: int) -> list[float]:
    from powerclip.train.loop import train_step

    batches = iter(MemoryLoader(cfg, rank, world))
    return [train_step(engine, [next(batches)], cfg).loss for _ in range(n)]


def _full(engine) -> dict[str, list[torch.Tensor]]:
    """name -> [fp32 master, exp_avg, exp_avg_sq], whole (a collective at stages 1-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from powerclip.train.elastic import link_optimizer_state

    link_optimizer_state(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0:
            st = engine.optimizer.state[p]
            vals = [p.detach(), st["exp_avg"], st["exp_avg_sq"]]
        else:
            vals = [safe_get_full_fp32_param(p), safe_get_full_optimizer_state(p, "exp_avg"),
                    safe_get_full_optimizer_state(p, "exp_avg_sq")]
        out[name] = [v.detach().float().cpu().clone() for v in vals]
    return out


def _save(engine, root: str, step: int, rank: int) -> None:
    from powerclip.config import CheckpointConfig
    from powerclip.train import checkpoint as ckpt
    from powerclip.train.state import TrainState

    ckpt.save(engine, Path(root) / "checkpoints", TrainState(step=step), {"powerclip": {"step": step}},
              CheckpointConfig(keep_last=10), rank == 0)


def _first(rank: int, world: int, root: str) -> dict:
    cfg = _cfg(root, 2)
    engine, sched = _engine(cfg, world)
    _steps(engine, cfg, rank, world, 3)
    _save(engine, root, 3, rank)
    return {"full": _full(engine), "lr": sched.get_last_lr(), "steps": engine.global_steps}


def _resumed(rank: int, world: int, root: str, stage: int, tag: str, save_step: int) -> dict:
    from powerclip.train.elastic import load_full_state, read_full_state

    cfg = _cfg(root, stage)
    engine, sched = _engine(cfg, world)
    load_full_state(engine, read_full_state(Path(root) / "checkpoints" / tag, engine.module, cfg.optim), sched)
    out = {"loaded": _full(engine), "lr": sched.get_last_lr(), "steps": engine.global_steps}
    out["losses"] = _steps(engine, cfg, rank, world, 1)
    if save_step:
        _save(engine, root, save_step, rank)
        out["full"] = _full(engine)
    return out


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for what, x, y in zip(("fp32", "exp_avg", "exp_avg_sq"), a[name], b[name]):
            assert torch.equal(x, y), f"{name} {what} differs after the load"


def test_zero2_to_zero3_and_back_across_world_sizes(tmp_path):
    root = str(tmp_path)
    saved = run_on_ranks(_first, 2, root)[0]
    assert saved["full"]["clip.logit_scale"][1].abs().sum() > 0  # the moments exist and are not zero

    z3 = run_on_ranks(_resumed, 3, root, 3, "step_00000003", 4)[0]
    _assert_equal(z3["loaded"], saved["full"])
    assert z3["lr"] == saved["lr"] and z3["steps"] == saved["steps"] == 3
    assert all(math.isfinite(x) for x in z3["losses"])

    back = run_on_ranks(_resumed, 2, root, 2, "step_00000004", 0)[0]
    _assert_equal(back["loaded"], z3["full"])
    assert back["steps"] == 4 and all(math.isfinite(x) for x in back["losses"])

    zero0 = run_on_ranks(_resumed, 1, root, 0, "step_00000004", 5)[0]
    _assert_equal(zero0["loaded"], z3["full"])
    assert zero0["lr"] == back["lr"] and all(math.isfinite(x) for x in zero0["losses"])

    z1 = run_on_ranks(_resumed, 2, root, 1, "step_00000005", 0)[0]  # stage 0 read, ZeRO-1 written
    _assert_equal(z1["loaded"], zero0["full"])
    assert z1["steps"] == 5 and all(math.isfinite(x) for x in z1["losses"])
