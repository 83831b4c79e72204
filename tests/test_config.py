"""Every preset in configs/ loads and validates; bad keys and bad values fail naming the key, both
from YAML files and from command-line overrides (through ``powerclip train``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from powerclip.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
# Presets that deliberately leave values to the command line (they say so in their header): the
# DeGLA stage refuses to start from random weights. Without these overrides they must fail naming
# the key; with them they must validate.
REQUIRED: dict[str, list[str]] = {
    "degla_vitb32_coco.yaml": ["model.pretrained=openai", "data.sources=[{shards: '/data/coco/{00000..00001}.tar'}]"],
    "degla_tiny_cpu.yaml": ["model.pretrained=runs/tiny_cpu/export"],
}


def test_there_are_presets():
    names = {p.name for p in PRESETS}
    assert {"tiny_cpu.yaml", "clip_vitb16_cc12m.yaml", "powerclip_vitb16_cc12m.yaml",
            "concept_siglip_vitb16_cc3m.yaml"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_validates(preset):
    required = REQUIRED.get(preset.name, [])
    if required:
        with pytest.raises(ConfigError, match="|".join(o.split("=")[0].replace(".", r"\.") for o in required)):
            load_config(preset)
    cfg = load_config(preset, required)
    assert cfg.train.steps > 0 and cfg.data.sources, f"{preset.name}: no steps or no data sources"


def test_paper_recipes_are_what_methods_says():
    pc = load_config(ROOT / "configs/powerclip_vitb16_cc12m.yaml")
    assert (pc.model.name, pc.optim.lr, pc.optim.weight_decay, pc.optim.betas[1], pc.optim.warmup_steps,
            pc.loss.powerset.weight, pc.train.precision) == ("ViT-B-16", 1e-3, 0.2, 0.98, 10000, 0.2, "amp_bf16")
    assert pc.loss.powerset.margin == 0.2 and pc.data.num_regions == 10
    # global batch 4096 over 32 ranks, 32 epochs of ~10M pairs
    assert pc.data.batch_size * 32 * pc.train.accum_steps == 4096
    assert pc.train.steps * 4096 == pytest.approx(32 * 10.0e6, rel=0.01)
    c2 = load_config(ROOT / "configs/concept_siglip_vitb16_cc3m.yaml")
    assert (c2.model.name, c2.optim.lr, c2.loss.global_loss, c2.loss.concept.npc_weight,
            c2.loss.concept.xac_weight, c2.data.concepts) == ("ViT-B-16-SigLIP", 1e-5, "siglip", 1.0, 0.01, True)
    tiny = load_config(ROOT / "configs/tiny_cpu.yaml")
    assert (tiny.train.zero_stage, tiny.train.precision) == (2, "fp32")
    assert tiny.data.context_length == tiny.model.config["text_cfg"]["context_length"]


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1e-4", "optim.lrr"),            # unknown key
    ("train.steps=many", "train.steps"),        # wrong type
    ("train.precision=fp8", "train.precision"),  # not a choice
    ("train.zero_stage=4", "train.zero_stage"),  # out of range
    ("optim.lr=-1", "optim.lr"),                # must be positive
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/tiny_cpu.yaml", [override])


def test_bad_key_in_yaml_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(bad)
    bad.write_text("optim:\n  warmup_steps: soon\n")
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps"):
        load_config(bad)


def test_overrides_apply():
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", ["optim.lr=1e-4", "train.steps=7",
                                                        "train.deepspeed={zero_optimization: {overlap_comm: true}}"])
    assert (cfg.optim.lr, cfg.train.steps) == (1e-4, 7)
    assert cfg.train.deepspeed == {"zero_optimization": {"overlap_comm": True}}


def test_powerclip_train_cli_rejects_a_bad_key(capsys):
    from powerclip.cli import main

    rc = main(["train", "-c", str(ROOT / "configs/tiny_cpu.yaml"), "optim.lrr=1e-4"])
    assert rc == 2
    assert "optim.lrr" in capsys.readouterr().err
