"""Gradient accumulation that keeps the whole negative pool (open_clip's feature-caching method).

With ``accum_steps = A`` micro-batches per optimiser step, DeepSpeed's own accumulation would give
every micro-batch's contrastive loss only its own B·W negatives. Instead:

1. forward all A micro-batches WITHOUT gradient and cache their features;
2. for each micro-batch j: forward it again WITH gradient, put its features in place of the cached
   ones (rows j·B ... (j+1)·B), compute the loss over the concatenated A·B local rows (and the gathered
   columns of every rank), and backward.

Why this is exact: the loss L is a function of the features of all A micro-batches, and the cached
features of the other micro-batches are constants in pass j, so pass j's backward yields exactly
∂L/∂F_j · ∂F_j/∂θ. Summing over j (the gradients accumulate) gives ∂L/∂θ: the gradient of one big
batch of A·B rows. Two details make it bit-for-bit the big-batch gradient rather than approximately:

* each backward uses the loss as is (``scale_wrt_gas=False``): DeepSpeed's default 1/A scaling is
  for independent micro-batch losses, not for A passes of one loss;
* parameters the loss reads directly (``logit_scale``, ``logit_bias``) carry gradient only in
  pass 0; otherwise their gradient would be counted A times (open_clip's implementation does that).

DeepSpeed is configured with ``gradient_accumulation_steps = A`` so it reduces gradients and steps the
optimiser once per A micro-batches.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F

from powerclip.data.batch import Batch
from powerclip.model.features import Features

# Batch fields indexed by concept row (dim 0 = C), not by image; concept_owner is shifted on concat.
_CONCEPT_FIELDS = ("concept_text", "concept_owner", "concept_ids")


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


def concat_batches(batches: list[Batch]) -> Batch:
    """One Batch holding the micro-batches in order (K padded to the max, concept owners offset)."""
    if len(batches) == 1:
        return batches[0]
    out: dict = {}
    for f in fields(Batch):
        values = [getattr(b, f.name) for b in batches]
        if f.name in ("keys", "meta"):
            out[f.name] = [x for v in values for x in v]
        elif all(v is None for v in values):
            out[f.name] = None
        elif any(v is None for v in values):
            raise ValueError(f"Batch.{f.name} is set in some micro-batches and not in others")
        elif f.name == "concept_owner":
            offsets, total = [], 0
            for b in batches:
                offsets.append(total)
                total += b.size
            out[f.name] = torch.cat([v + o for v, o in zip(values, offsets)], dim=0)
        else:
            out[f.name] = _pad_cat(values)
    return Batch(**out)


def splice_features(cached: list[Features], live: Features, j: int) -> Features:
    """The features of all micro-batches with micro-batch ``j``'s replaced by ``live`` (with grad).

    ``logit_scale``/``logit_bias`` come from ``live`` in pass 0 only (see the module docstring).
    """
    parts = cached[:j] + [live] + cached[j + 1:]
    out: dict = {}
    for f in fields(Features):
        if f.name in ("logit_scale", "logit_bias"):
            v = getattr(live, f.name)
            out[f.name] = v if (v is None or j == 0) else v.detach()
            continue
        values = [getattr(p, f.name) for p in parts]
        out[f.name] = None if values[0] is None else _pad_cat(values)
    return Features(**out)
