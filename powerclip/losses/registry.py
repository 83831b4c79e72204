"""The loss terms a run can switch on, each declared once, by its own module.

A term module ends with ``LOSS_TERM = register(LossTerm(...))``: its name, the ``loss.<section>`` it
reads, which objective terms it returns with which weight field, what each objective term needs from
the model (dense patch or token embeddings, the EMA teacher) and the batch, and one function
``compute(features, batch, settings, context)``. The composer (``powerclip.losses.composer``), the
trainer's switches and the benchmarks read these declarations instead of naming terms, so a new term
is one module (plus its config section, which it may also bring itself: ``LossTerm.config``).

Switch rule. A term with ``switch`` is on when that bool field of its section is true, and then every
one of its weights counts (even 0: its terms are still computed and logged). Otherwise each of its
objective terms is on when its weight is > 0. ``always_on`` terms (the global loss) run unless a
switched-on term ``replaces`` them (DeGLA's NegCLIP replaces the global loss).

This module imports nothing heavy: the config loader asks it which sections exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from powerclip.config import LossConfig, register_loss_extension, unregister_loss_extension

if TYPE_CHECKING:
    import torch

    from powerclip.data.batch import Batch
    from powerclip.model.features import Features

# what an objective term can need from the model; the trainer asks for the union over switched-on terms
NEEDS = ("patches", "tokens", "teacher")

@dataclass(frozen=True)
class LossContext:
    """What a term may need beyond the features, the batch and its own settings.

    ``sizes``: every rank's ints this term declared in ``LossTerm.sizes``, already exchanged together
    with the other terms' (one host-side wait instead of one per term); None: exchange them yourself.
    """

    global_loss: str  # loss.global_loss, which the concept terms follow in form
    teacher: Features | None = None  # the EMA teacher's features when a switched-on term needs them
    sizes: list[list[int]] | None = None


TermFn = Callable[["Features", "Batch", Any, LossContext], Mapping[str, "torch.Tensor"]]


@dataclass(frozen=True)
class LossTerm:
    """One term module's declaration (see the module docstring for the switch rule)."""

    name: str
    compute: TermFn  # -> UNWEIGHTED values by name: the objective terms and any diagnostics
    section: str | None = None  # loss.<section> handed to compute; None: the whole loss config
    config: type | None = None  # the section's dataclass, for a section config.py does not declare
    # objective term -> weight field of the section, or a function of the section for names that
    # depend on the config (the global loss is named by loss.global_loss)
    weights: Mapping[str, str] | Callable[[Any], Mapping[str, float]] = field(default_factory=dict)
    switch: str | None = None
    always_on: bool = False
    needs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # objective term -> NEEDS entries
    batch_fields: tuple[str, ...] = ()  # Batch fields compute reads (beyond images and captions)
    replaces: tuple[str, ...] = ()  # names of terms this one replaces while it is on
    # ints every rank must know of every other rank (e.g. its batch and phrase counts); None when this
    # batch lacks what they describe (the term then raises its own error)
    sizes: Callable[[Features, Batch], list[int] | None] | None = None

    def __post_init__(self) -> None:
        bad = {n: v for n, v in self.needs.items() if set(v) - set(NEEDS)}
        if bad:
            raise ValueError(f"loss term {self.name!r}: needs {bad} outside {NEEDS}")
        if self.section is None and self.config is not None:
            raise ValueError(f"loss term {self.name!r}: a config type needs a section name")

    def settings(self, lc: LossConfig) -> Any:
        """This term's config: loss.<section> (its defaults when the config predates the term)."""
        if self.section is None:
            return lc
        value = getattr(lc, self.section, None)
        if value is None:
            if self.config is None:
                raise RuntimeError(f"loss term {self.name!r} reads loss.{self.section}, which the config lacks")
            return self.config()
        return value

    def weight_fields(self) -> dict[str, str]:
        """Objective term -> its weight's dotted config key (empty for computed weights)."""
        if callable(self.weights):
            return {}
        prefix = "loss." if self.section is None else f"loss.{self.section}."
        return {name: prefix + f for name, f in self.weights.items()}

    def switch_key(self) -> str:
        """The config key that switches this term on, as error messages name it."""
        if self.always_on:
            return "loss.global_loss" if self.section is None else f"loss.{self.section}"
        if self.switch is not None:
            return f"loss.{self.section}.{self.switch}"
        keys = [k.rsplit(".", 1)[1] for k in self.weight_fields().values()]
        return f"loss.{self.section}.{'/'.join(keys)} > 0"

    def weight_table(self, lc: LossConfig) -> dict[str, float]:
        """Objective term -> weight for this term's switched-on objectives (empty when it is off)."""
        s = self.settings(lc)
        table = dict(self.weights(s)) if callable(self.weights) else {n: getattr(s, f) for n, f in self.weights.items()}
        if self.always_on or self.switch is not None:
            return table if self.always_on or getattr(s, self.switch) else {}
        return {n: w for n, w in table.items() if w > 0}

    def is_on(self, lc: LossConfig) -> bool:
        return self.always_on or bool(self.weight_table(lc))

    def variants(self) -> dict[str, list[str]]:
        """One config per way of switching this term on, as overrides (what the benchmarks time):
        the switch, or each weighted objective alone. Always-on terms have none (they are the base)."""
        if self.always_on:
            return {}
        if self.switch is not None:
            return {self.name: [f"loss.{self.section}.{self.switch}=true"]}
        return {name: [f"{key}=1.0"] for name, key in self.weight_fields().items()}


_TERMS: dict[str, LossTerm] = {}


def register(term: LossTerm) -> LossTerm:
    """Add a term (a module calls this once, at import). Re-registering a name replaces it, so
    reloading a module is harmless; two modules claiming one objective name is an error."""
    for other in _TERMS.values():
        if other.name == term.name or callable(other.weights) or callable(term.weights):
            continue
        clash = set(other.weights) & set(term.weights)
        if clash:
            raise ValueError(f"loss term {term.name!r}: objective terms {sorted(clash)} already belong to "
                             f"{other.name!r}")
    _TERMS.pop(term.name, None)
    _TERMS[term.name] = term
    own = (term.section, term.config) if term.section is not None and term.config is not None else None
    register_loss_extension(term.name, own, tuple(term.weight_fields().values()))
    return term


def unregister(name: str) -> None:
    """Remove a term (tests that register one of their own clean up with this)."""
    if _TERMS.pop(name, None) is not None:
        unregister_loss_extension(name)


def registered() -> list[LossTerm]:
    """The terms imported so far, in the order they registered (the composer orders the package's own)."""
    return list(_TERMS.values())


def section_switch(lc: LossConfig, section: str | None) -> str | None:
    """The switch key of a section whose module is not imported yet, when it is on (None when off).

    Read from the section's fields by the same rule as declared terms (``enabled``, else every
    ``weight``/``*_weight`` field > 0), so the composer imports a term module only for runs that use it.
    """
    if section is None:
        return "loss.global_loss"
    s = getattr(lc, section, None)
    if s is None:
        return None
    names = [f.name for f in fields(s)]
    if "enabled" in names:
        return f"loss.{section}.enabled" if s.enabled else None
    weights = [n for n in names if n == "weight" or n.endswith("_weight")]
    on = any(getattr(s, n) > 0 for n in weights)
    return f"loss.{section}.{'/'.join(weights)} > 0" if on else None


