"""Sum the loss terms a config switches on, with their weights, and hand every term to the logger.

Contract with the term modules (``powerclip.losses.registry``): each declares its objective terms and
their weight fields, and returns UNWEIGHTED values by name. The composer sums the declared objective
terms times their weights (``weight_table``); any other returned entry is a diagnostic (e.g.
``concept_diag_*``) that is logged but never added to the total.

The package's term modules are imported only when the config switches their section on, so a missing
or broken optional module only fails a run that uses it, with an error that names the config key.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from powerclip import distributed as pdist
from powerclip.config import Config, LossConfig
from powerclip.data.batch import Batch
from powerclip.losses import registry
from powerclip.losses.registry import LossContext, LossTerm
from powerclip.model.features import Features

# the package's own term modules, in the order their terms enter the total, with the loss.<section>
# each reads (None: loss.* itself). This module imports one only when its section switches it on, so
# a missing or broken module fails only the runs that use it, naming the config key.
BUILTIN: dict[str, str | None] = {
    "powerclip.losses.global_loss": None,
    "powerclip.losses.degla": "degla",
    "powerclip.losses.powerset": "powerset",
    "powerclip.losses.concept": "concept",
}


def registered_in_order() -> list[LossTerm]:
    """The registered terms: the package's in ``BUILTIN`` order, then others as they registered."""
    order = list(BUILTIN)

    def key(item: tuple[int, LossTerm]) -> tuple[int, int]:
        module = item[1].compute.__module__
        return (order.index(module) if module in order else len(order), item[0])

    return [t for _, t in sorted(enumerate(registry.registered()), key=key)]


def all_terms() -> list[LossTerm]:
    """Every term, the package's modules imported first (for tools that enumerate terms)."""
    for module in BUILTIN:
        importlib.import_module(module)
    return registered_in_order()


def _loss_cfg(cfg: Config | LossConfig) -> LossConfig:
    return cfg.loss if isinstance(cfg, Config) else cfg


def _term_fn(module: str, name: str, switch: str) -> Any:
    """Import a term module's attribute lazily; fail with the config key that asked for it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"{switch} is switched on but {module}.{name} is not available: {e}") from e


def active_terms(cfg: Config | LossConfig) -> list[LossTerm]:
    """The registered terms this config switches on, in the order they enter the total."""
    lc = _loss_cfg(cfg)
    for module, section in BUILTIN.items():
        switch = registry.section_switch(lc, section)
        if switch is not None:
            _term_fn(module, "LOSS_TERM", switch)  # importing it registers it
    on = [t for t in registered_in_order() if t.is_on(lc)]
    replaced = {name for t in on for name in t.replaces}
    return [t for t in on if t.name not in replaced]


def weight_table(cfg: Config | LossConfig) -> dict[str, float]:
    """Objective term name -> weight, for the terms this config switches on."""
    lc = _loss_cfg(cfg)
    return {name: w for t in active_terms(lc) for name, w in t.weight_table(lc).items()}


def needs(cfg: Config | LossConfig) -> set[str]:
    """What the switched-on objective terms with a weight > 0 need (``registry.NEEDS`` entries)."""
    lc = _loss_cfg(cfg)
    return {need for t in active_terms(lc) for name, w in t.weight_table(lc).items() if w > 0
            for need in t.needs.get(name, ())}


def needs_dense(cfg: Config | LossConfig) -> bool:
    """Whether the model must produce patch/token embeddings (e.g. powerset: both, XAC: patches)."""
    return bool(needs(cfg) & {"patches", "tokens"})


def needs_teacher(cfg: Config | LossConfig) -> bool:
    """Whether the EMA teacher must run (e.g. DeGLA's TGC and distillation read its features)."""
    return "teacher" in needs(cfg)


def _shared_sizes(features: Features, batch: Batch, terms: list[LossTerm]) -> dict[str, list[list[int]]]:
    """Every rank's sizes for every term that declares some, in ONE exchange when two or more terms
    need them (e.g. powerset and concept): reading an exchanged size on the host waits for the GPU,
    so the terms share one instead of making one each. Empty: each term exchanges (or checks) on its
    own, e.g. when a field is missing and the term raises its own error.
    """
    if not pdist.is_distributed():
        return {}
    asks = [(t.name, t.sizes(features, batch)) for t in terms if t.sizes is not None]
    if len(asks) < 2 or any(sizes is None for _, sizes in asks):
        return {}
    rows = pdist.gather_ints([v for _, sizes in asks for v in sizes])
    out, at = {}, 0
    for name, sizes in asks:
        out[name] = [r[at:at + len(sizes)] for r in rows]
        at += len(sizes)
    return out


def compose_losses(features: Features, batch: Batch, cfg: Config | LossConfig,
                   teacher_features: Features | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted total of every switched-on term, and all returned entries (unweighted, detached).

    The total is what the engine back-propagates; the dict is what TensorBoard logs as loss/<name>.
    """
    lc = _loss_cfg(cfg)
    active = active_terms(lc)
    shared = _shared_sizes(features, batch, active)
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for t in active:
        ctx = LossContext(global_loss=lc.global_loss, teacher=teacher_features, sizes=shared.get(t.name))
        terms.update(t.compute(features, batch, t.settings(lc), ctx))
        weights.update(t.weight_table(lc))

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
