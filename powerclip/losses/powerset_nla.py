"""NLA-T1 and NLA-T2 of docs/losses.md §2 for every (image, caption) pair, chunked over captions.

Notation: rows r are images with M region slots, columns c are captions with K phrase slots,
s_{rmck} = <phi_{r,m}, p_{c,k}> * scale_r (scale_r = region_scale, default 1/M_r), v_{rm} the region
validity, u_{ck} the phrase validity, K_c = sum_k u_{ck}, n_r = sum_m v_{rm}.

    NLA-T1_rc = (1/K_c) sum_{k valid} sum_{m valid} softplus_tau(s_{rmck})
    NLA-T2_rc = tau * LSE_{k valid}[(1/tau) sum_{m valid} g(s_{rmck})] - (1 - zeta) tau log K_c
    g(x) = x/2 + zeta tau log cosh(x / (2 tau))

Why this is cheap. With a = |s| and L = tau log1p(exp(-|s|/tau)) (the only stable transcendental):

    softplus_tau(s)            = (s + a)/2 + L
    tau log cosh(s/(2 tau))    = a/2 + L - tau log 2
    g(s)                       = s/2 + zeta (a/2 + L - tau log 2)

so both terms are linear in three masked sums over regions: S = sum_m v s (a plain matmul with the
masked region sum, no [.., M, .., K] tensor at all), A = sum_m v a and Lam = sum_m v L. Only A and
Lam need the big [R, M, C, K] tensor, and ``_AbsLogSums`` computes them with a hand-written backward
that recomputes s instead of saving it: autograd keeps only the small inputs, and the forward and
backward of one column chunk each hold ~3 tensors of [R, M, chunk, K]. Padded regions are masked
by v AFTER the activation (softplus_tau(0) = tau log 2, not 0); padded phrases by u.

Singletons-only ablation (``singletons_only``): only subsets with |A| = 1 are allowed. The T1
identity then becomes tau log sum_{|A|=1} exp(X(A)/tau) = tau LSE_m(s/tau) (smooth max over single
regions), and the R2T mean over singleton subsets of the max over phrases is smoothed the same way:

    T1_single_rc = (1/K_c) sum_{k valid} tau LSE_{m valid}(s_{rmck}/tau)
    T2_single_rc = (1/n_r) sum_{m valid} tau LSE_{k valid}(s_{rmck}/tau)

(an image with no valid region has no singleton subset: both are 0). ζ plays no role there.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from powerclip.losses import matmul_precision as mp
from powerclip.losses.powerset_embed import autocast_off

_LOG2 = math.log(2.0)
# [R, M, chunk, K] tensors alive at once in forward or backward of ``_AbsLogSums`` (s/a, L or sign, q),
# plus one for matmul workspace; the chunk is sized so that this many fit the memory budget.
_LIVE_NLA = 4
_LIVE_SINGLE = 8  # plain autograd under recomputation: s, s/tau, exp, softmax, grads
_NEG = -1e30  # finite "minus infinity": keeps gradients finite when a whole slice is masked


def column_chunk(rows: int, cols: int, per_pair_elems: int, live: int, itemsize: int,
                 memory_budget_mb: float) -> int:
    """Columns per chunk so that ``live`` tensors of [rows, chunk, per_pair_elems] fit the budget (>= 1)."""
    per_col = live * rows * per_pair_elems * itemsize
    fit = int(memory_budget_mb * 2**20 // max(per_col, 1))
    return max(1, min(cols, fit))


class _AbsLogSums(torch.autograd.Function):
    """A_rck = sum_m v_rm |s_rmck| and Lam_rck = sum_m v_rm tau log1p(exp(-|s_rmck|/tau)), s = phi.p.

    Backward recomputes s (two matmuls) rather than storing [R, M, C, K] tensors:
    dA/ds = sign(s), dLam/ds = -sign(s) sigmoid(-|s|/tau)  (sign(0) = 0 gives the right one-sided
    sums: d softplus_tau/ds (0) = g'(0) = 1/2 through the linear S term).
    """

    @staticmethod
    def forward(ctx, phi: torch.Tensor, p: torch.Tensor, v: torch.Tensor, tau: float,
                mdt: torch.dtype | None = None):
        r, m, d = phi.shape
        c, k, _ = p.shape
        s = mp.mm(phi.reshape(r * m, d), p.reshape(c * k, d).T, mdt).view(r, m, c * k)
        a = s.abs_()  # s itself is not needed any more: reuse its memory
        lam = a.mul(-1.0 / tau).exp_().log1p_().mul_(tau)
        vb = v[:, None, :]  # [R, 1, M]
        a_sum = torch.bmm(vb, a).view(r, c, k)
        del a
        lam_sum = torch.bmm(vb, lam).view(r, c, k)
        ctx.save_for_backward(phi, p, v)
        ctx.tau, ctx.mdt = tau, mdt
        return a_sum, lam_sum

    @staticmethod
    def backward(ctx, g_a: torch.Tensor | None, g_lam: torch.Tensor | None):
        phi, p, v = ctx.saved_tensors
        tau = ctx.tau
        if g_a is None and g_lam is None:
            return None, None, None, None, None
        with autocast_off(phi.device):  # s/tau ~ 1e3: never in half
            return _AbsLogSums._grads(ctx, phi, p, v, tau, g_a, g_lam)

    @staticmethod
    def _grads(ctx, phi, p, v, tau, g_a, g_lam):
        r, m, d = phi.shape
        c, k, _ = p.shape
        mdt = ctx.mdt  # the forward's operand precision: the same s, so the same signs
        s = mp.mm(phi.reshape(r * m, d), p.reshape(c * k, d).T, mdt).view(r, m, c * k)
        sign = s.sign()
        q = s.abs_().mul_(-1.0 / tau).sigmoid_()  # sigmoid(-|s|/tau)
        if g_lam is not None:
            q.mul_(g_lam.reshape(r, 1, c * k).neg())
        else:
            q.zero_()
        if g_a is not None:
            q.add_(g_a.reshape(r, 1, c * k))
        ds = q.mul_(sign).mul_(v[:, :, None])  # [R, M, C*K]
        del sign
        ds2 = ds.view(r * m, c * k)
        g_phi = mp.mm(ds2, p.reshape(c * k, d), mdt).view(r, m, d) if ctx.needs_input_grad[0] else None
        g_p = mp.mm(ds2.T, phi.reshape(r * m, d), mdt).view(c, k, d) if ctx.needs_input_grad[1] else None
        return g_phi, g_p, None, None, None


def _nla_chunk(phi_s: torch.Tensor, region_sum: torch.Tensor, n_regions: torch.Tensor, v: torch.Tensor,
               p: torch.Tensor, u: torch.Tensor, tau: float, zeta: float,
               use_t1: bool, use_t2: bool, mdt: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """T1, T2 [R, c] for one column chunk (see module docstring for the algebra)."""
    r = phi_s.shape[0]
    c, k, d = p.shape
    s_sum = mp.mm(region_sum, p.reshape(c * k, d).T, mdt).view(r, c, k)  # S = sum_m v s
    a_sum, lam_sum = _AbsLogSums.apply(phi_s, p, v, tau, mdt)
    kc = u.sum(-1).to(phi_s.dtype)  # [c]
    uf = u.to(phi_s.dtype)
    zero = phi_s.new_zeros(r, c)
    t1 = zero
    if use_t1:
        per_phrase = 0.5 * (s_sum + a_sum) + lam_sum  # sum_m softplus_tau(s)
        t1 = (per_phrase * uf).sum(-1) / kc
    t2 = zero
    if use_t2:
        g_sum = 0.5 * s_sum + zeta * (0.5 * a_sum + lam_sum - (n_regions * (tau * _LOG2))[:, None, None])
        logits = (g_sum / tau).masked_fill(~u[None], float("-inf"))
        t2 = tau * torch.logsumexp(logits, dim=-1) - (1.0 - zeta) * tau * torch.log(kc)[None]
    return t1, t2


def _masked_lse(x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over ``dim`` of the entries where ``mask``; -1e30-ish (finite) when none is."""
    return torch.logsumexp(x.masked_fill(~mask, _NEG), dim=dim)


def _single_chunk(phi_s: torch.Tensor, v: torch.Tensor, p: torch.Tensor, u: torch.Tensor, tau: float,
                  use_t1: bool, use_t2: bool, mdt: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Singletons-only T1, T2 [R, c] for one column chunk (plain autograd)."""
    r, m, d = phi_s.shape
    c, k, _ = p.shape
    s = mp.mm(phi_s.reshape(r * m, d), p.reshape(c * k, d).T, mdt).view(r, m, c, k) / tau
    vm = v.bool()[:, :, None, None]
    um = u[None, None]
    kc = u.sum(-1).to(s.dtype)
    n = v.sum(-1)
    zero = phi_s.new_zeros(r, c)
    t1, t2 = zero, zero
    if use_t1:
        lse_m = tau * _masked_lse(s, vm.expand_as(s), dim=1)  # [R, c, K]
        lse_m = torch.where((n > 0)[:, None, None], lse_m, torch.zeros_like(lse_m))
        t1 = (lse_m * u.to(s.dtype)[None]).sum(-1) / kc
    if use_t2:
        lse_k = tau * _masked_lse(s, um.expand_as(s), dim=3)  # [R, M, c]
        t2 = (lse_k * v[:, :, None]).sum(1) / n.clamp_min(1)[:, None]
    return t1, t2


def nla_pair_terms(phi: torch.Tensor, region_valid: torch.Tensor, region_scale: torch.Tensor,
                   p: torch.Tensor, phrase_valid: torch.Tensor, tau: float, zeta: float,
                   use_t1: bool = True, use_t2: bool = True, singletons_only: bool = False,
                   memory_budget_mb: float = 512.0, chunk: int | None = None,
                   matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLA-T1 and NLA-T2 [R, C] of R images against C captions (zeros for a switched-off term).

    phi [R, M, D] region embeddings, region_valid [R, M] bool, region_scale [R] (the 1/M factor),
    p [C, K, D] phrase embeddings, phrase_valid [C, K] bool (every caption needs >= 1 valid phrase).
    Inputs are computed in their own dtype (the caller casts to fp32/fp64). ``chunk`` overrides
    the number of columns per chunk derived from ``memory_budget_mb``; when even one column of all
    R rows exceeds the budget (many rows, e.g. accumulated micro-batches), the rows are chunked too,
    down to one row. ``matmul_dtype``: operand dtype of the score matmuls (losses/matmul_precision.py).
    """
    r, m, d = phi.shape
    c, k, _ = p.shape
    v = region_valid.to(phi.dtype)
    phi_s = phi * (region_scale.to(phi.dtype)[:, None, None] * v[..., None])  # padded slots -> exactly 0
    u = phrase_valid.bool()
    if c == 0 or r == 0:
        z = phi.new_zeros(r, c) + 0.0 * (phi.sum() + p.sum())
        return z, z
    live = _LIVE_SINGLE if singletons_only else _LIVE_NLA
    rows_fit = column_chunk(1, r, m * k, live, phi.element_size(), memory_budget_mb)  # rows x 1 column
    if chunk is None and rows_fit < r:  # not even one column of all rows fits: chunk the rows too
        parts = [nla_pair_terms(phi[i:i + rows_fit], region_valid[i:i + rows_fit], region_scale[i:i + rows_fit],
                                p, phrase_valid, tau, zeta, use_t1, use_t2, singletons_only, memory_budget_mb,
                                matmul_dtype=matmul_dtype)
                 for i in range(0, r, rows_fit)]
        return torch.cat([a for a, _ in parts], dim=0), torch.cat([b for _, b in parts], dim=0)
    step = chunk or column_chunk(r, c, m * k, live, phi.element_size(), memory_budget_mb)
    step = max(1, min(step, c))
    if singletons_only:
        recompute = torch.is_grad_enabled() and (phi.requires_grad or p.requires_grad) and step < c
        parts = []
        for start in range(0, c, step):
            args = (phi_s, v, p[start:start + step], u[start:start + step], tau, use_t1, use_t2, matmul_dtype)
            parts.append(checkpoint(_single_chunk, *args, use_reentrant=False) if recompute
                         else _single_chunk(*args))
    else:
        region_sum = phi_s.sum(1)  # [R, D]
        n_regions = v.sum(1)
        parts = [_nla_chunk(phi_s, region_sum, n_regions, v, p[start:start + step], u[start:start + step],
                            tau, zeta, use_t1, use_t2, matmul_dtype) for start in range(0, c, step)]
    t1 = torch.cat([a for a, _ in parts], dim=1)
    t2 = torch.cat([b for _, b in parts], dim=1)
    return t1, t2


def nla_pair_terms_diag(phi: torch.Tensor, region_valid: torch.Tensor, region_scale: torch.Tensor,
                        p: torch.Tensor, phrase_valid: torch.Tensor, tau: float, zeta: float,
                        use_t1: bool = True, use_t2: bool = True,
                        matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NLA-T1 and NLA-T2 [B] of the B matched pairs (image i, caption i) only.

    A negative pool scores each row's positive separately from the pool: computing the whole own
    [B, B] block for its diagonal would cost B^2 pairs (and (A·B)^2 under accumulation). The [B, M, K]
    tensors here are small, so plain autograd with the same stable forms as ``_nla_chunk`` does.
    """
    v = region_valid.to(phi.dtype)
    phi_s = phi * (region_scale.to(phi.dtype)[:, None, None] * v[..., None])
    u = phrase_valid.bool()
    s = mp.einsum("bmd,bkd->bmk", phi_s, p, matmul_dtype)
    a = s.abs()
    lam = tau * torch.log1p(torch.exp(-a / tau))
    vm = v[:, :, None]
    kc = u.sum(-1).to(phi.dtype)
    t1 = t2 = phi.new_zeros(phi.shape[0])
    if use_t1:
        per_phrase = ((0.5 * (s + a) + lam) * vm).sum(1)  # sum_m softplus_tau(s)
        t1 = (per_phrase * u.to(phi.dtype)).sum(-1) / kc
    if use_t2:
        g_sum = ((0.5 * s + zeta * (0.5 * a + lam - tau * _LOG2)) * vm).sum(1)
        logits = (g_sum / tau).masked_fill(~u, float("-inf"))
        t2 = tau * torch.logsumexp(logits, dim=-1) - (1.0 - zeta) * tau * torch.log(kc)
    return t1, t2
