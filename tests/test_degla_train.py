"""The DeGLA stage through the real trainer: synthetic shards with negatives, a tiny model initialised
from an exported open_clip folder, 2 gloo ranks at ZeRO-3, the EMA teacher saved with every
checkpoint and restored on resume (a resumed run continues the same EMA), presets that refuse to
start without starting weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from powerclip.config import ConfigError, load_config
from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]


def _cfg(root: Path, synth: Path, run: str, steps: int, decay: float = 0.5, *extra: str):
    return tiny_config([
        f"data.sources=[{{shards: '{synth}/train/{{00000..00002}}.tar'}}]", "data.batch_size=4",
        "data.workers=0", "data.num_negatives=4", f"model.pretrained={root / 'pretrained'}",
        "loss.degla.enabled=true", "loss.degla.require_pretrained=true", f"loss.degla.ema_decay={decay}",
        f"train.run_dir={root / run}", f"train.steps={steps}", "train.zero_stage=3", "train.log_every=1",
        "optim.lr=1e-3", "optim.warmup_steps=1", "optim.schedule=constant",  # resume with a longer run
        "checkpoint.every_steps=2", "checkpoint.keep_last=5", *extra])


def _teacher_at(run_dir: Path, step: int) -> dict:
    """The EMA teacher file saved next to the DeepSpeed checkpoint of ``step``."""
    from powerclip.checkpoints.layout import tag_for

    return torch.load(run_dir / "checkpoints" / tag_for(step) / "ema_teacher.pt", weights_only=True)


def _job(rank: int, world: int, root: str, synth: str) -> dict:
    from powerclip.train.loop import train

    root_p, synth_p = Path(root), Path(synth)
    out = {"frozen": train(_cfg(root_p, synth_p, "frozen", 2, decay=1.0))["losses"],
           "full": train(_cfg(root_p, synth_p, "full", 4))["losses"]}
    first = train(_cfg(root_p, synth_p, "part", 2))["losses"]
    out["resumed"] = first + train(_cfg(root_p, synth_p, "part", 4))["losses"]
    out["bf16_teacher"] = train(_cfg(root_p, synth_p, "bf16t", 2, 0.5, "loss.degla.ema_dtype=bf16",
                                     "train.precision=bf16"))["losses"]
    return out


@pytest.fixture(scope="module")
def degla_runs(tmp_path_factory, synthetic_root):
    from powerclip.export import export_open_clip
    from powerclip.model.factory import create_model, model_cfg_dict, preprocess_cfg, reference_model

    root = tmp_path_factory.mktemp("degla_train")
    cfg = tiny_config()
    torch.manual_seed(123)
    model = create_model(cfg.model)
    mcfg = model_cfg_dict(cfg.model)
    export_open_clip(model, mcfg, preprocess_cfg(reference_model(mcfg)), root / "pretrained")
    results = run_on_ranks(_job, 2, str(root), str(synthetic_root))
    return root, results


@pytest.mark.slow
def test_degla_stage_trains_logs_every_term_and_starts_from_the_export(degla_runs):
    from safetensors.torch import load_file

    root, (r0, r1) = degla_runs
    assert r0["full"] == r1["full"] and len(r0["full"]) == 4
    assert all(torch.isfinite(torch.tensor(r0["full"])))
    recs = [json.loads(line) for line in (root / "full" / "metrics.jsonl").read_text().splitlines()]
    for name in ("degla_base", "degla_igc", "degla_tgc", "degla_distill"):
        assert all(f"loss/{name}" in r for r in recs), name
    assert recs[0]["loss/degla_distill"] == pytest.approx(0.0, abs=1e-10)  # teacher == student at step 1
    assert recs[-1]["loss/degla_distill"] > 0
    # decay 1: the teacher stays exactly the exported starting weights
    start = load_file(str(root / "pretrained" / "open_clip_model.safetensors"))
    frozen = _teacher_at(root / "frozen", 2)
    assert frozen["num_updates"] == 2
    for k, v in start.items():
        torch.testing.assert_close(frozen["module"][f"clip.{k}"].reshape(v.shape), v, rtol=0, atol=0)
    moved = _teacher_at(root / "full", 4)["module"]
    assert any(not torch.equal(moved[f"clip.{k}"].reshape(v.shape), v) for k, v in start.items())


@pytest.mark.slow
def test_bf16_teacher_trains_and_is_saved_in_bf16(degla_runs):
    root, results = degla_runs
    assert all(math.isfinite(v) for v in results[0]["bf16_teacher"])
    saved = _teacher_at(root / "bf16t", 2)["module"]
    assert {v.dtype for k, v in saved.items() if v.is_floating_point()} == {torch.bfloat16}


def test_resumed_run_continues_the_same_ema(degla_runs):
    root, (r0, _) = degla_runs
    torch.testing.assert_close(torch.tensor(r0["resumed"]), torch.tensor(r0["full"]), rtol=1e-5, atol=1e-6)
    full, part = _teacher_at(root / "full", 4), _teacher_at(root / "part", 4)
    assert full["num_updates"] == part["num_updates"] == 4
    for k, v in full["module"].items():
        torch.testing.assert_close(part["module"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["degla_vitb32_coco.yaml", "degla_tiny_cpu.yaml"])
def test_presets_refuse_to_start_without_pretrained(preset):
    path = REPO / "configs" / preset
    with pytest.raises(ConfigError, match="model.pretrained is not set"):
        load_config(path, ["data.sources=[{shards: x.tar}]"])
    cfg = load_config(path, ["data.sources=[{shards: x.tar}]", "model.pretrained=/some/export"])
    assert cfg.loss.degla.enabled and cfg.data.num_negatives == 4 and cfg.loss.degla.tgc_scale == 10.0


def test_vitb32_preset_is_the_paper_recipe():
    cfg = load_config(REPO / "configs" / "degla_vitb32_coco.yaml",
                      ["data.sources=[{shards: x.tar}]", "model.pretrained=openai"])
    assert cfg.model.name == "ViT-B-32" and cfg.optim.lr == 1e-6 and cfg.train.precision == "amp_fp16"
    assert cfg.data.batch_size * 8 == 256 and cfg.loss.degla.ema_decay == 0.9996
    assert (cfg.loss.degla.igc_weight, cfg.loss.degla.tgc_weight, cfg.loss.degla.distill_weight) == (0.1, 0.1, 0.005)
    assert cfg.loss.degla.distill_reduction == "sum"  # the released F.mse_loss(reduction="sum")
