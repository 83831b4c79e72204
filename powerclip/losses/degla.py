"""DeGLA fine-tuning losses (docs/losses.md §4): NegCLIP base, IGC, TGC and self-distillation.

All four terms are returned UNWEIGHTED under the keys ``degla_base``, ``degla_igc``, ``degla_tgc`` and
``degla_distill``; the composer multiplies them by ``loss.degla.{base,igc,tgc,distill}_weight``.

Layout. Rank r holds B local samples, each with one caption and N (= K) hard negatives
(``Features.negatives`` [B, N, D], ``Batch.neg_valid`` [B, N]). Gathering the flattened negatives
[B·N, D] rank by rank puts negative (g, k) of the global batch (g = r·B + b) at row g·K + k of the
negative block, i.e. at column G + g·K + k of the NegCLIP text matrix [captions; negatives]. The
released DeGLA code builds its TGC mask by *tiling* the identity (column G + k·G + g), which pairs each
caption with other samples' negatives; here every per-sample term indexes the sample's OWN negatives
directly ([B, N, D] rows), so that bug cannot occur (tests/test_degla.py has the counter-example).

Negative pool (``cfg.negative_pool``, losses/pool.py): the captions stay the whole global batch
(``caption_logits``: that block IS the global loss of this stage, CLIP's B x G x D); the HARD-NEGATIVE
columns are every sample's (``all``, the layout above), or each image's own plus those of N samples
drawn identically on every rank (``sample:N``), or this rank's own (``local``). Gathered negatives are the largest tensor of this stage: G·K rows.

Distributed convention (the same as open_clip's ``local_loss + gather_with_grad``): each rank
computes its B local rows against the gathered columns and returns the MEAN over its local rows.
The backward of ``gather_with_grad`` sums every rank's contribution into the owner's chunk, so once
DeepSpeed AVERAGES the gradients over W ranks the result equals the gradient of the single-process
loss on the concatenated batch, and the mean of the per-rank values equals the single-process value.
Terms whose normaliser varies by rank (distillation counts only valid negatives) divide the local
sum by the GLOBAL count and multiply by W, which keeps both properties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from powerclip import distributed as pdist
from powerclip.config import DeglaLossConfig
from powerclip.data.batch import Batch
from powerclip.losses.pool import PoolSpec, members_per_rank, parse_pool, sample_members, to_device
from powerclip.losses.registry import LossContext, LossTerm, register
from powerclip.model.features import Features

TERMS = ("degla_base", "degla_igc", "degla_tgc", "degla_distill")


def needs_teacher(cfg: DeglaLossConfig) -> bool:
    """Whether the EMA teacher must run: only TGC and distillation read it (NegCLIP alone does not)."""
    return cfg.enabled and (cfg.tgc_weight > 0 or cfg.distill_weight > 0)


def _check(student: Features, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if student.negatives is None:
        raise ValueError("DeGLA losses need Features.negatives [B, N, D] (data.num_negatives >= 1 and "
                         "a model that encodes batch.neg_text)")
    neg = student.negatives
    b, n, _ = neg.shape
    if b != student.image.shape[0] or b != student.text.shape[0]:
        raise ValueError(f"negatives {tuple(neg.shape)} do not match {student.image.shape[0]} images / "
                         f"{student.text.shape[0]} captions")
    if batch.neg_valid is None:
        valid = torch.ones(b, n, dtype=torch.bool, device=neg.device)
    else:
        valid = batch.neg_valid.to(device=neg.device, dtype=torch.bool)
        if valid.shape != (b, n):
            raise ValueError(f"batch.neg_valid has shape {tuple(valid.shape)}, expected {(b, n)}")
    return neg, valid


def _own_contrast(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                  valid: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Mean over rows of -log softmax(scale·[<a,p>, <a,n_1..N>])[0], invalid negatives excluded.

    anchor/positive [B, D], negatives [B, N, D], valid [B, N]. A row with no valid negative has a
    single candidate and contributes 0, which is the correct value of its softmax loss.
    """
    pos = (anchor * positive).sum(-1, keepdim=True)  # [B, 1]
    neg = torch.einsum("bd,bnd->bn", anchor, negatives)
    # scale BEFORE masking: scale * -inf would give a NaN gradient for a learned scale
    keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
    logits = (scale * torch.cat([pos, neg], dim=1)).masked_fill(~keep, float("-inf"))
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


def _negative_columns(neg: torch.Tensor, valid: torch.Tensor, g: int, pool: PoolSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard-negative columns of the NegCLIP i2t softmax and which of them each local image may use.

    ``all``: every sample's negatives, row g·K + k for negative k of global sample g (docs/losses.md §4).
    ``local``: this rank's own samples' negatives. ``sample:N``: each image's own negatives plus those of
    N samples drawn from the global batch (the same draw on every rank), laid out [own B·K | drawn N·K];
    image i keeps its own block and the drawn samples other than i (those would be duplicates).
    """
    b, n, d = neg.shape
    dev = neg.device
    flat, vflat = neg.reshape(b * n, d), valid.reshape(b * n)
    if pool.covers(g):
        all_neg = pdist.gather_with_grad(flat)  # [G*N, D], row g*N + k
        all_valid = pdist.gather_with_grad(vflat.to(torch.uint8)).bool()  # no grad needed
        if all_neg.shape[0] != g * n:
            raise ValueError("every rank must hold the same local batch size for DeGLA losses")
        return all_neg, all_valid[None, :].expand(b, -1)
    if pool.kind == "local":
        return flat, vflat[None, :].expand(b, -1)
    world, me = pdist.world_size(), pdist.rank()
    members = sample_members(g, pool.size, salt=2)
    counts, owner_rank = members_per_rank(members, [r * b for r in range(world)], [b] * world)
    mine = to_device(members[owner_rank == me] - me * b, dev)
    s_neg = pdist.gather_known_sizes(neg[mine], counts)  # [P, N, D]
    s_valid = pdist.gather_known_sizes(valid[mine].to(torch.uint8), counts, with_grad=False).bool()
    own = torch.arange(b, device=dev) + me * b
    own_block = torch.eye(b, dtype=torch.bool, device=dev).repeat_interleave(n, dim=1) & vflat[None, :]
    drawn = (to_device(members, dev)[None, :] != own[:, None]).repeat_interleave(n, dim=1) & s_valid.reshape(1, -1)
    return torch.cat([flat, s_neg.reshape(-1, d)]), torch.cat([own_block, drawn], dim=1)


def caption_logits(img: torch.Tensor, txt: torch.Tensor,
                   scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The image-caption block of NegCLIP: local images x all G captions, local captions x all G images.

    This block is CLIP's global loss (the same two B x G x D matmuls as ``global_loss.clip_loss``), which
    NegCLIP replaces in a DeGLA stage; it is kept apart from the hard-negative columns so that its cost
    is accounted as the global loss's (tools/bench_scale.py), and only the rest must stay flat in W.
    Returns (i2t logits [B, G], t2i logits [B, G], the label of each local row).
    """
    b = img.shape[0]
    all_img = pdist.gather_with_grad(img)  # [G, D]
    all_txt = pdist.gather_with_grad(txt)  # [G, D]
    if all_txt.shape[0] != all_img.shape[0]:
        raise ValueError("every rank must hold the same local batch size for DeGLA losses")
    labels = torch.arange(b, device=img.device) + pdist.rank() * b
    return scale * img @ all_txt.T, scale * txt @ all_img.T, labels


def degla_losses(student: Features, teacher: Features | None, batch: Batch,
                 cfg: DeglaLossConfig) -> dict[str, torch.Tensor]:
    """The four DeGLA terms for this rank's local batch (unweighted; see the module docstring).

    student: features with gradient, ``negatives`` [B, N, D]; teacher: the EMA teacher's features of
    the same batch (computed without gradient), or None when neither TGC nor distillation is weighted
    (plain NegCLIP fine-tuning), in which case those two terms are returned as constant zeros.
    All sums run in fp32 whatever the model's precision.
    """
    neg, valid = _check(student, batch)
    b, n, d = neg.shape
    img, txt, neg = student.image.float(), student.text.float(), neg.float()
    scale = student.logit_scale.float()

    # ---- L_base (NegCLIP): local rows against gathered columns -------------------------------
    caption_i2t, logits_t2i, labels = caption_logits(img, txt, scale)
    g = caption_i2t.shape[1]
    neg_cols, neg_keep = _negative_columns(neg, valid, g, parse_pool(cfg.negative_pool, "loss.degla.negative_pool"))
    neg_i2t = (scale * img @ neg_cols.T).masked_fill(~neg_keep, float("-inf"))
    logits_i2t = torch.cat([caption_i2t, neg_i2t], dim=1)  # captions, then the pool's negatives
    base = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))

    # ---- IGC: each image against its own caption and its own valid negatives, learned scale ----
    igc = _own_contrast(img, txt, neg, valid, scale)

    out = {"degla_base": base, "degla_igc": igc}
    if teacher is None:
        if needs_teacher(cfg):
            raise ValueError("loss.degla.tgc_weight or distill_weight > 0 needs the EMA teacher's features")
        zero = img.new_zeros(())
        out.update(degla_tgc=zero, degla_distill=zero)
        return out
    if teacher.negatives is None or teacher.negatives.shape != (b, n, d):
        raise ValueError("teacher features must include negatives of the same shape as the student's")
    t_img, t_txt = teacher.image.detach().float(), teacher.text.detach().float()
    t_neg = teacher.negatives.detach().float()

    # ---- TGC: student caption vs teacher caption (positive) and its OWN negatives, fixed scale --
    out["degla_tgc"] = _own_contrast(txt, t_txt, neg, valid, cfg.tgc_scale)

    # ---- distillation: squared L2 of images + captions + valid negatives, summed over the global
    # batch (reduction "sum", the released recipe) or averaged per vector (reduction "mean") ----------
    sq = ((img - t_img).pow(2).sum(-1).sum() + (txt - t_txt).pow(2).sum(-1).sum()
          + ((neg - t_neg).pow(2).sum(-1) * valid).sum())
    if cfg.distill_reduction == "sum":
        out["degla_distill"] = sq * pdist.world_size()
        return out
    if cfg.distill_reduction != "mean":
        raise ValueError(f"loss.degla.distill_reduction={cfg.distill_reduction!r} is not one of ('mean', 'sum')")
    count_local = (valid.sum() + 2 * b).to(torch.float32).reshape(1)  # on the device: no host sync
    count_global = pdist.all_reduce_sum(count_local)
    out["degla_distill"] = sq * pdist.world_size() / count_global.squeeze(0)
    return out


def _term(features: Features, batch: Batch, cfg: DeglaLossConfig, ctx: LossContext) -> dict[str, torch.Tensor]:
    return degla_losses(features, ctx.teacher, batch, cfg)


# the DeGLA stage: NegCLIP replaces the global loss; TGC and distillation read the EMA teacher
LOSS_TERM = register(LossTerm(
    name="degla", compute=_term, section="degla", switch="enabled", replaces=("global",),
    weights={"degla_base": "base_weight", "degla_igc": "igc_weight", "degla_tgc": "tgc_weight",
             "degla_distill": "distill_weight"},
    needs={"degla_tgc": ("teacher",), "degla_distill": ("teacher",)}, batch_fields=("neg_text", "neg_valid")))
