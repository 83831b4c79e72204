"""EMA teacher: edge cases of the decay, a hand computation, checkpoint round trip, and real DeepSpeed
engines (ZeRO 0-3) on 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from powerclip.train.ema import EmaTeacher
from tests.dist_helpers import run_on_ranks


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    m.register_buffer("counter", torch.zeros(1))
    return m


def _train_steps(model: nn.Module, ema: EmaTeacher | None, steps: int, seed: int = 1) -> list[dict]:
    """SGD steps on random data; returns the student's weights after every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        loss = model(torch.randn(5, 4, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.counter += 1
        if ema is not None:
            ema.update(model)
        history.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return history


def _teacher(ema: EmaTeacher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ema.module.named_parameters()}


def test_decay_one_keeps_the_starting_weights():
    model = _model()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    ema = EmaTeacher(model, decay=1.0)
    hist = _train_steps(model, ema, 3)
    assert not torch.equal(hist[-1]["0.weight"], start["0.weight"])  # the student did move
    for k, v in _teacher(ema).items():
        assert torch.equal(v, start[k]), k
    assert ema.num_updates == 3
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_decay_zero_follows_the_student():
    model = _model()
    ema = EmaTeacher(model, decay=0.0)
    hist = _train_steps(model, ema, 3)
    for k, v in _teacher(ema).items():
        assert torch.equal(v, hist[-1][k]), k
    assert torch.equal(ema.module.counter, model.counter)  # buffers are copied


def test_two_steps_by_hand():
    model = _model()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    ema = EmaTeacher(model, decay=0.75)
    s1, s2 = _train_steps(model, ema, 2)
    for k, v in _teacher(ema).items():
        t1 = 0.75 * start[k] + 0.25 * s1[k]
        t2 = 0.75 * t1 + 0.25 * s2[k]
        torch.testing.assert_close(v, t2, rtol=0, atol=1e-6)


def test_teacher_is_fp32_even_for_a_half_student():
    model = _model().to(torch.bfloat16)
    ema = EmaTeacher(model, decay=0.9996)
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the student is untouched


def test_checkpoint_round_trip_continues_the_same_ema(tmp_path):
    ref_model = _model()
    ref = EmaTeacher(ref_model, decay=0.9)
    _train_steps(ref_model, ref, 2, seed=1)
    _train_steps(ref_model, ref, 2, seed=2)

    model = _model()
    ema = EmaTeacher(model, decay=0.9)
    _train_steps(model, ema, 2, seed=1)
    path = ema.save(tmp_path / "ema.pt")
    student_state = {k: v.clone() for k, v in model.state_dict().items()}
    # "restart": a fresh student (restored from its checkpoint) and a fresh teacher (from the file)
    model2 = _model(seed=7)
    model2.load_state_dict(student_state)
    ema2 = EmaTeacher(model2, decay=0.9)
    ema2.load(path)
    assert ema2.num_updates == 2
    _train_steps(model2, ema2, 2, seed=2)
    for k, v in _teacher(ema2).items():
        torch.testing.assert_close(v, _teacher(ref)[k], rtol=0, atol=1e-6)
    assert not list(tmp_path.glob("*.tmp"))
    state = torch.load(path, weights_only=True)  # tensors and primitives only
    assert set(state) == {"module", "decay", "num_updates"}


def test_bad_decay_and_mismatched_template():
    with pytest.raises(ValueError, match="decay"):
        EmaTeacher(_model(), decay=1.5)
    with pytest.raises(ValueError, match="differ"):
        EmaTeacher(_model(), decay=0.5, template=nn.Linear(4, 3))


# -------------------------------------------------------------- DeepSpeed engines, 2 gloo ranks
def _ds_case(rank: int, world: int, stages: list[int]) -> dict:
    import deepspeed

    alpha = 0.6
    out = {}
    for stage in stages:
        model = _model()
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               # threshold 10: the biases (8 and 3 values) stay gathered between steps ("persistent")
               "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 10},
               "optimizer": {"type": "Adam", "params": {"lr": 0.05, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
        # ZeRO-3 partitions the parameters in place: build the teacher from a fresh template module
        template = _model(seed=99) if stage == 3 else None
        ema = EmaTeacher(engine, decay=alpha, template=template, bucket_numel=40)  # several buckets
        expected = {k: v.clone() for k, v in start.items()}
        got_init = _teacher(ema)
        gen = torch.Generator().manual_seed(10 + rank)
        statuses = []
        for _ in range(4):
            loss = engine(torch.randn(2, 4, generator=gen)).pow(2).mean()
            engine.backward(loss)
            engine.step()
            before = [str(getattr(p, "ds_status", "")) for p in engine.module.parameters()]
            ema.update(engine)
            statuses.append(before == [str(getattr(p, "ds_status", "")) for p in engine.module.parameters()])
            params = list(engine.module.named_parameters())
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                student = {k: p.detach().clone() for k, p in params}
            for k in expected:
                expected[k] = alpha * expected[k] + (1 - alpha) * student[k]
        out[stage] = {"init": got_init, "start": start, "teacher": _teacher(ema), "expected": expected,
                      "partitioned": any(p.numel() == 0 for p in engine.module.parameters()),
                      "persistent": sum(bool(getattr(p, "ds_persist", False)) for p in engine.module.parameters()),
                      "status_kept": all(statuses)}
    return out


@pytest.mark.slow
def test_deepspeed_zero_stages_on_two_ranks():
    stages = [0, 2, 3]
    r0, r1 = run_on_ranks(_ds_case, 2, stages)
    for stage in stages:
        a, b = r0[stage], r1[stage]
        assert a["partitioned"] == (stage == 3)  # the ZeRO-3 case really is partitioned
        # ZeRO-3 keeps its persistent (small) parameters gathered: the EMA read must not free them
        assert a["status_kept"] and (stage != 3 or a["persistent"] > 0)
        for k in a["start"]:
            assert torch.equal(a["init"][k], a["start"][k]), (stage, k)  # starting weights
            torch.testing.assert_close(a["teacher"][k], a["expected"][k], rtol=0, atol=1e-6)
            assert torch.equal(a["teacher"][k], b["teacher"][k]), (stage, k)  # identical on ranks
            assert not torch.equal(a["teacher"][k], a["start"][k])  # and it moved


def test_teacher_features_of_a_real_model_in_half_precision():
    """The fp32 teacher runs on a batch whose images were cast to the run's half dtype."""
    from powerclip.data.batch import Batch
    from powerclip.model.factory import create_model
    from tests.tiny import tiny_config

    torch.manual_seed(0)
    model = create_model(tiny_config().model)
    ema = EmaTeacher(model, decay=0.9)
    b, n = 3, 2
    batch = Batch(keys=["a", "b", "c"], images=torch.randn(b, 3, 32, 32),
                  text=torch.randint(1, 400, (b, 77)), neg_text=torch.randint(1, 400, (b, n, 77)),
                  neg_valid=torch.ones(b, n, dtype=torch.bool))
    with torch.no_grad():
        ref = model(batch)
    exact = ema.features(batch)
    torch.testing.assert_close(exact.image, ref.image, atol=1e-5, rtol=0)  # eval vs train kernels
    torch.testing.assert_close(exact.negatives, ref.negatives, atol=1e-5, rtol=0)
    half = ema.features(batch.to("cpu", torch.bfloat16), torch.bfloat16)
    assert half.negatives.shape == (b, n, ref.text.shape[-1]) and not half.image.requires_grad
    torch.testing.assert_close(half.text.float(), ref.text, atol=0.05, rtol=0)
