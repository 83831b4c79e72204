"""Tower locking, per-tower lr / weight decay and layer-wise lr decay (powerclip.train.param_groups).

* every parameter's group lr is the EVA-CLIP formula, written out here by name for the tiny model;
* a real DeepSpeed engine on CPU at ZeRO 0-3: locked parameters get no gradient and no Adam state,
  stay bit-identical over training steps, and each group's lr after the steps is its own peak lr x
  the schedule's multiplier (DeepSpeed steps the LambdaLR over all groups);
* a locked run trains, resumes, resumes elastically at another ZeRO stage and exports with the
  locked tower's weights exactly its starting ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from powerclip.config import ConfigError
from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config

DEPTH = 2  # the tiny towers' blocks


def _expected_layer(name: str) -> int:
    """EVA-CLIP's layer id of a tiny-model parameter, spelled out (0 embeddings .. DEPTH + 1 head)."""
    n = name.removeprefix("clip.").removeprefix("visual.")
    for i in range(DEPTH):
        if n.startswith(f"transformer.resblocks.{i}."):
            return i + 1
    if n.split(".")[0] in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding"):
        return 0
    assert n.split(".")[0] in ("ln_post", "proj", "ln_final", "text_projection"), name
    return DEPTH + 1


def _lr_by_name(model, groups) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in groups:
        for p in g["params"]:
            assert names[id(p)] not in out  # every parameter in one group
            out[names[id(p)]] = (g["lr"], g["weight_decay"])
    return out


def test_layer_decay_lr_and_weight_decay_per_parameter_follow_the_formula():
    from powerclip.model.factory import create_model
    from powerclip.train.param_groups import group_table, no_weight_decay, optimizer_groups

    cfg = tiny_config(["optim.lr=1e-3", "optim.weight_decay=0.2", "optim.image.layer_decay=0.5",
                       "optim.image.weight_decay=0.05", "optim.text.lr=2e-3", "optim.text.layer_decay=0.8"])
    model = create_model(cfg.model)
    groups = optimizer_groups(model, cfg.optim)
    got = _lr_by_name(model, groups)
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        lr, wd = got[name]
        if name in ("clip.logit_scale",):
            want_lr, want_wd = 1e-3, 0.0
        elif name.startswith("clip.visual."):
            want_lr, want_wd = 1e-3 * 0.5 ** (DEPTH + 1 - _expected_layer(name)), 0.05
        else:
            want_lr, want_wd = 2e-3 * 0.8 ** (DEPTH + 1 - _expected_layer(name)), 0.2
        assert lr == pytest.approx(want_lr, rel=1e-12), name
        assert wd == (0.0 if no_weight_decay(name, p) else want_wd), name
    # the head trains at the tower's lr, the embeddings at the smallest
    assert got["clip.visual.proj"][0] == pytest.approx(1e-3)
    assert got["clip.visual.conv1.weight"][0] == pytest.approx(1e-3 * 0.5 ** 3)
    table = group_table(model, groups, cfg.optim.lr).splitlines()
    assert table[0].split() == ["group", "#params", "lr", "wd"] and len(table) == len(groups) + 1
    assert sum(int(line.split()[1]) for line in table[1:]) == sum(p.numel() for p in model.parameters())
    assert any(line.split()[0] == "image.layer00.decay" for line in table)


def test_default_options_keep_the_two_groups():
    """No tower option: exactly the decay / no-decay groups (older checkpoints resume unchanged)."""
    from powerclip.model.factory import create_model
    from powerclip.train.param_groups import lock_towers, optimizer_groups, param_groups

    cfg = tiny_config(["optim.image.lock=true"])
    model = create_model(cfg.model)
    lock_towers(model, cfg.optim)
    assert [g["name"] for g in optimizer_groups(model, cfg.optim)] == ["decay", "no_decay"]
    assert [len(g["params"]) for g in optimizer_groups(model, cfg.optim)] == \
        [len(g["params"]) for g in param_groups(model, cfg.optim.weight_decay)]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("clip.visual."))


@pytest.mark.parametrize("override, needle", [
    ("optim.text.unlocked_groups=2", "optim.text.unlocked_groups=2 needs optim.text.lock=true"),
    ("optim.image.layer_decay=0", "optim.image.layer_decay must be in (0, 1]"),
    ("optim.text.lr=0", "optim.text.lr must be > 0 or null"),
    ("optim.text.freeze_bn_stats=true", "optim.text.freeze_bn_stats needs optim.image.lock=true"),
])
def test_bad_tower_options_fail_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        tiny_config([override])


# ------------------------------------------------------------------------------ the engine
LOCKS = ["optim.image.lock=true", "optim.text.lock=true", "optim.text.unlocked_groups=2",
         "optim.text.layer_decay=0.5", "optim.text.lr=3e-3"]


def _locked(name: str) -> bool:
    """image tower entirely; text: all but open_clip's last two groups (last block + ln_final, projection)."""
    n = name.removeprefix("clip.")
    if n.startswith("visual."):
        return True
    return not n.startswith((f"transformer.resblocks.{DEPTH - 1}.", "ln_final.", "text_projection", "logit_scale"))


def _engine_job(rank: int, world: int, root: str) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state

    from powerclip.losses.composer import compose_losses
    from powerclip.train.build_model import build_model
    from powerclip.train.dist_env import DistEnv
    from powerclip.train.elastic import link_optimizer_state
    from powerclip.train.engine import build_engine, features_of
    from powerclip.train.loop import seed_all, train_step
    from powerclip.train.optim import lr_lambda, scheduled_lr
    from powerclip.train.param_groups import optimizer_groups

    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    out = {}
    for stage in (0, 1, 2, 3):
        cfg = tiny_config([f"train.run_dir={root}/z{stage}", "data.batch_size=4", f"train.zero_stage={stage}",
                           "train.steps=10", "optim.lr=1e-3", "optim.warmup_steps=2", *LOCKS])
        seed_all(0)
        model = build_model(cfg, env)
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
            before = {n: p.detach().clone() for n, p in params.items()}
        peaks = [g["lr"] for g in optimizer_groups(model, cfg.optim)]
        engine, sched = build_engine(cfg, model, world)
        batches = iter(MemoryLoader(cfg, rank, world))
        # one backward by hand: which parameters receive a gradient
        batch = next(batches)
        loss, _ = compose_losses(features_of(engine(batch)), batch, cfg.loss)
        engine.backward(loss)
        grads = {n: p.grad is not None for n, p in params.items()}
        engine.step()
        for _ in range(2):
            train_step(engine, [next(batches)], cfg)
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
            after = {n: p.detach().clone() for n, p in params.items()}
        if stage == 0:
            state = {n: p in engine.optimizer.state for n, p in params.items()}
        else:
            link_optimizer_state(engine)  # DeepSpeed links the fragments before Adam's state exists
            state = {n: safe_get_full_optimizer_state(p, "exp_avg") is not None for n, p in params.items()}
        out[stage] = {"requires_grad": {n: p.requires_grad for n, p in params.items()}, "grads": grads,
                      "state": state, "same": {n: torch.equal(before[n], after[n]) for n in params},
                      "lr": [g["lr"] for g in engine.optimizer.param_groups], "peaks": peaks,
                      "multiplier": lr_lambda(cfg.optim, cfg.train.steps)(3), "steps": engine.global_steps,
                      "logged_lr": scheduled_lr(sched, cfg.optim.lr)}
    return out


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    return run_on_ranks(_engine_job, 1, str(tmp_path_factory.mktemp("locks")))[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_locked_parameters_take_no_gradient_no_state_and_stay_bit_identical(engine_runs, stage):
    r = engine_runs[stage]
    assert r["steps"] == 3
    names = sorted(r["requires_grad"])
    locked = {n for n in names if _locked(n)}
    assert locked and len(locked) < len(names)
    assert {n for n in names if not r["requires_grad"][n]} == locked
    assert not any(r["grads"][n] for n in locked)
    assert {n for n in names if r["state"][n]} == set(names) - locked  # Adam moments: trainable only
    assert all(r["same"][n] for n in locked)  # exact: same process, same tensors
    assert not any(r["same"][n] for n in set(names) - locked)  # the rest trained
    if stage == 0:  # no ZeRO: the gradients stay on the parameters, so the trainable ones show theirs
        assert all(r["grads"][n] for n in set(names) - locked)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_each_group_follows_the_schedule_from_its_own_peak_lr(engine_runs, stage):
    r = engine_runs[stage]
    assert len(r["lr"]) == len(r["peaks"]) > 2 and len(set(r["peaks"])) > 2  # layers at distinct lrs
    assert 0.5 < r["multiplier"] < 1.0  # past warm-up (2 steps), one step into the cosine
    for got, peak in zip(r["lr"], r["peaks"]):
        assert got == pytest.approx(peak * r["multiplier"], rel=1e-12)
    # the logged optim/lr is that of a parameter at optim.lr, though the first group's peak differs
    assert r["peaks"][0] != 1e-3 and r["logged_lr"] == pytest.approx(1e-3 * r["multiplier"], rel=1e-12)


# ---------------------------------------------------------------------- train, resume, export
class _ElasticMemoryLoader(MemoryLoader):
    """MemoryLoader that also takes an elastic resume's cursor (one old rank here: its own)."""

    elastic_resumes = 0

    def __init__(self, cfg, rank: int, world_size: int, state: dict | None = None):
        if state is not None and "elastic_from" in state:
            _ElasticMemoryLoader.elastic_resumes += 1
            state = {"k": max(int(d["k"]) for d in state["elastic_from"])}
        super().__init__(cfg, rank, world_size, state)


def _run_job(rank: int, world: int, root: str) -> dict:
    from powerclip.export import export_checkpoint
    from powerclip.model.factory import create_model
    from powerclip.train.loop import seed_all, train

    base = [f"train.run_dir={root}/run", "data.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=1",
            "checkpoint.every_steps=2", "train.log_every=1", *LOCKS]
    seed_all(0)
    start = create_model(tiny_config(base).model).clip.state_dict()
    out = {"first": train(tiny_config([*base, "train.zero_stage=2", "train.steps=4"]),
                          build_loader=_ElasticMemoryLoader)["losses"]}
    out["resumed"] = train(tiny_config([*base, "train.zero_stage=2", "train.steps=6"]),
                           build_loader=_ElasticMemoryLoader)["losses"]
    out["elastic"] = train(tiny_config([*base, "train.zero_stage=3", "train.steps=8"]),
                           build_loader=_ElasticMemoryLoader)["losses"]
    out["elastic_resumes"] = _ElasticMemoryLoader.elastic_resumes  # ZeRO-2 -> 3 went through elastic
    export_checkpoint(f"{root}/run", f"{root}/export")
    from safetensors.torch import load_file

    exported = load_file(f"{root}/export/open_clip_model.safetensors")
    out["same"] = {k: torch.equal(exported[k], start[k].float()) for k in start}
    return out


@pytest.mark.slow
def test_locked_run_resumes_elastically_and_exports_its_locked_tower_unchanged(tmp_path):
    r = run_on_ranks(_run_job, 1, str(tmp_path))[0]
    assert len(r["first"]) == 4 and len(r["resumed"]) == 2 and len(r["elastic"]) == 2
    assert r["elastic_resumes"] == 1
    assert all(torch.isfinite(torch.tensor(r[k])).all() for k in ("first", "resumed", "elastic"))
    locked = {k for k in r["same"] if _locked("clip." + k)}
    assert locked and all(r["same"][k] for k in locked)
    assert not any(r["same"][k] for k in set(r["same"]) - locked)
    assert Path(tmp_path / "run" / "checkpoints").is_dir()
