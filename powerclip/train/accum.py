"""Gradient accumulation that keeps the whole negative pool (feature caching with cached gradients).

With ``accum_steps = A`` micro-batches per optimiser step, DeepSpeed's own accumulation would give
every micro-batch's contrastive loss only its own B·W negatives. Instead (GradCache, Gao et al. 2021):

1. forward all A micro-batches WITHOUT gradient and concatenate their features F = [F_1; ...; F_A];
2. compute the loss L(F) ONCE over the A·B local rows (and the gathered columns of every rank), with
   F as leaf tensors, and take G = dL/dF (the finiteness check runs on this one value);
3. for each micro-batch j: forward it again WITH gradient and back-propagate the surrogate
   <F_j(theta), G_j> (the sum over every feature field of features times their cached gradient).

Why this is exact: d<F_j(theta), G_j>/dtheta = G_j · dF_j/dtheta, and summing over j (the gradients
accumulate) gives dL/dF · dF/dtheta = dL/dtheta, the gradient of one big batch of A·B rows.
``logit_scale``/``logit_bias`` are read by the loss directly: their cached gradient enters the
surrogate of pass 0 only, so it is counted once.

Why not recompute the loss in every pass (splice the live features of j among the cached ones): the
loss over A·B rows then runs A times, A^3 times one micro-batch's pairs for a loss whose pool grows
with the rows (A^2 rows x columns, A times). Here it runs once: A^2 for the ``all`` pool (every pair
of the big batch is scored once), A x one micro-batch once a negative pool binds.

Each backward uses the surrogate as is (``scale_wrt_gas=False``: DeepSpeed's default 1/A scaling
is for independent micro-batch losses). DeepSpeed is configured with ``gradient_accumulation_steps
= A`` so it reduces gradients and steps the optimiser once per A micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields

import torch
import torch.nn.functional as F

from powerclip.data.batch import Batch, field_specs
from powerclip.model.features import Features


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero/False-padding every other dim to the largest size."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.ndim)):
            pad += [0, shape[d - 1] - t.shape[d]]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)


def _row_counts(batches: list[Batch], rows: str) -> list[int]:
    """Rows of kind ``rows`` in each micro-batch, read from any set field that declares them."""
    for name, spec in field_specs(type(batches[0])):
        if spec.rows == rows and all(getattr(b, name) is not None for b in batches):
            return [int(getattr(b, name).shape[0]) for b in batches]
    raise ValueError(f"no field of the micro-batches has {rows!r} rows to offset indices by")


def concat_batches(batches: list[Batch]) -> Batch:
    """One Batch holding the micro-batches in order, each field joined by its declared ``concat``
    rule (phrase slots padded to the largest micro-batch, ...) and index fields offset by the rows
    before them (concept owners)."""
    if len(batches) == 1:
        return batches[0]
    batch_type = type(batches[0])
    out: dict = {}
    for name, spec in field_specs(batch_type):
        values = [getattr(b, name) for b in batches]
        if all(v is None for v in values):
            out[name] = None
        elif spec.concat == "list":
            out[name] = [x for v in values for x in v]
        elif any(v is None for v in values):
            raise ValueError(f"Batch.{name} is set in some micro-batches and not in others")
        else:
            if spec.index_of is not None:
                offsets = [0]
                for n in _row_counts(batches, spec.index_of)[:-1]:
                    offsets.append(offsets[-1] + n)
                values = [v + o for v, o in zip(values, offsets)]
            out[name] = _pad_cat(values) if spec.concat == "pad" else torch.cat(values, dim=0)
    return batch_type(**out)


_LOSS_READ = ("logit_scale", "logit_bias")  # read by the loss directly, shared by the micro-batches


def _rows(f: Features, name: str) -> int:
    v = getattr(f, name)
    return 0 if v is None or name in _LOSS_READ else int(v.shape[0])


def cached_loss(cached: list[Features], compose: Callable[[Features], tuple[torch.Tensor, dict]]
                ) -> tuple[torch.Tensor, dict, Features, Callable[[], list[Features]]]:
    """The loss of the concatenated cached features, once, with those features as leaves.

    Returns (loss, terms, the concatenated features, grads) where ``grads()`` back-propagates the
    loss and returns, per micro-batch, a Features of dL/d(its features) (None where no gradient).
    """
    leaf: dict = {}
    for f in fields(Features):
        values = [getattr(c, f.name) for c in cached]
        if values[0] is None:
            leaf[f.name] = None
            continue
        v = values[0] if f.name in _LOSS_READ else _pad_cat(values)
        leaf[f.name] = v.detach().requires_grad_(v.is_floating_point())
    feats = Features(**leaf)
    loss, terms = compose(feats)

    def grads() -> list[Features]:
        names = [n for n, v in leaf.items() if v is not None and v.requires_grad]
        got = torch.autograd.grad(loss, [leaf[n] for n in names], allow_unused=True)
        full = dict(zip(names, got))
        out, start = [], {n: 0 for n in names}
        for j, c in enumerate(cached):
            per: dict = {f.name: None for f in fields(Features)}
            for n in names:
                g = full[n]
                if g is None or (n in _LOSS_READ and j > 0):
                    continue
                if n in _LOSS_READ:
                    per[n] = g
                    continue
                rows = _rows(c, n)
                own = getattr(c, n)
                per[n] = g[start[n]:start[n] + rows][tuple(slice(0, s) for s in own.shape)]
                start[n] += rows
            out.append(Features(**per))
        return out

    return loss, terms, feats, grads


def surrogate(live: Features, grad: Features) -> torch.Tensor:
    """<live features, their cached gradient>: its backward is dL/dtheta through this micro-batch."""
    total: torch.Tensor | None = None
    for f in fields(Features):
        v, g = getattr(live, f.name), getattr(grad, f.name)
        if v is None or g is None:
            continue
        part = (v.float() * g.float()).sum()
        total = part if total is None else total + part
    if total is None:  # no feature reaches the loss: keep the graph alive with a zero
        total = live.image.sum() * 0.0
    return total


def surrogate_passes(micro: list, forward: Callable[[object], Features],
                     grads: Callable[[], list[Features]]) -> Iterator[torch.Tensor]:
    """For each micro-batch: forward it with gradient and yield its surrogate (the caller backwards it)."""
    for b, g in zip(micro, grads()):
        yield surrogate(forward(b), g)
