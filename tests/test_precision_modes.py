"""The precision modes on real tiny DeepSpeed runs on CPU in bf16/fp16 (one gloo rank): amp_bf16 and
amp_fp16 at ZeRO-0 train, resume exactly from their checkpoints and export; an elastic resume
crosses precision modes (bf16 weights at ZeRO-1 <-> amp_bf16 at ZeRO-0 and at ZeRO-1); bf16/fp16
weights at ZeRO-0 are refused in one line; a non-finite loss at ZeRO-0 (checked after backward)
leaves the weights untouched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from powerclip.config import ConfigError
from powerclip.train.engine import deepspeed_config
from tests.dist_helpers import run_on_ranks
from tests.test_train_engine import MemoryLoader, NanLoader
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent


class CursorLoader(MemoryLoader):
    """MemoryLoader that also takes the elastic resume's cursor list (same ranks: each keeps its own)."""

    def __init__(self, cfg, rank: int, world_size: int, state: dict | None = None):
        if state is not None and "elastic_from" in state:
            state = state["elastic_from"][rank]
        super().__init__(cfg, rank, world_size, state)


def _cfg(run_dir: Path, precision: str, stage: int, steps: int, extra: tuple[str, ...] = ()):
    return tiny_config([f"train.run_dir={run_dir}", "data.batch_size=4", f"train.zero_stage={stage}",
                        f"train.precision={precision}", f"train.steps={steps}", "train.log_every=1",
                        # a constant lr: a run cut short at step 2 and resumed to 4 follows the 4-step run
                        "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=constant",
                        "checkpoint.every_steps=2", *extra])


def _resume_job(rank: int, world: int, root: str) -> dict:
    from powerclip.train import elastic
    from powerclip.train.loop import train

    out = {}
    for precision in ("amp_bf16", "amp_fp16"):
        full = train(_cfg(Path(root) / f"{precision}-full", precision, 0, 4), build_loader=MemoryLoader)
        part = Path(root) / f"{precision}-part"
        train(_cfg(part, precision, 0, 2), build_loader=MemoryLoader)
        resumed = train(_cfg(part, precision, 0, 4), build_loader=MemoryLoader)
        out[precision] = {"full": full["losses"], "resumed": resumed["losses"]}
    # elastic across modes: bf16 weights at ZeRO-1 (BF16_Optimizer) -> amp_bf16 at ZeRO-0 -> amp_bf16
    # at ZeRO-1 (fp32 ZeRO optimiser) -> bf16 at ZeRO-1 again; each leg resumes the previous one's checkpoint
    run = Path(root) / "cross"
    legs = [("bf16", 1, 2), ("amp_bf16", 0, 4), ("amp_bf16", 1, 6), ("bf16", 1, 8)]
    out["cross"] = [train(_cfg(run, p, z, n), build_loader=CursorLoader)["losses"] for p, z, n in legs]
    out["cross_ref"] = train(_cfg(Path(root) / "cross-ref", "bf16", 1, 8), build_loader=MemoryLoader)["losses"]
    nan = train(_cfg(Path(root) / "nan", "amp_bf16", 0, 3, ("checkpoint.every_steps=0",)), build_loader=NanLoader)
    out["nan"] = {"losses": nan["losses"], "skipped": nan["skipped_steps"]}
    # amp_fp16's loss scale halves at the non-finite step 2; the resume before step 3 continues from it
    scales = Path(root) / "scale"
    for steps in (2, 3):
        train(_cfg(scales, "amp_fp16", 0, steps, ("checkpoint.every_steps=1",)), build_loader=NanLoader)
    out["scales"] = [elastic.read_client_state(scales / "checkpoints" / f"step_{s:08d}")["grad_scaler"]["scale"]
                     for s in (1, 2, 3)]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    return root, run_on_ranks(_resume_job, 1, str(root))[0]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_amp_modes_train_and_resume_exactly(runs, precision):
    _, out = runs
    full, resumed = out[precision]["full"], out[precision]["resumed"]
    assert len(full) == 4 and len(resumed) == 2 and all(math.isfinite(x) for x in full)
    # the same process, thread count and data: the resumed steps 3-4 are the uninterrupted run's
    assert resumed == pytest.approx(full[2:], abs=1e-6)


@pytest.mark.slow
def test_elastic_resume_across_precision_modes(runs):
    _, out = runs
    legs, ref = out["cross"], out["cross_ref"]
    assert [len(x) for x in legs] == [2, 2, 2, 2]
    got = [x for leg in legs for x in leg]
    assert all(math.isfinite(x) for x in got)
    # the weights and Adam moments carry over (a fresh start would begin again near log(4) ~ 1.386 and
    # never follow the reference); between modes only bf16-versus-fp32 weight rounding differs
    assert got == pytest.approx(ref, abs=0.05)


@pytest.mark.slow
def test_nonfinite_loss_at_zero0_skips_after_backward(runs):
    _, out = runs
    assert out["nan"]["skipped"] == 1 and len(out["nan"]["losses"]) == 3
    assert math.isfinite(out["nan"]["losses"][2])  # the weights stayed finite: the NaN step was dropped


@pytest.mark.slow
def test_amp_fp16_loss_scale_survives_a_resume(runs):
    # GradScaler's initial 65536, halved by the NaN step 2, kept across the restart before step 3 (a scale
    # that restarted would read 65536 again at step 3); powers of two: exact in any process
    assert runs[1]["scales"] == [65536.0, 32768.0, 32768.0]


@pytest.mark.slow
def test_amp_checkpoint_exports(runs, tmp_path):
    from safetensors.torch import load_file

    from powerclip.checkpoints.safe_load import safe_load
    from powerclip.cli import main as cli_main

    root, _ = runs
    run = root / "amp_bf16-full"
    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    weights = load_file(out / "open_clip_model.safetensors")
    tag = (run / "checkpoints" / "latest").read_text().strip()
    module = safe_load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt")["module"]
    saved = {k[len("clip."):]: v for k, v in module.items() if k.startswith("clip.")}
    assert set(saved) == set(weights)
    for name, w in weights.items():  # fp32 weights: exported bit for bit
        assert w.dtype == torch.float32 and torch.equal(w, saved[name].float().reshape(w.shape)), name


@pytest.mark.parametrize("half", ["bf16", "fp16"])
def test_half_weights_at_zero0_refused_in_one_line(half):
    with pytest.raises(ConfigError, match=f"amp_{half}") as e:
        deepspeed_config(tiny_config(["train.zero_stage=0", f"train.precision={half}"]), 1)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="ZeRO-0"):  # through train.deepspeed too
        deepspeed_config(tiny_config(["train.zero_stage=0", f"train.deepspeed={{{half}: {{enabled: true}}}}"]), 1)
    assert deepspeed_config(tiny_config(["train.zero_stage=1", f"train.precision={half}"]), 1)[half]["enabled"]


def test_amp_config_derivation():
    ds = deepspeed_config(tiny_config(["train.zero_stage=0", "train.precision=amp_bf16"]), 1)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": []}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 0.0  # powerclip clips at ZeRO-0 with fp32 weights (foreach norm)
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    z1 = deepspeed_config(tiny_config(["train.zero_stage=1", "train.precision=amp_fp16", "train.reduce_dtype=fp16"]), 2)
    assert z1["torch_autocast"] == {"enabled": True, "dtype": "fp16"} and z1["gradient_clipping"] == 1.0


def test_a_nonfinite_gradient_norm_gates_the_step_only_when_it_is_this_steps():
    from powerclip.train.step_sync import HostStats, reduce_step

    loss, scale = torch.tensor(1.0), torch.tensor(4.0)
    for norm, gates, applied in [(float("inf"), True, False), (float("nan"), True, False),
                                 (2.0, True, True), (float("inf"), False, True)]:
        host = HostStats(grad_norm=torch.tensor(norm), valid=True)
        r = reduce_step(loss, {}, scale, host, norm_gates=gates)
        assert r.applied is applied, (norm, gates)
        assert r.loss == 1.0


def test_train_refuses_half_weights_at_zero0_before_writing_anything(tmp_path, synthetic_root):
    import subprocess
    import sys

    run = tmp_path / "run"
    shards = str(synthetic_root / "train" / "{00000..00002}.tar")  # real shards: the data check passes
    proc = subprocess.run([sys.executable, "-m", "powerclip", "train", "-c", str(ROOT / "configs" / "tiny_cpu.yaml"),
                           f"data.sources=[{{shards: '{shards}'}}]", "model.config.vision_cfg.image_size=32",
                           "train.precision=fp16", "train.zero_stage=0", f"train.run_dir={run}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("powerclip train: error")]
    assert len(errors) == 1 and "train.precision=amp_fp16" in errors[0] and "Traceback" not in proc.stderr
    assert not run.exists()
