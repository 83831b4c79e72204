"""train.compile: the towers under torch.compile train to the same losses as eager (1 rank, ZeRO-2).

The test uses torch.compile's ``aot_eager`` backend (the same graph capture and AOT autograd as
``inductor``, without generating C++ kernels, which takes minutes on a CI CPU); the GPU check runs
the default inductor backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from powerclip.config import ConfigError
from tests.dist_helpers import run_on_ranks
from tests.test_step_sync import Uint8Loader
from tests.tiny import tiny_config


def _job(rank: int, world: int, root: str) -> dict:
    from powerclip.train.loop import train

    out = {}
    for name, extra in (("eager", ()), ("compiled", ("train.compile=true", "train.compile_backend=aot_eager"))):
        cfg = tiny_config([f"train.run_dir={root}/{name}", "data.batch_size=4", "train.zero_stage=2",
                           "train.steps=3", "optim.lr=1e-3", "optim.warmup_steps=1", *extra])
        torch._dynamo.reset()
        out[name] = train(cfg, build_loader=Uint8Loader)["losses"]
        out[f"{name}_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return out


@pytest.mark.slow
def test_compiled_towers_give_the_eager_losses(tmp_path: Path):
    out = run_on_ranks(_job, 1, str(tmp_path))[0]
    torch.testing.assert_close(torch.tensor(out["compiled"]), torch.tensor(out["eager"]), rtol=0, atol=1e-5)
    assert out["eager"][-1] != out["eager"][0]
    assert out["eager_graphs"] == 0 and out["compiled_graphs"] >= 2  # both towers were captured


def test_compile_marks_both_towers_and_refuses_zero3():
    from powerclip.model.factory import create_model
    from powerclip.train.build_model import build_model, compile_towers
    from powerclip.train.dist_env import DistEnv

    cfg = tiny_config()
    model = create_model(cfg.model)
    names = [n for n, _ in model.named_parameters()]
    compile_towers(model, "eager")
    assert model.clip.visual._compiled_call_impl is not None and model.clip.transformer._compiled_call_impl is not None
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ConfigError, match="train.compile"):
        build_model(tiny_config(["train.compile=true", "train.zero_stage=3"]), env)
