"""The EMA teacher blends the optimiser's fp32 master weights (not the bf16 working copy) under every
ZeRO stage, on real DeepSpeed engines: 1 rank (ZeRO 1, bf16; ZeRO 0, amp_bf16 whose fp32 weights are
their own masters) and 2 gloo ranks (ZeRO 2/3, bf16). The reference master values come from
DeepSpeed's own ``safe_get_full_fp32_param``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from powerclip.data.batch import Batch
from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config

DECAY = 0.5


def _batch(rank: int, k: int, b: int = 4) -> Batch:
    g = torch.Generator().manual_seed(100 * k + rank)
    text = torch.zeros(b, 77, dtype=torch.long)
    text[:, 0], text[:, 1:6], text[:, 6] = 49406, torch.randint(1, 4000, (b, 5), generator=g), 49407
    return Batch(keys=[str(i) for i in range(b)], images=torch.randn(b, 3, 32, 32, generator=g), text=text)


def _full(p: torch.nn.Parameter) -> torch.Tensor:
    from powerclip.train.ema import _gathered

    with _gathered([p]):
        return p.detach().float().clone()


def _job(rank: int, world: int, root: str, stages: tuple[int, ...]) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from powerclip.model.factory import create_model
    from powerclip.train.ema import EmaTeacher
    from powerclip.train.engine import PRECISION_DTYPES, build_engine
    from powerclip.train.loop import seed_all, train_step

    out = {}
    for stage in stages:
        precision = "amp_bf16" if stage == 0 else "bf16"  # bf16 weights at ZeRO-0 are refused
        cfg = tiny_config([f"train.run_dir={root}/z{stage}", "data.batch_size=4", f"train.zero_stage={stage}",
                           f"train.precision={precision}", "optim.lr=3e-3", "optim.warmup_steps=1", "train.steps=4"])
        seed_all(0)
        model = create_model(cfg.model)
        teacher = EmaTeacher(model, DECAY)
        engine, _ = build_engine(cfg, model, world)
        errs, working_errs = [], []
        start = [t.detach().clone() for t in teacher.module.parameters()]
        for k in range(2):
            train_step(engine, [_batch(rank, k).to("cpu", PRECISION_DTYPES[precision])], cfg)
            prev = [t.detach().clone() for t in teacher.module.parameters()]
            teacher.update(engine)
            for t_prev, t_now, p in zip(prev, teacher.module.parameters(), engine.module.parameters()):
                master = safe_get_full_fp32_param(p)  # ZeRO 1/2/3
                if master is None:  # ZeRO 0 under amp: the fp32 weights the torch optimiser steps
                    master = p.detach()
                master = master.float().view(t_now.shape)
                want = t_prev * DECAY + (1 - DECAY) * master
                errs.append(float((t_now - want).abs().max()))
                working_errs.append(float((t_now - (t_prev * DECAY + (1 - DECAY) * _full(p))).abs().max()))
        moved = max(float((a - b).abs().max()) for a, b in zip(start, teacher.module.parameters()))
        out[stage] = {"err": max(errs), "working_err": max(working_errs), "moved": moved,
                      "bf16_params": all(p.dtype == torch.bfloat16 for p in engine.module.parameters())}
    return out


@pytest.mark.slow
def test_ema_blends_fp32_masters_on_every_zero_stage(tmp_path: Path):
    one = run_on_ranks(_job, 1, str(tmp_path / "one"), (0, 1))[0]
    two = run_on_ranks(_job, 2, str(tmp_path / "two"), (2, 3))
    for res in [one, *two]:
        for stage, r in res.items():
            assert r["err"] < 1e-6, (stage, r)
            assert r["moved"] > 1e-4, (stage, r)  # the teacher did follow the trained student
            if stage == 0:  # amp_bf16: fp32 weights, the teacher blends them as they are
                assert not r["bf16_params"]
                continue
            assert r["bf16_params"], stage  # the working copy is bf16: masters and copy differ
            assert r["working_err"] > 1e-4, (stage, r)  # blending the bf16 copy would be visibly different


def test_bf16_teacher_rounds_stochastically_without_bias():
    """A bf16 teacher keeps (1-α)-sized updates in expectation: nearest rounding would lose them all."""
    from powerclip.train.ema import EmaTeacher, stochastic_round_bf16

    x = torch.full((200_000,), 1.0 + 2.0 ** -10)  # a quarter of the way between two bf16 values
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0))
    assert set(r.float().unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert abs(float(r.float().mean()) - (1.0 + 2.0 ** -10)) < 2e-5
    assert torch.isinf(stochastic_round_bf16(torch.tensor([float("inf")]), torch.Generator())).all()

    student = torch.nn.Linear(64, 64)
    torch.nn.init.constant_(student.weight, 1.0)
    teacher = EmaTeacher(student, decay=0.999, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in teacher.module.parameters())
    with torch.no_grad():
        student.weight.fill_(2.0)
    for _ in range(20):
        teacher.update(student)
    exact = 2.0 - 0.999 ** 20  # fp32 EMA after 20 steps from 1 toward 2
    assert abs(float(teacher.module.weight.float().mean()) - exact) < 2e-3  # nearest rounding: stays 1.0
    state = teacher.state_dict()
    again = EmaTeacher(student, decay=0.999, dtype=torch.bfloat16)
    again.load_state_dict(state)
    assert torch.equal(again.module.weight, teacher.module.weight) and again.num_updates == 20
