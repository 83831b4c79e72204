"""Sum the loss terms a config switches on, with their weights, and hand every term to the logger.

Contract with the term modules: each returns UNWEIGHTED terms by name. The composer knows which
names are objective terms and which weight applies (``weight_table``); any other returned entry is
a diagnostic (e.g. ``concept_diag_*``) that is logged but never added to the total.

Term modules are written by different people and imported lazily inside their branch, so a
missing or broken optional module only fails a run that switches that term on, with an error
that names the config key.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from powerclip import distributed as pdist
from powerclip.config import Config, LossConfig
from powerclip.data.batch import Batch
from powerclip.losses.global_loss import global_loss
from powerclip.model.features import Features


def _loss_cfg(cfg: Config | LossConfig) -> LossConfig:
    return cfg.loss if isinstance(cfg, Config) else cfg


def needs_dense(cfg: Config | LossConfig) -> bool:
    """Whether the model must produce patch/token embeddings: powerset (both) and XAC (patches)."""
    lc = _loss_cfg(cfg)
    return lc.powerset.weight > 0 or lc.concept.xac_weight > 0


def needs_teacher(cfg: Config | LossConfig) -> bool:
    """Whether the EMA teacher must run: DeGLA's TGC and distillation read its features."""
    lc = _loss_cfg(cfg)
    return lc.degla.enabled and (lc.degla.tgc_weight > 0 or lc.degla.distill_weight > 0)


def weight_table(cfg: Config | LossConfig) -> dict[str, float]:
    """Objective term name -> weight, for the terms this config switches on."""
    lc = _loss_cfg(cfg)
    table: dict[str, float] = {}
    if lc.degla.enabled:
        table.update(degla_base=lc.degla.base_weight, degla_igc=lc.degla.igc_weight,
                     degla_tgc=lc.degla.tgc_weight, degla_distill=lc.degla.distill_weight)
    else:
        table[lc.global_loss] = lc.global_weight
    if lc.powerset.weight > 0:
        table["powerset"] = lc.powerset.weight
    if lc.concept.npc_weight > 0:
        table["concept_npc"] = lc.concept.npc_weight
    if lc.concept.xac_weight > 0:
        table["concept_xac"] = lc.concept.xac_weight
    return table


def _term_fn(module: str, name: str, switch: str) -> Any:
    """Import a term function lazily; fail with the config key that asked for it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"{switch} is switched on but {module}.{name} is not available: {e}") from e


def _shared_sizes(features: Features, batch: Batch, lc: LossConfig) -> list[list[int]] | None:
    """Every rank's [images, phrases, concept rows, concept width] in ONE exchange when both the
    powerset and the concept terms need sizes from the other ranks: reading an exchanged size on the
    host waits for the GPU, so the two terms share one instead of making one each. None: each term
    exchanges (or checks) on its own, e.g. when a field is missing and the term raises its own error.
    """
    concept_on = lc.concept.npc_weight > 0 or lc.concept.xac_weight > 0
    if not (pdist.is_distributed() and lc.powerset.weight > 0 and concept_on):
        return None
    c = features.concepts
    if c is None or c.dim() != 2 or batch.phrase_tokens is None or batch.concept_owner is None:
        return None
    return pdist.gather_ints([features.image.shape[0], batch.phrase_tokens.shape[1], c.shape[0], c.shape[1]])


def compose_losses(features: Features, batch: Batch, cfg: Config | LossConfig,
                   teacher_features: Features | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total of every switched-on term, and all returned entries (unweighted, detached).

    The total is what the engine back-propagates; the dict is what TensorBoard logs as loss/<name>.
    """
    lc = _loss_cfg(cfg)
    terms: dict[str, torch.Tensor] = {}
    if lc.degla.enabled:
        fn = _term_fn("powerclip.losses.degla", "degla_losses", "loss.degla.enabled")
        terms.update(fn(features, teacher_features, batch, lc.degla))
    else:
        terms[lc.global_loss] = global_loss(features, lc.global_loss)
    shared = _shared_sizes(features, batch, lc)
    if lc.powerset.weight > 0:
        fn = _term_fn("powerclip.losses.powerset", "powerset_loss", "loss.powerset.weight > 0")
        terms.update(fn(features, batch, lc.powerset, per_rank=shared and [r[:2] for r in shared]))
    if lc.concept.npc_weight > 0 or lc.concept.xac_weight > 0:
        fn = _term_fn("powerclip.losses.concept", "concept_losses", "loss.concept.npc_weight/xac_weight > 0")
        terms.update(fn(features, batch, lc.concept, global_loss=lc.global_loss,
                        per_rank=shared and [[r[0], r[2], r[3]] for r in shared]))

    weights = weight_table(lc)
    missing = [name for name in weights if name not in terms]
    if missing:
        raise RuntimeError(f"loss terms {missing} are weighted by the config but no term module returned them "
                           f"(got {sorted(terms)})")
    total: torch.Tensor | None = None
    for name, w in weights.items():
        if w == 0:
            continue
        part = terms[name].float() * w
        total = part if total is None else total + part
    if total is None:  # every weight is zero: a valid (if useless) config; keep the graph alive
        total = features.image.sum() * 0.0 + features.text.sum() * 0.0
    return total, {name: value.detach() for name, value in terms.items()}
