"""The loss composer: weights, switches, diagnostics, lazy term modules and clear errors."""

import pytest
import torch
import torch.nn.functional as F

from powerclip.config import load_config
from powerclip.data.batch import Batch
from powerclip.losses.composer import _term_fn, compose_losses, needs_dense, needs_teacher, weight_table
from powerclip.losses.global_loss import global_loss
from powerclip.model.features import Features

B, D, N = 4, 8, 2
MODEL = ["model.name=ViT-B-32"]


def _features(seed: int = 0, bias: bool = False) -> Features:
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, D, generator=g), dim=-1).requires_grad_()

    return Features(image=unit(B), text=unit(B), logit_scale=torch.tensor(10.0, requires_grad=True),
                    logit_bias=torch.tensor(-5.0) if bias else None, concepts=unit(6), negatives=unit(B, N),
                    patches=unit(B, 4))


def _batch() -> Batch:
    return Batch(keys=list("abcd"), images=torch.zeros(B, 3, 8, 8), text=torch.zeros(B, 77, dtype=torch.long),
                 concept_text=torch.zeros(6, 77, dtype=torch.long), concept_owner=torch.tensor([0, 0, 1, 2, 3, 3]),
                 concept_ids=torch.arange(6), neg_text=torch.zeros(B, N, 77, dtype=torch.long),
                 neg_valid=torch.ones(B, N, dtype=torch.bool))


def test_global_only_clip_and_siglip():
    cfg = load_config(None, MODEL + ["loss.global_weight=0.5"])
    feats = _features()
    total, terms = compose_losses(feats, _batch(), cfg)
    ref = global_loss(feats, "clip")
    torch.testing.assert_close(total, 0.5 * ref)
    assert set(terms) == {"clip"} and not terms["clip"].requires_grad
    total.backward()
    assert feats.image.grad is not None
    cfg = load_config(None, MODEL + ["loss.global_loss=siglip", "model.init_logit_bias=-10"])
    feats = _features(bias=True)
    total, terms = compose_losses(feats, _batch(), cfg.loss)  # a LossConfig works too
    torch.testing.assert_close(total, global_loss(feats, "siglip"))
    assert set(terms) == {"siglip"}


def test_concept_terms_weighted_and_diagnostics_not_summed():
    from powerclip.losses.concept import concept_losses

    cfg = load_config(None, MODEL + ["loss.concept.npc_weight=1.0", "loss.concept.xac_weight=0.01"])
    feats, batch = _features(), _batch()
    total, terms = compose_losses(feats, batch, cfg)
    ref = concept_losses(feats, batch, cfg.loss.concept, global_loss="clip")
    expected = global_loss(feats, "clip") + ref["concept_npc"] + 0.01 * ref["concept_xac"]
    torch.testing.assert_close(total, expected)
    assert {"clip", "concept_npc", "concept_xac"} <= set(terms)
    assert any(k.startswith("concept_diag") for k in terms)  # logged, not summed (checked above)


def test_degla_replaces_global_loss():
    from powerclip.losses.degla import degla_losses

    cfg = load_config(None, MODEL + ["loss.degla.enabled=true", "data.num_negatives=2"])
    feats, batch = _features(), _batch()
    teacher = Features(**{k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                          for k, v in vars(_features(1)).items()})
    total, terms = compose_losses(feats, batch, cfg, teacher_features=teacher)
    ref = degla_losses(feats, teacher, batch, cfg.loss.degla)
    expected = ref["degla_base"] + 0.1 * ref["degla_igc"] + 0.1 * ref["degla_tgc"] + ref["degla_distill"]
    torch.testing.assert_close(total, expected)
    assert "clip" not in terms and set(weight_table(cfg)) == set(ref)


def test_switches():
    base = load_config(None, MODEL)
    assert not needs_dense(base) and not needs_teacher(base)
    assert needs_dense(load_config(None, MODEL + ["loss.powerset.weight=0.2"]))
    assert needs_dense(load_config(None, MODEL + ["loss.concept.xac_weight=0.01"]))
    assert not needs_dense(load_config(None, MODEL + ["loss.concept.npc_weight=1"]))
    degla = load_config(None, MODEL + ["loss.degla.enabled=true", "data.num_negatives=4"])
    assert needs_teacher(degla) and needs_teacher(degla.loss)
    plain_negclip = load_config(None, MODEL + ["loss.degla.enabled=true", "data.num_negatives=4",
                                               "loss.degla.tgc_weight=0", "loss.degla.distill_weight=0"])
    assert not needs_teacher(plain_negclip)


def test_zero_weights_keep_a_graph():
    cfg = load_config(None, MODEL + ["loss.global_weight=0"])
    feats = _features()
    total, terms = compose_losses(feats, _batch(), cfg)
    assert total.item() == 0.0 and "clip" in terms
    total.backward()


def test_missing_term_module_fails_clearly():
    with pytest.raises(RuntimeError, match="loss.powerset.weight > 0.*powerclip.losses.nope"):
        _term_fn("powerclip.losses.nope", "powerset_loss", "loss.powerset.weight > 0")
