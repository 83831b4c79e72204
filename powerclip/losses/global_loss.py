"""Global image-text objectives over the whole (gathered) batch: CLIP InfoNCE and SigLIP (docs/losses.md §1).

Both follow open_clip's ``local_loss=True, gather_with_grad=True`` semantics: each rank scores its
B local rows against all G = W·B gathered columns (``powerclip.distributed.gather_with_grad``) and
returns the mean over its local rows.

Why the gradients come out right under DeepSpeed
-------------------------------------------------
Let L be the single-process loss on the concatenated global batch and L_r the value on rank r.
Then mean_r L_r = L (each L_r is a mean over B of the G rows). The all-gather's backward sums every
rank's contribution into the owner's chunk, so the gradient that reaches rank r's features is
d(Σ_s L_s)/d f_r = W · dL/d f_r, while shared parameters such as the logit scale get dL_r/dθ.
DeepSpeed averages parameter gradients over ranks (divides the sum by W), which yields exactly
dL/dθ for every parameter: the tower weights through the W·dL/df_r chunks, the scale through
mean_r dL_r/dθ. So the per-rank loss needs no extra factor (tests/test_global_loss.py checks it).

Feature-caching gradient accumulation passes the features of all accumulated micro-batches as the
"local" rows; nothing here depends on B being the micro-batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from powerclip import distributed as pdist
from powerclip.config import LossConfig
from powerclip.data.batch import Batch
from powerclip.losses.registry import LossContext, LossTerm, register
from powerclip.model.features import Features


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of B local rows against G gathered columns (fp32 logits).

    image, text: [B, D] normalised local features; logit_scale: the multiplier s (already exp'd).
    """
    image, text = image.float(), text.float()
    scale = logit_scale.float()
    all_image = pdist.gather_with_grad(image)
    all_text = pdist.gather_with_grad(text)
    b = image.shape[0]
    labels = torch.arange(b, device=image.device) + pdist.rank() * b
    logits_per_image = scale * image @ all_text.T
    logits_per_text = scale * text @ all_image.T
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None) -> torch.Tensor:
    """Sigmoid loss of B local images against all G gathered captions, divided by B.

    Same value and gradients as open_clip's ``SigLipLoss`` (which exchanges text chunks between
    neighbouring ranks instead of gathering them; the sum over pairs is the same). mean over ranks
    equals the single-process loss (sum over all G×G pairs / G).
    """
    image, text = image.float(), text.float()
    all_text = pdist.gather_with_grad(text)
    b = image.shape[0]
    logits = logit_scale.float() * image @ all_text.T
    if logit_bias is not None:
        logits = logits + logit_bias.float()
    labels = -torch.ones_like(logits)
    idx = torch.arange(b, device=image.device)
    labels[idx, idx + pdist.rank() * b] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b


def global_loss(features: Features, kind: str = "clip") -> torch.Tensor:
    """The global objective named by ``loss.global_loss`` (``clip`` or ``siglip``)."""
    if kind == "clip":
        return clip_loss(features.image, features.text, features.logit_scale)
    if kind == "siglip":
        if features.logit_bias is None:
            raise ValueError("loss.global_loss=siglip needs a logit bias: set model.init_logit_bias (e.g. -10)")
        return siglip_loss(features.image, features.text, features.logit_scale, features.logit_bias)
    raise ValueError(f"loss.global_loss={kind!r} is not one of ('clip', 'siglip')")


def _term(features: Features, batch: Batch, cfg: LossConfig, ctx: LossContext) -> dict[str, torch.Tensor]:
    return {cfg.global_loss: global_loss(features, cfg.global_loss)}


# the base objective of every run, named by loss.global_loss and weighted by loss.global_weight
LOSS_TERM = register(LossTerm(name="global", compute=_term, always_on=True,
                              weights=lambda lc: {lc.global_loss: lc.global_weight}))
