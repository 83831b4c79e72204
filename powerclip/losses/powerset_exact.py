"""Exact powerset scores by enumerating all 2^M region subsets (docs/losses.md §2; M <= 12).

For tests, zeta calibration and the ``loss.powerset.exact`` mode. With X_k(A) = sum_{m in A} s_mk:

    Q<-_rc (T2R, phrase grounding) = (1/K_c) sum_{k valid} max_{A} X_k(A)
    Q->_rc (R2T, region coverage)  = (1/2^M)  sum_{A}        max_{k valid} X_k(A)

Padded region slots get s = 0 before enumerating. That makes them invisible: adding a slot with
s = 0 duplicates every subset with the same X, which changes neither the max over A (T2R) nor the
mean over A (R2T). So enumerating the 2^M slot subsets equals enumerating the subsets of the valid
regions. The empty subset is included (X = 0), as in the NLA-T1 identity (which sums over all A).

Singletons only (ablation, exact version of the smooth formulas in powerset_nla):
    Q<-_single = (1/K_c) sum_k max_{m valid} s_mk,   Q->_single = (1/n_r) sum_{m valid} max_k s_mk
(0 for an image without valid regions).
"""

from __future__ import annotations

import torch

from powerclip.losses.powerset_nla import column_chunk

MAX_EXACT_REGIONS = 12
_LIVE_EXACT = 4  # X, masked X, max bookkeeping, gradient of X (per [R, 2^M, chunk, K])


def subset_matrix(m: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """All 2^m subsets as a 0/1 matrix [2^m, m]; row a holds the binary digits of a."""
    idx = torch.arange(2 ** m, device=device)
    bits = (idx[:, None] >> torch.arange(m, device=device)[None, :]) & 1
    return bits.to(dtype)


def _raw_scores(phi_s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    r, m, d = phi_s.shape
    c, k, _ = p.shape
    return (phi_s.reshape(r * m, d) @ p.reshape(c * k, d).T).view(r, m, c, k)


def _exact_chunk(phi_s: torch.Tensor, p: torch.Tensor, u: torch.Tensor,
                 subsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _raw_scores(phi_s, p)  # [R, M, c, K], padded regions are exactly 0
    x = torch.einsum("am,rmck->rack", subsets, s)  # [R, 2^M, c, K]
    kc = u.sum(-1).to(s.dtype)
    t2r = (x.amax(dim=1) * u.to(s.dtype)[None]).sum(-1) / kc  # [R, c]
    r2t = x.masked_fill(~u[None, None], float("-inf")).amax(dim=-1).mean(dim=1)  # [R, c]
    return t2r, r2t


def _single_exact_chunk(phi_s: torch.Tensor, v: torch.Tensor, p: torch.Tensor,
                        u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = _raw_scores(phi_s, p)
    vb = v.bool()
    kc = u.sum(-1).to(s.dtype)
    n = vb.sum(-1)
    best_m = s.masked_fill(~vb[:, :, None, None], float("-inf")).amax(dim=1)  # [R, c, K]
    best_m = torch.where((n > 0)[:, None, None], best_m, torch.zeros_like(best_m))
    t2r = (best_m * u.to(s.dtype)[None]).sum(-1) / kc
    best_k = s.masked_fill(~u[None, None], float("-inf")).amax(dim=-1)  # [R, M, c]
    r2t = (best_k * v[:, :, None]).sum(1) / n.clamp_min(1).to(s.dtype)[:, None]
    return t2r, r2t


def exact_pair_terms(phi: torch.Tensor, region_valid: torch.Tensor, region_scale: torch.Tensor,
                     p: torch.Tensor, phrase_valid: torch.Tensor, singletons_only: bool = False,
                     memory_budget_mb: float = 512.0, chunk: int | None = None,
                     max_regions: int = MAX_EXACT_REGIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (Q<-, Q->) [R, C]: same inputs and conventions as ``nla_pair_terms``.

    ``max_regions`` guards against accidental 2^M blow-ups (the benchmark raises it to time M = 14).
    """
    r, m, d = phi.shape
    c, k, _ = p.shape
    if m > max_regions and not singletons_only:
        raise ValueError(f"exact powerset enumeration needs M <= {max_regions} region slots, got {m}")
    v = region_valid.to(phi.dtype)
    phi_s = phi * (region_scale.to(phi.dtype)[:, None, None] * v[..., None])
    u = phrase_valid.bool()
    if singletons_only:
        step = chunk or column_chunk(r, c, m * k, _LIVE_EXACT, phi.element_size(), memory_budget_mb)
        parts = [_single_exact_chunk(phi_s, v, p[i:i + step], u[i:i + step]) for i in range(0, c, step)]
    else:
        subsets = subset_matrix(m, phi.dtype, phi.device)
        step = chunk or column_chunk(r, c, (2 ** m) * k, _LIVE_EXACT, phi.element_size(), memory_budget_mb)
        parts = [_exact_chunk(phi_s, p[i:i + step], u[i:i + step], subsets) for i in range(0, c, step)]
    return torch.cat([a for a, _ in parts], dim=1), torch.cat([b for _, b in parts], dim=1)
