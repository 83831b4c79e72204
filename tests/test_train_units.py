"""Unit tests of the engine's small modules: parameter groups and schedule, the derived DeepSpeed
config, launcher environments, checkpoint encoding / pruning / latest pointer, micro-batch concat."""

from __future__ import annotations

import math

import pytest
import torch

from powerclip.checkpoints import codec, integrity, layout
from powerclip.data.batch import Batch
from powerclip.train import checkpoint as ckpt
from powerclip.train.accum import concat_batches
from powerclip.train.dist_env import _slurm_master_addr, export_env_from_launcher
from powerclip.train.engine import deepspeed_config
from powerclip.train.optim import build_optimizer, lr_lambda
from powerclip.train.param_groups import param_groups
from tests.tiny import tiny_config


def test_no_weight_decay_on_gains_biases_and_logit_scale():
    from powerclip.model.factory import create_model

    cfg = tiny_config(["model.init_logit_bias=-10.0"])
    model = create_model(cfg.model)
    groups = param_groups(model, 0.2)
    names = {g["name"]: g for g in groups}
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    no_decay = {by_id[id(p)] for p in names["no_decay"]["params"]}
    decay = {by_id[id(p)] for p in names["decay"]["params"]}
    assert names["no_decay"]["weight_decay"] == 0.0 and names["decay"]["weight_decay"] == 0.2
    assert decay | no_decay == set(params) and not decay & no_decay
    assert {n for n in params if n.endswith(("logit_scale", "logit_bias"))} <= no_decay
    assert all(params[n].ndim >= 2 and not n.endswith("bias") for n in decay)
    assert all(params[n].ndim < 2 or n.endswith(("bias", "logit_scale", "logit_bias")) for n in no_decay)
    assert any("ln_" in n for n in no_decay) and any("attn.in_proj_weight" in n for n in decay)


def test_fused_adamw_matches_the_per_parameter_loop():
    """optim.fused (the default) takes the same AdamW steps as torch's default loop implementation."""
    from powerclip.model.factory import create_model

    models, opts = [], []
    for fused in (True, False):
        cfg = tiny_config([f"optim.fused={str(fused).lower()}", "optim.weight_decay=0.1"])
        torch.manual_seed(0)
        models.append(create_model(cfg.model))
        opts.append(build_optimizer(models[-1], cfg.optim))
        assert opts[-1].defaults["fused"] is fused
    before = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert all(not torch.equal(before[n], p) for n, p in models[0].named_parameters())  # it did step


def test_warmup_then_cosine():
    cfg = tiny_config(["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    f = lr_lambda(cfg, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    const = lr_lambda(tiny_config(["optim.schedule=constant", "optim.warmup_steps=0"]).optim, 100)
    assert const(0) == const(99) == 1.0


def test_deepspeed_config_derivation_and_merge():
    cfg = tiny_config(["data.batch_size=16", "train.accum_steps=4", "train.zero_stage=3",
                       "train.precision=bf16", "optim.grad_clip=0.5",
                       "train.deepspeed={zero_optimization: {overlap_comm: false}}"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 16 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    fp16 = deepspeed_config(tiny_config(["train.precision=fp16"]), 1)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling
    bad = tiny_config(["train.deepspeed={train_batch_size: 7}"])
    with pytest.raises(ValueError, match="batch sizes"):
        deepspeed_config(bad, 2)


def test_slurm_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08],cpu1")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here
    export_env_from_launcher()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node3")
    assert _slurm_master_addr() == "node3"


def test_torchrun_environment_is_kept(monkeypatch):
    import os

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "12345")
    monkeypatch.setenv("SLURM_PROCID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "9")
    export_env_from_launcher()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("1", "2", "12345")


def test_deepspeed_objects_round_trip_through_primitives(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    state = {"loss_scaler": scaler, "zero_stage": ZeroStageEnum.gradients,
             "maps": [{"w": fragment_address(numel=4, start=2)}], "t": torch.arange(3), "s": {"b", "a"}}
    torch.save(codec.encode(state), tmp_path / "x.pt")
    loaded = codec.decode(torch.load(tmp_path / "x.pt", weights_only=True))
    assert isinstance(loaded["loss_scaler"], DynamicLossScaler) and loaded["loss_scaler"].cur_scale == 2.0**16
    assert loaded["zero_stage"] == 2 and loaded["maps"][0]["w"] == fragment_address(numel=4, start=2)
    assert torch.equal(loaded["t"], torch.arange(3)) and loaded["s"] == ["a", "b"]
    with pytest.raises(TypeError, match=r"\.bad"):
        codec.encode({"bad": object()})
    with pytest.raises(ValueError, match="refusing"):
        codec.decode({"__powerclip_object__": "os:system", "state": {}})


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(codec.decode(codec.encode(state)))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_latest_and_pruning(tmp_path):
    for step in (2, 4, 6, 8):
        (tmp_path / layout.tag_for(step)).mkdir()
        (tmp_path / layout.tag_for(step) / "w.pt").write_bytes(bytes([step]))
    for step in (2, 4, 6):  # sealed by this process; step 8 is an unsealed (interrupted) save
        integrity.seal(tmp_path / layout.tag_for(step), 0, 1)
    layout.write_latest(tmp_path, layout.tag_for(6))
    removed = ckpt.prune(tmp_path, keep_last=2)
    # the oldest complete one this process wrote goes; the unsealed step 8 is not ours to delete
    assert removed == ["step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006",
                                                                        "step_00000008"]
    assert layout.read_latest(tmp_path) == "step_00000006"
    assert not list(tmp_path.glob(".latest.tmp*"))
    assert ckpt.resolve_resume("latest", tmp_path) == (tmp_path, "step_00000006")
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path / "fresh") is None
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        ckpt.resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    # checkpoint.resume=PATH takes the same three forms as export: root, run folder, one tag folder
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "fresh") == (tmp_path, "step_00000006")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):  # a run folder without checkpoints
        ckpt.resolve_resume(str(run), tmp_path / "fresh")
    (run / "checkpoints" / layout.tag_for(5)).mkdir()
    (run / "checkpoints" / layout.tag_for(5) / "mp_rank_00_model_states.pt").write_bytes(b"w")
    integrity.seal(run / "checkpoints" / layout.tag_for(5), 0, 1)
    layout.write_latest(run / "checkpoints", layout.tag_for(5))
    assert ckpt.resolve_resume(str(run), tmp_path / "fresh") == (run / "checkpoints", "step_00000005")
    tag_dir = run / "checkpoints" / layout.tag_for(5)
    assert ckpt.resolve_resume(str(tag_dir), tmp_path / "fresh") == (run / "checkpoints", "step_00000005")
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x")  # same size, other bytes
    with pytest.raises(integrity.CheckpointIntegrityError, match="sha256 differs"):
        ckpt.resolve_resume(str(tag_dir), tmp_path / "fresh")
    # a checkpoint folder another process wrote is never pruned, even when it is old
    other = tmp_path / "other"
    for step in (1, 2, 3):
        (other / layout.tag_for(step)).mkdir(parents=True)
        (other / layout.tag_for(step) / "checksums.json").write_text('{"files": {}}')
    layout.write_latest(other, layout.tag_for(3))
    assert ckpt.prune(other, keep_last=1) == []
    assert ckpt.prune(other, keep_last=1, inherited_before=3) == ["step_00000001", "step_00000002"]


def test_concat_batches_pads_phrases_and_offsets_concept_owners():
    def batch(b: int, k: int, c: int) -> Batch:
        return Batch(keys=[f"k{i}" for i in range(b)], images=torch.randn(b, 3, 8, 8),
                     text=torch.randint(0, 9, (b, 5)), phrase_tokens=torch.ones(b, k, 5, dtype=torch.bool),
                     phrase_valid=torch.ones(b, k, dtype=torch.bool), concept_text=torch.ones(c, 5, dtype=torch.long),
                     concept_owner=torch.arange(c) % b, concept_ids=torch.arange(c))

    x, y = batch(2, 3, 3), batch(3, 1, 2)
    z = concat_batches([x, y])
    assert z.size == 5 and z.keys == x.keys + y.keys
    assert z.phrase_tokens.shape == (5, 3, 5) and z.phrase_valid.tolist()[2:] == [[True, False, False]] * 3
    assert z.concept_owner.tolist() == [0, 1, 0, 2 + 0, 2 + 1]
    assert torch.equal(z.images[:2], x.images) and z.region_masks is None
    assert math.isclose(float(z.images[2:].sum()), float(y.images.sum()), rel_tol=1e-6)


def test_checkpoint_due_by_steps_minutes_and_at_the_end():
    import time

    from powerclip.train.loop import checkpoint_due

    cfg = tiny_config(["checkpoint.every_steps=5", "train.steps=12"])
    now = time.monotonic()
    assert [s for s in range(1, 13) if checkpoint_due(cfg, s, now)] == [5, 10, 12]
    by_time = tiny_config(["checkpoint.every_steps=0", "checkpoint.every_minutes=1", "train.steps=100"])
    assert not checkpoint_due(by_time, 3, now)
    assert checkpoint_due(by_time, 3, now - 61)


def test_train_state_counts_steps_and_round_trips_through_a_checkpoint():
    from powerclip.train.state import TrainState

    state = TrainState()
    state.advance(global_batch=8, applied=True)
    state.advance(global_batch=8, applied=False)  # a skipped step still consumed its samples
    state.advance(global_batch=8, applied=True)
    assert (state.step, state.samples_seen, state.skipped_steps, state.resumed_step) == (3, 24, 1, None)
    saved = codec.decode(codec.encode(state.state_dict()))
    # the checkpoint's client state: these keys in this order, plain ints (what older checkpoints hold)
    assert list(saved.items()) == [("step", 3), ("samples_seen", 24), ("skipped_steps", 1)]
    assert all(type(v) is int for v in saved.values())
    assert state.prune_before(True) is None  # a fresh run inherited nothing to prune

    resumed = TrainState()
    resumed.load_state_dict({**saved, "config_hash": "x", "ranks": []})  # the rest of the client state
    assert resumed.state_dict() == saved and resumed.resumed_step == 3
    assert resumed.prune_before(True) == 3 and resumed.prune_before(False) is None
    resumed.advance(global_batch=8, applied=True)
    assert resumed.state_dict() == {"step": 4, "samples_seen": 32, "skipped_steps": 1} and resumed.resumed_step == 3
    with pytest.raises(KeyError, match="skipped_steps"):
        TrainState().load_state_dict({"step": 1, "samples_seen": 2})


def test_safe_load_maps_zip_files_and_reads_legacy_ones(tmp_path):
    from powerclip.checkpoints.safe_load import CheckpointReadError, safe_load

    obj = {"powerclip": {"step": 3}, "w": torch.arange(4.0)}
    torch.save(obj, tmp_path / "zip.pt")
    torch.save(obj, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be mapped
    for name in ("zip.pt", "legacy.pt"):
        got = safe_load(tmp_path / name, mmap=True)
        assert got["powerclip"] == {"step": 3} and torch.equal(got["w"], obj["w"]), name
    (tmp_path / "cut.pt").write_bytes((tmp_path / "zip.pt").read_bytes()[:100])
    with pytest.raises(CheckpointReadError, match="cut.pt"):
        safe_load(tmp_path / "cut.pt", mmap=True)
