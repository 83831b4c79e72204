"""The loss-term registry: a term declared in this test module alone (its own config section, weight
and compute function) trains through the real trainer, and the trainer's switches, the weight table
and the benchmark's term list come from the declarations."""

from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from powerclip.config import Config, ConfigError, load_config
from powerclip.losses import composer, registry
from powerclip.losses.composer import active_terms, compose_losses, needs_dense, needs_teacher, weight_table
from powerclip.losses.global_loss import global_loss
from powerclip.losses.registry import LossContext, LossTerm, register, unregister
from tests.dist_helpers import run_on_ranks
from tests.test_composer import MODEL, _batch, _features
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ToyLossConfig:
    """The toy term's own section, ``loss.toy``: config.py does not know it."""

    weight: float = 0.0
    aux_weight: float = 0.0
    scale: float = 1.0


@dataclass
class _Switched(ToyLossConfig):
    """The toy section with an on/off switch, as DeGLA's."""

    enabled: bool = False


def toy_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference formula: scale x mean squared distance between each image and its caption."""
    return scale * (image.float() - text.float()).pow(2).sum(-1).mean()


def _toy(features, batch, cfg: ToyLossConfig, ctx: LossContext) -> dict[str, torch.Tensor]:
    assert ctx.global_loss in ("clip", "siglip")
    value = toy_loss(features.image, features.text, cfg.scale)
    return {"toy": value, "toy_aux": value * 0.5, "toy_diag_scale": torch.full((), cfg.scale, device=value.device)}


def _register_toy(**changes) -> LossTerm:
    spec = dict(name="toy", compute=_toy, section="toy", config=ToyLossConfig,
                weights={"toy": "weight", "toy_aux": "aux_weight"}, batch_fields=("text",))
    return register(LossTerm(**{**spec, **changes}))


@pytest.fixture
def toy():
    term = _register_toy()
    try:
        yield term
    finally:
        unregister("toy")


# --------------------------------------------------------------------------- a step with the toy term
def _train_job(rank: int, world: int, root: str) -> dict[str, Any]:
    from powerclip.train.loop import train
    from tests.test_train_engine import MemoryLoader

    _register_toy()
    run_dir = Path(root) / "run"
    cfg = tiny_config([f"train.run_dir={run_dir}", "data.batch_size=4", "train.zero_stage=0",
                       "train.steps=2", "train.log_every=1", "optim.lr=1e-2", "optim.warmup_steps=1",
                       "checkpoint.every_steps=0", "loss.toy.weight=0.5", "loss.toy.scale=2.0"])
    train(cfg, build_loader=MemoryLoader)
    return {"records": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
            "config": (run_dir / "config.yaml").read_text()}


@pytest.mark.slow
def test_toy_term_from_this_module_trains_a_step(tmp_path: Path):
    """The real trainer (DeepSpeed, 2 steps) with a term declared here: the weighted objective is in the
    total the engine back-propagates; the diagnostic and the zero-weight objective are not."""
    res = run_on_ranks(_train_job, 1, str(tmp_path))[0]
    assert len(res["records"]) == 2
    for rec in res["records"]:
        assert rec["loss/toy"] > 0 and rec["loss/toy_diag_scale"] == 2.0
        assert rec["loss"] == pytest.approx(rec["loss/clip"] + 0.5 * rec["loss/toy"], rel=1e-5)
    assert res["records"][0]["loss/toy"] != pytest.approx(res["records"][1]["loss/toy"], rel=1e-6)  # a step applied
    assert "toy:\n    weight: 0.5\n    aux_weight: 0.0\n    scale: 2.0" in res["config"]


# ------------------------------------------------------------------------------ declarations decide
def test_toy_section_is_a_checked_config_key(toy):
    cfg = load_config(None, MODEL + ["loss.toy.weight=0.25"])
    assert cfg.loss.toy == ToyLossConfig(weight=0.25)
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # e.g. handed to a spawned process
    with pytest.raises(ConfigError, match="loss.toy.weight must be >= 0"):
        load_config(None, MODEL + ["loss.toy.weight=-1"])
    with pytest.raises(ConfigError, match="loss.toy.nope"):
        load_config(None, MODEL + ["loss.toy.nope=1"])
    assert toy.settings(Config().loss) == ToyLossConfig()  # a config built without it: the defaults
    unregister("toy")
    with pytest.raises(ConfigError, match="loss.toy.weight"):
        load_config(None, MODEL + ["loss.toy.weight=0.25"])


def test_toy_weight_enters_the_total(toy):
    feats, batch = _features(), _batch()
    cfg = load_config(None, MODEL + ["loss.toy.weight=0.5", "loss.toy.scale=3.0"])
    assert weight_table(cfg) == {"clip": 1.0, "toy": 0.5}  # aux weight 0: off
    total, terms = compose_losses(feats, batch, cfg)
    ref_toy = toy_loss(feats.image, feats.text, 3.0)
    torch.testing.assert_close(terms["toy"], ref_toy.detach())
    torch.testing.assert_close(total, global_loss(feats, "clip") + 0.5 * ref_toy)
    cfg = load_config(None, MODEL + ["loss.toy.weight=0.5", "loss.toy.aux_weight=2.0"])
    total, _ = compose_losses(feats, batch, cfg)
    torch.testing.assert_close(total, global_loss(feats, "clip") + (0.5 + 2.0 * 0.5) * toy_loss(feats.image,
                                                                                              feats.text, 1.0))


def test_switches_come_from_the_declarations():
    _register_toy(needs={"toy": ("patches",), "toy_aux": ("teacher",)})
    try:
        off = load_config(None, MODEL)
        assert not needs_dense(off) and not needs_teacher(off) and "toy" not in [t.name for t in active_terms(off)]
        dense = load_config(None, MODEL + ["loss.toy.weight=1"])
        assert needs_dense(dense) and not needs_teacher(dense)
        teacher = load_config(None, MODEL + ["loss.toy.aux_weight=1"])
        assert needs_teacher(teacher) and not needs_dense(teacher)
        assert weight_table(teacher) == {"clip": 1.0, "toy_aux": 1.0}
    finally:
        unregister("toy")
    # a switched term that replaces the global loss: every weight counts once it is on, even 0
    _register_toy(switch="enabled", replaces=("global",), config=_Switched)
    try:
        on = load_config(None, MODEL + ["loss.toy.enabled=true", "loss.toy.weight=2"])
        assert weight_table(on) == {"toy": 2.0, "toy_aux": 0.0}
        feats = _features()
        total, terms = compose_losses(feats, _batch(), on)
        assert "clip" not in terms
        torch.testing.assert_close(total, 2.0 * toy_loss(feats.image, feats.text, 1.0))
        assert weight_table(load_config(None, MODEL + ["loss.toy.weight=2"])) == {"clip": 1.0}
    finally:
        unregister("toy")


def test_the_package_terms_declare_what_the_composer_used_to_hard_code():
    names = [t.name for t in composer.all_terms()]
    assert names[:4] == ["global", "degla", "powerset", "concept"]
    switches = {t.name: t.switch_key() for t in composer.all_terms()}
    assert switches["powerset"] == "loss.powerset.weight > 0"
    assert switches["concept"] == "loss.concept.npc_weight/xac_weight > 0"
    assert switches["degla"] == "loss.degla.enabled"
    # the rule the composer applies before a module is imported agrees with each declaration
    cfgs = [load_config(None, MODEL + extra) for extra in (
        [], ["loss.powerset.weight=0.2"], ["loss.concept.xac_weight=1"],
        ["loss.degla.enabled=true", "data.num_negatives=2", "loss.degla.base_weight=0"])]
    for t in composer.all_terms()[:4]:
        for cfg in cfgs:
            on = registry.section_switch(cfg.loss, t.section) is not None
            assert on == t.is_on(cfg.loss), (t.name, cfg.loss)


def test_missing_term_module_names_the_config_key(monkeypatch):
    monkeypatch.setitem(composer.BUILTIN, "powerclip.losses.nope", "powerset")
    assert not needs_dense(load_config(None, MODEL))  # switched off: never imported
    with pytest.raises(RuntimeError, match=r"loss.powerset.weight > 0 is switched on but powerclip.losses.nope"):
        needs_dense(load_config(None, MODEL + ["loss.powerset.weight=0.2"]))


def test_bench_enumerates_registered_terms(toy):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_train
    finally:
        sys.path.remove(str(ROOT / "tools"))
    terms = bench_train.bench_terms()
    assert terms["clip"] == ([], ())
    assert terms["toy"] == (["loss.toy.weight=1.0"], ("text",))
    assert terms["toy_aux"] == (["loss.toy.aux_weight=1.0"], ("text",))
    assert terms["degla"][0] == ["loss.degla.enabled=true"]
    assert {"powerset", "concept_npc", "concept_xac"} <= set(terms)
