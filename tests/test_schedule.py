"""The const-cooldown schedule (open_clip's ``const_lr_cooldown``): the same lr at every step as
open_clip_train's own function, each parameter group scaled from its own peak lr, and a run resumed
mid-cooldown (the scheduler's state dict into a fresh scheduler) continuing the same sequence."""

from __future__ import annotations

import pytest
import torch

from powerclip.config import ConfigError
from powerclip.train.optim import lr_lambda, scheduler_factory
from tests.tiny import tiny_config

STEPS, WARMUP, COOLDOWN = 40, 5, 12


def _optim(power: float = 2.0, end: float = 1e-4):
    return tiny_config([f"train.steps={STEPS}", "optim.lr=1e-3", f"optim.warmup_steps={WARMUP}",
                        "optim.schedule=const-cooldown", f"optim.cooldown_steps={COOLDOWN}",
                        f"optim.cooldown_power={power}", f"optim.cooldown_end_lr={end}"]).optim


@pytest.mark.parametrize("power, end", [(1.0, 0.0), (2.0, 1e-4), (0.5, 5e-4)])
def test_const_cooldown_equals_open_clip_train(power, end):
    scheduler = pytest.importorskip("open_clip_train.scheduler")
    cfg = _optim(power, end)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    theirs = scheduler.const_lr_cooldown(opt, cfg.lr, WARMUP, STEPS, COOLDOWN, power, end)
    ours = lr_lambda(cfg, STEPS)
    for step in range(STEPS):
        assert cfg.lr * ours(step) == pytest.approx(theirs(step), rel=1e-12, abs=1e-18), step
    assert ours(WARMUP) == ours(STEPS - COOLDOWN - 1) == 1.0  # constant between warm-up and cooldown
    assert ours(STEPS - 1) < ours(STEPS - COOLDOWN + 1) < 1.0


def _run(cfg, steps: range, state: dict | None = None):
    """LRs of two groups (peaks 1e-3 and 4e-4) over ``steps`` optimiser steps; the final state."""
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-3}, {"params": [params[1]], "lr": 4e-4}])
    sched = scheduler_factory(cfg, STEPS)(opt)
    if state is not None:
        sched.load_state_dict(state)
    lrs = []
    for _ in steps:
        lrs.append(list(sched.get_last_lr()))
        opt.step()
        sched.step()
    return lrs, sched.state_dict()


def test_resumed_mid_cooldown_continues_the_same_lr_sequence():
    cfg = _optim()
    whole, _ = _run(cfg, range(STEPS))
    cut = STEPS - COOLDOWN // 2  # in the middle of the cooldown
    first, state = _run(cfg, range(cut))
    rest, _ = _run(cfg, range(cut, STEPS), state)
    assert first + rest == whole  # one process, same arithmetic: exact
    f = lr_lambda(cfg, STEPS)
    for step, (a, b) in enumerate(whole):
        assert a == pytest.approx(1e-3 * f(step), rel=1e-12) and b == pytest.approx(4e-4 * f(step), rel=1e-12)
    assert whole[cut][0] < 1e-3 and whole[-1][1] < whole[cut][1]  # the resumed part is in the cooldown


@pytest.mark.parametrize("override, needle", [
    ("optim.cooldown_steps=0", "optim.cooldown_steps=0: optim.schedule=const-cooldown needs"),
    ("optim.cooldown_steps=100", "optim.cooldown_steps=100: optim.schedule=const-cooldown needs"),
    ("optim.cooldown_end_lr=1.0", "optim.cooldown_end_lr in"),
])
def test_bad_cooldown_settings_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        tiny_config(["train.steps=50", "optim.warmup_steps=5", "optim.schedule=const-cooldown",
                     "optim.cooldown_steps=10", override])
