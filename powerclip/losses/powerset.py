"""PowerCLIP powerset alignment loss (docs/losses.md §2): the term ``loss.powerset`` switches on.

``powerset_loss(features, batch, cfg)`` returns UNWEIGHTED scalars; the composer multiplies
``powerset`` by ``loss.powerset.weight`` (lambda) and logs every entry as loss/<name>:

=========================  ====================================================================
powerset                   L_pow = 1/2 [l(S) + l(S^T)]  (the objective term)
powerset_i2t, _t2i         l(S) (image rows) and l(S^T) (caption rows), this rank's share
powerset_t1_pos, _t2_pos   mean T1 / T2 of the positive pairs (0 when the term is switched off)
powerset_t1_neg, _t2_neg   mean T1 / T2 of the negative pairs (this rank's image rows)
powerset_active            fraction of hinge terms above zero (both directions)
=========================  ====================================================================

S_ij = T1_ij + T2_ij is the fine-grained image-caption score (NLA by default, exact enumeration when
``cfg.exact``, singleton subsets only when ``cfg.singletons_only``), l(X) = mean_i max(0, delta +
max_{j != i} X_ij - X_ii) the hardest-negative triplet loss.

Region scale: ``cfg.region_scale`` when set, else 1/M_i with M_i the number of VALID regions of
image i. That equals docs/losses.md's 1/M whenever every slot is filled (random regions always are, stored
boxes are topped up with random ones) and keeps padded slots exactly invisible otherwise.

Distributed convention (the same as ``global_loss`` and ``degla``): rank r scores its B local images
against all G gathered captions (l(S) rows), and its B local captions against all G images (l(S^T)
rows) whose scores the other ranks computed for their own image rows and hand over by a
differentiable all-to-all (each pair is scored once in the job); the phrase embeddings and masks are
gathered with ``gather_with_grad``, and the per-rank value is the mean over the LOCAL rows. So
mean_r L_r = L (the single-process loss on the concatenated batch), and since the backward of the
all-gather and of the all-to-all returns every rank's contribution to the owner of each input, the
gradient reaching rank r's features is W dL/df_r; DeepSpeed AVERAGES gradients over the W ranks, which gives
exactly dL/dtheta. The trainer logs the rank-mean of each entry, which is the global value. Phrase
slots are padded to the largest K over ranks before gathering (K is a per-rank batch max).
On one rank both directions use the same G x G matrix, which is computed once.

Negative pool (``cfg.negative_pool``, see ``powerclip.losses.pool``): with ``all`` (or ``sample:N``,
N >= G) the columns are the whole global batch as above. With ``sample:N`` < G the columns are the
row's own positive plus a pool S of N pairs drawn identically on every rank from the step; only
S's members are gathered (``gather_known_sizes``), and the hardest negative is mined in S minus the
row itself. ``local`` scores each rank's rows against its own B columns only (no gather at all).

Cost per rank: B G M K multiply-adds of dimension D plus O(B G M K) elementwise work with the whole
batch as pool (one direction, the other arrives by the all-to-all); 2 B N M K under ``sample:N``
(both directions score the pool; the positives B M K). Chunked over columns, and over rows when
one column of all rows is too big, so that the [rows, chunk, M, K] intermediates stay within
``cfg.memory_budget_mb``.
"""

from __future__ import annotations

import torch

from powerclip import checks
from powerclip import distributed as pdist
from powerclip.config import PowersetLossConfig
from powerclip.data.batch import Batch
from powerclip.losses import matmul_precision as mp
from powerclip.losses.pool import members_per_rank, parse_pool, sample_members, to_device
from powerclip.losses.powerset_embed import autocast_off, compute_dtype, phrase_embeddings, region_embeddings
from powerclip.losses.powerset_exact import exact_pair_terms
from powerclip.losses.powerset_nla import nla_pair_terms, nla_pair_terms_diag
from powerclip.losses.registry import LossContext, LossTerm, register
from powerclip.model.features import Features

TERMS = ("powerset", "powerset_i2t", "powerset_t2i", "powerset_t1_pos", "powerset_t2_pos",
         "powerset_t1_neg", "powerset_t2_neg", "powerset_active")


def region_scale(region_valid: torch.Tensor, cfg: PowersetLossConfig, dtype: torch.dtype) -> torch.Tensor:
    """Per-image leaf scale [R]: cfg.region_scale, or 1/(number of valid regions) (see module doc)."""
    if cfg.region_scale is not None:
        return torch.full((region_valid.shape[0],), float(cfg.region_scale), dtype=dtype,
                          device=region_valid.device)
    return 1.0 / region_valid.sum(-1).clamp_min(1).to(dtype)


def pair_terms(phi: torch.Tensor, region_valid: torch.Tensor, p: torch.Tensor, phrase_valid: torch.Tensor,
               cfg: PowersetLossConfig, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T1, T2) [R, C] of R images against C captions under ``cfg`` (zeros for a term switched off)."""
    scale = region_scale(region_valid, cfg, phi.dtype)
    mdt = mp.operand_dtype(cfg.matmul_precision, "loss.powerset.matmul_precision")
    if cfg.exact:
        if mdt is not None:
            raise ValueError("loss.powerset.exact is the full-precision reference: it takes "
                             f"loss.powerset.matmul_precision=fp32, not {cfg.matmul_precision!r}")
        t1, t2 = exact_pair_terms(phi, region_valid, scale, p, phrase_valid, cfg.singletons_only,
                                  cfg.memory_budget_mb, chunk)
        if not cfg.use_t1:
            t1 = torch.zeros_like(t1)
        if not cfg.use_t2:
            t2 = torch.zeros_like(t2)
        return t1, t2
    return nla_pair_terms(phi, region_valid, scale, p, phrase_valid, cfg.tau, cfg.zeta, cfg.use_t1,
                          cfg.use_t2, cfg.singletons_only, cfg.memory_budget_mb, chunk, mdt)


def pair_terms_diag(phi: torch.Tensor, region_valid: torch.Tensor, p: torch.Tensor, phrase_valid: torch.Tensor,
                    cfg: PowersetLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(T1, T2) [B] of the matched pairs (image i, caption i): the positives of a negative pool.

    NLA: vectorised over the pairs. Exact enumeration and the singletons ablation (test and
    calibration modes) go pair by pair through ``pair_terms``.
    """
    if not cfg.exact and not cfg.singletons_only:
        scale = region_scale(region_valid, cfg, phi.dtype)
        mdt = mp.operand_dtype(cfg.matmul_precision, "loss.powerset.matmul_precision")
        return nla_pair_terms_diag(phi, region_valid, scale, p, phrase_valid, cfg.tau, cfg.zeta, cfg.use_t1,
                                   cfg.use_t2, mdt)
    parts = [pair_terms(phi[i:i + 1], region_valid[i:i + 1], p[i:i + 1], phrase_valid[i:i + 1], cfg)
             for i in range(phi.shape[0])]
    return torch.cat([a.reshape(1) for a, _ in parts]), torch.cat([b.reshape(1) for _, b in parts])


def hardest_negative_triplet(x: torch.Tensor, positives: torch.Tensor, margin: float,
                             negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row hinge max(0, margin + max_{j negative} x_ij - x_i,pos) [R] and the mask of active rows.

    x [R, C], positives [R] column index of each row's positive, negatives [R, C] bool: the columns
    that count as negatives of each row (default: every column but the positive; a negative pool
    passes its own, so the hardest negative is mined within the pool). A row with no negative has
    hinge 0.
    """
    r, c = x.shape
    rows = torch.arange(r, device=x.device)
    pos = x[rows, positives]
    if negatives is None:
        if c < 2:
            zero = x.sum(1) * 0.0
            return zero, zero > 0
        negatives = ~torch.nn.functional.one_hot(positives, c).bool()
    neg = x.masked_fill(~negatives, float("-inf")).amax(dim=1)
    has_neg = negatives.any(dim=1)
    hinge = torch.where(has_neg, torch.relu(margin + neg.masked_fill(~has_neg, 0.0) - pos), pos * 0.0)
    return hinge, hinge > 0


def _gather_bool(x: torch.Tensor) -> torch.Tensor:
    return pdist.gather_with_grad(x.to(torch.uint8)).bool()


def _pad_phrases(p: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = k - p.shape[1]
    if extra <= 0:
        return p, valid
    p = torch.cat([p, p.new_zeros(p.shape[0], extra, p.shape[2])], dim=1)
    valid = torch.cat([valid, valid.new_zeros(valid.shape[0], extra)], dim=1)
    return p, valid


Scores = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _local_scores(phi: torch.Tensor, rv: torch.Tensor, p: torch.Tensor, pv: torch.Tensor,
                  cfg: PowersetLossConfig, chunk: int | None) -> Scores:
    """Local rows against this rank's own columns only: one [B, B] matrix serves both directions."""
    b = phi.shape[0]
    t1, t2 = pair_terms(phi, rv, p, pv, cfg, chunk)
    s = t1 + t2
    negatives = ~torch.eye(b, dtype=torch.bool, device=phi.device)
    return s, s.T, t1, t2, negatives


def _gather(x: torch.Tensor, gather_dtype: torch.dtype | None) -> torch.Tensor:
    """``gather_with_grad`` in ``gather_dtype`` (the run's precision), back in x's dtype for scoring."""
    if gather_dtype is None or gather_dtype == x.dtype:
        return pdist.gather_with_grad(x)
    return pdist.gather_with_grad(x.to(gather_dtype)).to(x.dtype)


def _all_scores(phi: torch.Tensor, rv: torch.Tensor, p: torch.Tensor, pv: torch.Tensor,
                cfg: PowersetLossConfig, chunk: int | None, gather_dtype: torch.dtype | None = None) -> Scores:
    """Local rows against all G gathered columns, both directions, each pair scored ONCE in the job.

    Rank q scores its B images against all G captions; block s of those columns (rank s's captions)
    is exactly what rank s needs for its caption rows, so the blocks are exchanged by a differentiable
    all-to-all instead of rank s scoring them again against gathered images (which would also need the
    image-side gather). Columns come out reordered [own block, other ranks' blocks]; no max changes.
    """
    b, world = phi.shape[0], pdist.world_size()
    all_p, all_pv = _gather(p, gather_dtype), _gather_bool(pv)
    if all_p.shape[0] != b * world:
        raise ValueError("every rank must hold the same local batch size for the powerset loss")
    t1, t2 = pair_terms(phi, rv, all_p, all_pv, cfg, chunk)  # [B images, G captions]
    s_rows = t1 + t2
    received = pdist.all_to_all_with_grad(s_rows.T.contiguous())  # [W x B captions of mine, B images of q]
    s_cols = received.view(world, b, b).permute(1, 0, 2).reshape(b, world * b)  # [B captions, G images]
    order = _own_block_first(world * b, b, phi.device)
    negatives = torch.ones(b, world * b, dtype=torch.bool, device=phi.device)
    negatives[:, :b] = ~torch.eye(b, dtype=torch.bool, device=phi.device)
    return s_rows[:, order], s_cols[:, order], t1[:, order], t2[:, order], negatives


def _own_block_first(g: int, b: int, device: torch.device) -> torch.Tensor:
    start = pdist.rank() * b
    idx = torch.arange(g, device=device)
    return torch.cat([idx[start:start + b], idx[:start], idx[start + b:]])


def _sampled_scores(phi: torch.Tensor, rv: torch.Tensor, p: torch.Tensor, pv: torch.Tensor,
                    cfg: PowersetLossConfig, chunk: int | None, size: int,
                    gather_dtype: torch.dtype | None = None) -> Scores:
    """Local rows against [own positive | the sampled pool S of the global batch] (pool.py).

    Column 0 holds each row's positive, scored pair by pair (``pair_terms_diag``); the column of S
    that is the row's own pair (if drawn) is masked as a negative, since it is the positive again.
    """
    b, world, me = phi.shape[0], pdist.world_size(), pdist.rank()
    members = sample_members(b * world, size)
    counts, owner_rank = members_per_rank(members, [r * b for r in range(world)], [b] * world)
    mine = to_device(members[owner_rank == me] - me * b, phi.device)
    gdt = gather_dtype or phi.dtype
    s_phi = pdist.gather_known_sizes(phi[mine].to(gdt), counts).to(phi.dtype)
    s_rv = pdist.gather_known_sizes(rv[mine].to(torch.uint8), counts, with_grad=False).bool()
    s_p = pdist.gather_known_sizes(p[mine].to(gdt), counts).to(p.dtype)
    s_pv = pdist.gather_known_sizes(pv[mine].to(torch.uint8), counts, with_grad=False).bool()
    d1, d2 = pair_terms_diag(phi, rv, p, pv, cfg)  # [B]: each row's positive, column 0
    t1, t2 = pair_terms(phi, rv, s_p, s_pv, cfg, chunk)  # [B, N]
    t1c, t2c = pair_terms(s_phi, s_rv, p, pv, cfg, chunk)  # [N, B]
    t1, t2 = torch.cat([d1[:, None], t1], 1), torch.cat([d2[:, None], t2], 1)
    diag = (d1 + d2)[:, None]
    own = torch.arange(b, device=phi.device) + me * b
    negatives = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=phi.device),
                           to_device(members, phi.device)[None, :] != own[:, None]], dim=1)
    return t1 + t2, torch.cat([diag, (t1c + t2c).T], 1), t1, t2, negatives


def powerset_loss_from_embeddings(phi: torch.Tensor, region_valid: torch.Tensor, p: torch.Tensor,
                                  phrase_valid: torch.Tensor, cfg: PowersetLossConfig,
                                  chunk: int | None = None,
                                  gather_dtype: torch.dtype | None = None,
                                  per_rank: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """The loss from this rank's region embeddings phi [B, M, D] (+ valid [B, M]) and phrase
    embeddings p [B, K, D] (+ valid [B, K]); see the module docstring for the outputs.
    ``gather_dtype``: dtype in which they cross ranks (None: the compute dtype). ``per_rank``: every
    rank's [batch size, phrase count] when the caller already exchanged them (None: exchanged here).

    Autocast is switched off inside: s/tau ~ 1e3 magnifies half-precision matmul errors, so only the
    score matmuls' operands may be rounded, by the explicit ``cfg.matmul_precision`` (activations fp32).
    """
    with autocast_off(phi.device):
        return _loss(phi, region_valid, p, phrase_valid, cfg, chunk, gather_dtype, per_rank)


def _loss(phi: torch.Tensor, region_valid: torch.Tensor, p: torch.Tensor, phrase_valid: torch.Tensor,
          cfg: PowersetLossConfig, chunk: int | None, gather_dtype: torch.dtype | None,
          per_rank: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    b = phi.shape[0]
    if p.shape[0] != b:
        raise ValueError(f"powerset loss: {b} images but {p.shape[0]} captions")
    dtype = compute_dtype(phi)
    phi, p = phi.to(dtype), p.to(dtype)
    region_valid, phrase_valid = region_valid.bool(), phrase_valid.bool()
    empty = ~phrase_valid.any(-1)
    # reads values (a host sync): only under train.debug_checks; the meta device (cost model) has none
    if checks.enabled() and phi.device.type != "meta" and bool(empty.any()):
        raise ValueError(f"powerset loss: captions {empty.nonzero().flatten().tolist()} have no valid "
                         "phrase (every caption needs at least its root node in batch.phrase_tokens)")
    pool = parse_pool(cfg.negative_pool, "loss.powerset.negative_pool")
    world = pdist.world_size()
    sampled = False
    if pool.kind == "local" or (world == 1 and pool.covers(b)):
        s_rows, s_cols, t1_rows, t2_rows, negatives = _local_scores(phi, region_valid, p, phrase_valid, cfg, chunk)
    else:
        # one small collective: every rank's batch size (must agree) and phrase count (padded to the max)
        per_rank = per_rank if per_rank is not None else pdist.gather_ints([b, p.shape[1]])
        pdist.require_equal("powerset loss local batch size", [r[0] for r in per_rank])
        k_max = max(r[1] for r in per_rank)
        p, phrase_valid = _pad_phrases(p, phrase_valid, k_max)
        if pool.covers(b * world):
            s_rows, s_cols, t1_rows, t2_rows, negatives = _all_scores(phi, region_valid, p, phrase_valid, cfg,
                                                                      chunk, gather_dtype)
        else:
            sampled = True
            s_rows, s_cols, t1_rows, t2_rows, negatives = _sampled_scores(phi, region_valid, p, phrase_valid,
                                                                          cfg, chunk, pool.size, gather_dtype)
    # column of each row's positive: 0 under a sampled pool, the row's own index otherwise
    positives = torch.arange(b, device=phi.device) * int(not sampled)
    hinge_i2t, act_i2t = hardest_negative_triplet(s_rows, positives, cfg.margin, negatives)
    hinge_t2i, act_t2i = hardest_negative_triplet(s_cols, positives, cfg.margin, negatives)
    l_i2t, l_t2i = hinge_i2t.mean(), hinge_t2i.mean()

    with torch.no_grad():
        neg = negatives
        rows = torch.arange(b, device=phi.device)
        n_neg = neg.sum().clamp_min(1)
        diag = {
            "powerset_t1_pos": t1_rows[rows, positives].mean(),
            "powerset_t2_pos": t2_rows[rows, positives].mean(),
            "powerset_t1_neg": (t1_rows * neg).sum() / n_neg,
            "powerset_t2_neg": (t2_rows * neg).sum() / n_neg,
            "powerset_active": 0.5 * (act_i2t.to(dtype).mean() + act_t2i.to(dtype).mean()),
        }
    return {"powerset": 0.5 * (l_i2t + l_t2i), "powerset_i2t": l_i2t.detach(),
            "powerset_t2i": l_t2i.detach(), **diag}


def powerset_loss(features: Features, batch: Batch, cfg: PowersetLossConfig,
                  chunk: int | None = None, per_rank: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Entry point used by the composer: dense features + batch regions/phrases -> the terms above.

    ``per_rank``: every rank's [batch size, phrase count] if the composer exchanged them already."""
    if features.patches is None or features.tokens is None:
        raise ValueError("loss.powerset needs dense features (Features.patches and Features.tokens); "
                         "the model must be asked for them (composer.needs_dense)")
    missing = [n for n in ("region_masks", "phrase_tokens") if getattr(batch, n) is None]
    if missing:
        raise ValueError(f"loss.powerset needs batch.{' and batch.'.join(missing)} from the data loader")
    phi, rv = region_embeddings(features.patches, batch.region_masks, batch.region_valid)
    p, pv = phrase_embeddings(features.tokens, batch.phrase_tokens, batch.phrase_valid, batch.token_valid,
                              cfg.phrase_pool)
    return powerset_loss_from_embeddings(phi, rv, p, pv, cfg, chunk, run_gather_dtype(features.patches.dtype, cfg),
                                         per_rank)


def run_gather_dtype(run_dtype: torch.dtype, cfg: PowersetLossConfig) -> torch.dtype | None:
    """The dtype phi/p cross ranks in: the run's half precision under ``gather_precision: run``.

    Safe because only the storage is rounded: every score, activation and reduction stays fp32, and
    against an fp64 reference the loss stays within 1e-3 of the margin (tests/test_pool.py checks it
    on 2 ranks).
    """
    if cfg.gather_precision not in ("run", "fp32"):
        raise ValueError(f"loss.powerset.gather_precision={cfg.gather_precision!r} is not one of 'run', 'fp32'")
    if cfg.gather_precision == "run" and run_dtype in (torch.bfloat16, torch.float16):
        return run_dtype
    return None


def _term(features: Features, batch: Batch, cfg: PowersetLossConfig, ctx: LossContext) -> dict[str, torch.Tensor]:
    return powerset_loss(features, batch, cfg, per_rank=ctx.sizes)


def _sizes(features: Features, batch: Batch) -> list[int] | None:
    """[batch size, phrase count]: powerset_loss's per_rank row."""
    return None if batch.phrase_tokens is None else [features.image.shape[0], batch.phrase_tokens.shape[1]]


LOSS_TERM = register(LossTerm(
    name="powerset", compute=_term, section="powerset", weights={"powerset": "weight"},
    needs={"powerset": ("patches", "tokens")}, sizes=_sizes,
    batch_fields=("region_masks", "region_valid", "phrase_tokens", "phrase_valid", "token_valid")))
