"""C2LIP concept-centric losses (docs/losses.md §3): noun-phrase contrast (NPC) and cross-modal attention
pooling (XAC).

Entry point: ``concept_losses(features, batch, cfg, global_loss)`` returns the UNWEIGHTED terms
``concept_npc`` and ``concept_xac`` (only those whose weight in ``cfg`` is > 0; the composer multiplies
by ``loss.concept.npc_weight`` / ``xac_weight``) plus detached diagnostics under ``concept_diag_*``.

Layout. Rank r holds B_r images and C_r concept rows (``Features.concepts`` [C_r, D]) with
``Batch.concept_owner`` [C_r] indexing its LOCAL images and ``Batch.concept_ids`` [C_r] (hash of the
normalised concept text). Concepts, owners and ids are all-gathered with variable sizes
(``gather_variable``; the concept rows keep their gradient); owners are offset by the exclusive
cumulative sum of the per-rank IMAGE counts, so gathered concept n belongs to global image o(n).
Both terms score this rank's LOCAL images against ALL N gathered concepts: NPC with the global image
embedding u_i, XAC with the concept-specific pooling p_{in} of the image's (local) patches.

Negative pool (``cfg.negative_pool``, losses/pool.py). ``all`` (or ``sample:N`` with N >= G) is the
above. ``sample:N`` draws N IMAGES of the global batch (the same draw on every rank, from the step);
image i is then scored against its own concepts and the concepts of the drawn images other than i,
and only those are gathered, so per-rank work is B x (own + ~N·concepts per image) whatever W.
Each image's own concepts are then scored against their owner only (``xac_scores_paired``), not as a
B x C block whose off-owner entries would be masked. ``local``: only this rank's own concept rows. Positives and the false-negative fix apply within the
candidates; the normalisers are unchanged (G images for sigmoid, images with a positive for softmax).

Positives. P(i) = {n : o(n) = i}, plus, with ``false_negative_fix``, every n whose id equals the id of
one of image i's own concepts (the same normalised noun phrase in another caption of the global batch
is not a negative for i).

Forms (``cfg.form``; ``auto`` follows ``loss.global_loss``: siglip -> sigmoid, clip -> softmax):

* sigmoid (the paper's, SigLIP scale s and bias b): every (image, concept) pair is an independent
  binary term, y = +1 for positives and -1 otherwise, and the value is normalised like open_clip's
  SigLipLoss, i.e. summed over all pairs and divided by the number of images:
      L = (1/G) sum_i sum_n -log sigmoid(y_in * (s * score_in + b)),   G = global image count.
  There is no separate concept->image direction: the pair sum already covers both.
* softmax (multi-positive InfoNCE for CLIP models): image i -> all N concepts, the mean
  log-probability over its positives, averaged over the images that have at least one positive:
      L = -(1/G+) sum_{i: P(i) non-empty} (1/|P(i)|) sum_{p in P(i)} log softmax_n(s * score_in)_p.
  Only the image->concept direction: docs/losses.md §3 defines positives per image, and a concept->image
  softmax for XAC would need every rank's patches (the pooling is per image-concept pair). The concept
  embeddings still get the full contrastive gradient through the image rows' softmax.

Distributed convention (the same as open_clip's ``local_loss + gather_with_grad`` and
powerclip.losses.global_loss): each rank returns W * (its local sum) / (global normaliser). The
backward of the gather sums every rank's contribution into the owner's concept rows, so after
DeepSpeed AVERAGES gradients over the W ranks they equal the single-process gradient on the global
batch, and the mean of the per-rank values equals the single-process value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from powerclip import checks
from powerclip import distributed as pdist
from powerclip.config import ConceptLossConfig
from powerclip.data.batch import Batch
from powerclip.losses.concept_xac import xac_scores, xac_scores_paired
from powerclip.losses.matmul_precision import operand_dtype
from powerclip.losses.pool import parse_pool, sample_members, to_device
from powerclip.losses.registry import LossContext, LossTerm, register
from powerclip.model.features import Features

TERMS = ("concept_npc", "concept_xac")


def resolve_form(form: str, global_loss: str) -> str:
    """``auto`` -> sigmoid for SigLIP models, softmax for CLIP InfoNCE models."""
    if form == "auto":
        if global_loss not in ("clip", "siglip"):
            raise ValueError(f"loss.global_loss={global_loss!r}: cannot derive loss.concept.form")
        return "sigmoid" if global_loss == "siglip" else "softmax"
    if form not in ("sigmoid", "softmax"):
        raise ValueError(f"loss.concept.form={form!r} is not one of auto, sigmoid, softmax")
    return form


@dataclass
class GatheredConcepts:
    """The global concept set as seen from one rank."""

    concepts: torch.Tensor  # [N, D] all ranks' concept rows, gradient flows back to each owner rank
    owner: torch.Tensor  # [N] long, GLOBAL image index of each concept
    ids: torch.Tensor | None  # [N] long, normalised-text hash
    image_offset: int  # global index of this rank's first image
    num_images: int  # G, images in the global batch
    concept_sizes: list[int]  # concept rows per rank
    candidates: torch.Tensor | None = None  # [B, N] bool: columns in each local image's pool (None: all)
    own_columns: int = 0  # leading columns that are this rank's own concepts, scored with their owner only


def gather_concepts(features: Features, batch: Batch, cfg: ConceptLossConfig | None = None,
                    per_rank: list[list[int]] | None = None) -> GatheredConcepts:
    """All-gather concepts with variable per-rank sizes; owners shifted to global image indices.

    Under a negative pool smaller than the global batch, only the pool's columns (see ``_pooled``).
    ``per_rank``: every rank's [images, concept rows, embedding width] if the caller exchanged them.
    """
    cfg = cfg or ConceptLossConfig(negative_pool="all")
    if features.concepts is None or batch.concept_owner is None:
        raise ValueError("concept losses need Features.concepts [C, D] and Batch.concept_owner [C] "
                         "(data.concepts: true and a model that encodes batch.concept_text)")
    concepts = features.concepts
    owner = batch.concept_owner.to(device=concepts.device, dtype=torch.long)
    b = features.image.shape[0]
    c = concepts.shape[0]
    if concepts.dim() != 2 or owner.shape != (c,):
        raise ValueError(f"Features.concepts {tuple(concepts.shape)} and Batch.concept_owner "
                         f"{tuple(owner.shape)} do not describe the same {c} concept rows")
    if c and checks.enabled() and (int(owner.min()) < 0 or int(owner.max()) >= b):  # reads values: a host sync
        raise ValueError(f"Batch.concept_owner must index the {b} local images, got values in "
                         f"[{int(owner.min())}, {int(owner.max())}]")
    ids = batch.concept_ids
    if ids is not None:
        ids = ids.to(device=concepts.device, dtype=torch.long)
        if ids.shape != (c,):
            raise ValueError(f"Batch.concept_ids has shape {tuple(ids.shape)}, expected ({c},)")

    # one size exchange for the step (the host needs the sizes: under NCCL reading them waits for the
    # GPU): every rank's image and concept counts and embedding width, then gathers of known sizes
    per_rank = per_rank if per_rank is not None else pdist.gather_ints([b, c, concepts.shape[1]])
    pdist.require_equal("concept embedding width (Features.concepts dim 1)", [r[2] for r in per_rank])
    image_sizes, sizes = [r[0] for r in per_rank], [r[1] for r in per_rank]
    image_offset = pdist.rank_offset(image_sizes)
    num_images = sum(image_sizes)
    pool = parse_pool(cfg.negative_pool, "loss.concept.negative_pool")
    if pool.covers(num_images):
        all_concepts = pdist.gather_known_sizes(concepts, sizes, with_grad=True)
        all_owner = pdist.gather_known_sizes(owner + image_offset, sizes, with_grad=False)
        all_ids = pdist.gather_known_sizes(ids, sizes, with_grad=False) if ids is not None else None
        return GatheredConcepts(all_concepts, all_owner, all_ids, image_offset, num_images, sizes)
    return _pooled(concepts, owner, ids, image_offset, num_images, b, pool.kind, pool.size)


def _pooled(concepts: torch.Tensor, owner: torch.Tensor, ids: torch.Tensor | None, image_offset: int,
            num_images: int, b: int, kind: str, size: int) -> GatheredConcepts:
    """Columns [own concepts | concepts of the pooled images]; image i's candidates are its own concepts
    and the concepts of the pooled images other than i (``local``: only this rank's own concepts).

    The pool is a set of IMAGES (drawn like the powerset pool, losses/pool.py) because the concept
    count per image varies; a concept enters with its owner. Own concepts are always scored, so every
    image keeps its positives; the sampled pool does not depend on how the batch is split over ranks.
    """
    dev = concepts.device
    glob_owner = owner + image_offset
    local_index = torch.arange(b, device=dev) + image_offset
    own_cand = glob_owner[None, :] == local_index[:, None]  # [B, C]
    if kind == "local":
        cand = torch.ones(b, concepts.shape[0], dtype=torch.bool, device=dev)
        return GatheredConcepts(concepts, glob_owner, ids, image_offset, num_images, [concepts.shape[0]], cand)
    members = to_device(sample_members(num_images, size, salt=1), dev)  # pinned: no wait for the GPU
    # the pooled rows: their count depends on the values, so one host sync here (``nonzero``) and one
    # size exchange, shared by the three gathers
    rows = torch.isin(glob_owner, members).nonzero().flatten()
    pool_concepts, sizes = pdist.gather_variable(concepts.index_select(0, rows), with_grad=True)
    pool_owner = pdist.gather_known_sizes(glob_owner.index_select(0, rows), sizes, with_grad=False)
    cols = torch.cat([concepts, pool_concepts])
    col_owner = torch.cat([glob_owner, pool_owner])
    col_ids = None
    if ids is not None:
        col_ids = torch.cat([ids, pdist.gather_known_sizes(ids.index_select(0, rows), sizes, with_grad=False)])
    cand = torch.cat([own_cand, pool_owner[None, :] != local_index[:, None]], dim=1)
    return GatheredConcepts(cols, col_owner, col_ids, image_offset, num_images, sizes, cand, concepts.shape[0])


def positive_mask(image_index: torch.Tensor, owner: torch.Tensor, ids: torch.Tensor | None,
                  false_negative_fix: bool) -> torch.Tensor:
    """[B, N] bool: concept n is a positive of image ``image_index[b]`` (global indices).

    Without the fix: o(n) = i. With it: ids[n] is among the ids of image i's own concepts. Computed
    through an id vocabulary (a B x N table indexed by each id's first position in sorted order)
    instead of an [N, N] comparison; fixed shapes throughout (no ``unique``/``nonzero``, whose output
    sizes depend on the values and would cost a host synchronisation).
    """
    own = owner[None, :] == image_index[:, None]
    if not false_negative_fix:
        return own
    if ids is None:
        raise ValueError("loss.concept.false_negative_fix needs Batch.concept_ids (hash of the "
                         "normalised concept text); switch the fix off or provide the ids")
    if owner.numel() == 0:
        return own
    # equal ids share one slot: the position of their first occurrence in sorted order
    inv = torch.searchsorted(torch.sort(ids).values, ids)[None, :].expand(own.shape[0], -1)
    table = torch.zeros(own.shape, dtype=torch.uint8, device=owner.device)  # 1 byte per pair, as bool
    table.scatter_reduce_(1, inv, own.to(torch.uint8), reduce="amax")  # [B, slot]: owns that id
    return table.gather(1, inv).bool()


def sigmoid_pair_sum(logits: torch.Tensor, positives: torch.Tensor,
                     candidates: torch.Tensor | None = None) -> torch.Tensor:
    """sum over (candidate) pairs of -log sigmoid(y * logit), y = +1 / -1."""
    y = positives.to(logits.dtype) * 2 - 1
    terms = F.softplus(-y * logits)
    if candidates is not None:
        terms = terms * candidates
    return terms.sum()


def softmax_multi_positive_sum(logits: torch.Tensor, positives: torch.Tensor,
                               candidates: torch.Tensor | None = None) -> torch.Tensor:
    """sum over rows with a positive of -(mean over positives of log softmax(row over its candidates))."""
    if candidates is not None:
        logits = logits.masked_fill(~candidates, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    npos = positives.sum(-1)
    # rows without a positive have numerator 0: no boolean indexing (data-dependent shape, a host sync)
    per_row = -torch.where(positives, logp, torch.zeros_like(logp)).sum(-1) / npos.clamp_min(1)
    return per_row.sum()


def contrast(scores: torch.Tensor, positives: torch.Tensor, form: str, features: Features,
             normaliser: float | torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Per-rank loss value of one term: W * local sum / global normaliser (see module docstring).

    ``normaliser`` may be a device tensor (a count reduced over ranks): it stays on the device.
    """
    scale = features.logit_scale.float().reshape(())
    logits = scale * scores
    if form == "sigmoid":
        if features.logit_bias is None:
            raise ValueError("the sigmoid concept loss needs Features.logit_bias (a SigLIP model: "
                             "model.init_logit_bias, e.g. -10); use loss.concept.form=softmax otherwise")
        total = sigmoid_pair_sum(logits + features.logit_bias.float().reshape(()), positives, candidates)
    else:
        total = softmax_multi_positive_sum(logits, positives, candidates)
    if isinstance(normaliser, torch.Tensor):
        return total * (pdist.world_size() / normaliser.double().clamp_min(1.0)).to(total.dtype)
    return total * (pdist.world_size() / max(normaliser, 1.0))


def with_own_block(own: torch.Tensor, owner: torch.Tensor, rest: torch.Tensor, b: int) -> torch.Tensor:
    """[B, n_own + N] scores: each own column holds its owner's score (others 0: not candidates)."""
    if own.shape[0] == 0:
        return rest
    block = own.new_zeros(b, own.shape[0]).index_put((owner, torch.arange(own.shape[0], device=own.device)), own)
    return torch.cat([block, rest], dim=1)


def concept_losses(features: Features, batch: Batch, cfg: ConceptLossConfig,
                   global_loss: str, per_rank: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """The concept terms whose weight is > 0 (unweighted) and their diagnostics (``per_rank``: see
    ``gather_concepts``)."""
    want_npc = cfg.npc_weight > 0
    want_xac = cfg.xac_weight > 0
    if not (want_npc or want_xac):
        return {}
    form = resolve_form(cfg.form, global_loss)
    g = gather_concepts(features, batch, cfg, per_rank)
    image = features.image
    b = image.shape[0]
    local_index = torch.arange(b, device=image.device) + g.image_offset
    pos = positive_mask(local_index, g.owner, g.ids, cfg.false_negative_fix)
    cand = g.candidates
    if cand is not None:
        pos = pos & cand

    # Normalisers and diagnostics need global counts (no gradient); they stay on the device (reading
    # them on the host would wait for the GPU) and are exact in float64 far beyond any batch size.
    own = g.owner[None, :] == local_index[:, None]
    if cand is not None:
        own = own & cand
    n_cand = (cand.sum().to(torch.float64) if cand is not None
              else torch.full((), float(b * g.concepts.shape[0]), dtype=torch.float64, device=image.device))
    counts = torch.stack([pos.any(-1).sum(), pos.sum(), own.sum()]).to(torch.float64)
    counts = torch.cat([counts, n_cand[None]])
    counts = pdist.all_reduce_sum(counts)
    images_with_pos, n_pos, n_own, n_all = counts.unbind()
    normaliser = float(g.num_images) if form == "sigmoid" else images_with_pos

    out: dict[str, torch.Tensor] = {}
    concepts = g.concepts.float()
    own_cols = g.own_columns
    own_owner = g.owner[:own_cols] - g.image_offset  # local image of each own column
    if want_npc:
        img = image.float()
        npc_own = (img[own_owner] * concepts[:own_cols]).sum(-1)
        npc_scores = with_own_block(npc_own, own_owner, img @ concepts[own_cols:].t(), b)
        out["concept_npc"] = contrast(npc_scores, pos, form, features, normaliser, cand)
    if want_xac:
        if features.patches is None:
            raise ValueError("loss.concept.xac_weight > 0 needs Features.patches [B, T, D] "
                             "(the model's dense patch path)")
        mdt = operand_dtype(cfg.matmul_precision, "loss.concept.matmul_precision")
        xac_own = xac_scores_paired(features.patches, own_owner, concepts[:own_cols], cfg.xac_lambda, mdt)
        xac = with_own_block(xac_own, own_owner, xac_scores(features.patches, concepts[own_cols:], cfg.xac_lambda,
                                                             cfg.memory_budget_mb, mdt), b)
        out["concept_xac"] = contrast(xac, pos, form, features, normaliser, cand)
        with torch.no_grad():
            negs = ~pos if cand is None else cand & ~pos
            pos_mean = pdist.all_reduce_sum(torch.stack([(xac * pos).sum(), (xac * negs).sum()]))
            out["concept_diag_xac_pos_cos"] = pos_mean[0] / n_pos.clamp_min(1.0).to(pos_mean.dtype)
            out["concept_diag_xac_neg_cos"] = pos_mean[1] / (n_all - n_pos).clamp_min(1.0).to(pos_mean.dtype)
    # torch.full fills on the device; torch.tensor(value, device=cuda) would copy from the host and wait
    out["concept_diag_concepts"] = torch.full((), float(g.concepts.shape[0]), device=image.device)
    out["concept_diag_positives_per_image"] = (n_pos / max(g.num_images, 1)).float()
    out["concept_diag_false_negative_share"] = ((n_pos - n_own) / n_pos.clamp_min(1.0)).float()
    return out


def _term(features: Features, batch: Batch, cfg: ConceptLossConfig, ctx: LossContext) -> dict[str, torch.Tensor]:
    return concept_losses(features, batch, cfg, global_loss=ctx.global_loss, per_rank=ctx.sizes)


def _sizes(features: Features, batch: Batch) -> list[int] | None:
    """[images, concept rows, embedding width]: gather_concepts's per_rank row."""
    c = features.concepts
    if c is None or c.dim() != 2 or batch.concept_owner is None:
        return None
    return [features.image.shape[0], c.shape[0], c.shape[1]]


LOSS_TERM = register(LossTerm(
    name="concept", compute=_term, section="concept",
    weights={"concept_npc": "npc_weight", "concept_xac": "xac_weight"},
    needs={"concept_xac": ("patches",)}, sizes=_sizes,
    batch_fields=("concept_text", "concept_owner", "concept_ids")))
