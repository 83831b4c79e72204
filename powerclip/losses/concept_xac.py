"""XAC scores: parameter-free cross-modal attention pooling of patches with the concept as query.

For image i (patches z_{i,t}, t = 1..T, unit norm) and concept n (c_n, unit norm), docs/losses.md §3:

    S_t = <c_n, z_{i,t}>,   a = softmax_t(lambda * S),   p = normalise(sum_t a_t z_{i,t}),
    score(i, n) = <p, c_n> = (sum_t a_t S_t) / sqrt(a^T K a),   K = Z Z^T  (the [T, T] patch Gram).

The closed form needs only [images, concepts, T] intermediates and one [images, T, T] Gram matrix,
never the pooled vectors [images, concepts, D]: T = 196 < D = 768 for a ViT-B/16, so it is
smaller, and cheaper once the Gram matrix is amortised: the explicit path costs 2*B*N*T*D
multiply-adds (similarities + pooling), the closed form B*N*T*D + B*T^2*D + B*N*T^2, which is less
whenever N is larger than about T (tools/bench_xac.py measures time and peak memory against explicit
pooling; smaller budgets cut memory further at a time cost, since every chunk recomputes and adds its
own [B, T, D] patch gradient).

Concepts are processed in chunks sized from ``memory_budget_mb``; each chunk runs under activation
checkpointing when gradients are needed, so the backward pass also holds one chunk's [B, chunk, T]
intermediates at a time. The budget bounds those intermediates only: the patch tensor, its gradient
and the [B, T, T] Gram matrix (all the size of the inputs) come on top.

``xac_scores_explicit`` materialises p the obvious way; tests and tools/bench_xac.py compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from powerclip.losses import matmul_precision as mp

# Live [B, chunk, T] float32 tensors per chunk, forward + backward under recomputation: S, lambda*S,
# a, a*S, a@K, (a@K)*a and their gradients; generous so that the measured peak stays under budget.
_LIVE_TENSORS_PER_CHUNK = 12
_EPS = 1e-12  # as F.normalize: p = v / max(||v||, eps)


def chunk_size(num_images: int, num_tokens: int, num_concepts: int, memory_budget_mb: float) -> int:
    """Concepts per chunk so that one chunk's [B, chunk, T] intermediates fit the budget (>= 1)."""
    per_concept = _LIVE_TENSORS_PER_CHUNK * num_images * num_tokens * 4
    fit = int(memory_budget_mb * 2**20 // max(per_concept, 1))
    return max(1, min(num_concepts, fit))


def _chunk_scores(z: torch.Tensor, gram: torch.Tensor, c: torch.Tensor, lam: float,
                  mdt: torch.dtype | None = None) -> torch.Tensor:
    """Closed-form scores of all images against one chunk of concepts: [B, n]."""
    s = mp.einsum("btd,nd->bnt", z, c, mdt)  # [B, n, T] similarities S_t
    a = torch.softmax(lam * s, dim=-1)
    num = (a * s).sum(-1)  # <sum_t a_t z_t, c>
    sq_norm = (mp.bmm(a, gram, mdt) * a).sum(-1)  # ||sum_t a_t z_t||^2 = a^T K a
    return num / sq_norm.clamp_min(_EPS * _EPS).sqrt()


def xac_scores(patches: torch.Tensor, concepts: torch.Tensor, lam: float = 1.0,
               memory_budget_mb: float = 512.0, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cosine <p_{in}, c_n> for every image i and concept n: [B, N] (float32).

    patches [B, T, D] and concepts [N, D] must be L2-normalised (``Features`` guarantees it).
    ``matmul_dtype``: operand dtype of the similarity and Gram matmuls (losses/matmul_precision.py).
    """
    if patches.dim() != 3 or concepts.dim() != 2 or patches.shape[-1] != concepts.shape[-1]:
        raise ValueError(f"xac_scores needs patches [B, T, D] and concepts [N, D], got "
                         f"{tuple(patches.shape)} and {tuple(concepts.shape)}")
    z = patches.float()
    c = concepts.float()
    b, t, _ = z.shape
    n = c.shape[0]
    if n == 0 or b == 0:
        return z.new_zeros((b, n)) + 0.0 * (z.sum() + c.sum())  # keeps the graph connected
    gram = mp.bmm(z, z.transpose(1, 2), matmul_dtype)  # [B, T, T]
    step = chunk_size(b, t, n, memory_budget_mb)
    if step >= n:
        return _chunk_scores(z, gram, c, lam, matmul_dtype)
    recompute = torch.is_grad_enabled() and (z.requires_grad or c.requires_grad)
    out = []
    for start in range(0, n, step):
        cc = c[start:start + step]
        if recompute:
            out.append(checkpoint(_chunk_scores, z, gram, cc, lam, matmul_dtype, use_reentrant=False))
        else:
            out.append(_chunk_scores(z, gram, cc, lam, matmul_dtype))
    return torch.cat(out, dim=1)


def xac_pooled_explicit(patches: torch.Tensor, concepts: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """The pooled vectors p_{in} themselves: [B, N, D] (reference; materialises everything)."""
    z = patches.float()
    c = concepts.float()
    s = torch.einsum("btd,nd->bnt", z, c)
    a = torch.softmax(lam * s, dim=-1)
    return F.normalize(torch.bmm(a, z), dim=-1, eps=_EPS)


def xac_scores_explicit(patches: torch.Tensor, concepts: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Reference scores <p_{in}, c_n> by explicit pooling: [B, N]."""
    p = xac_pooled_explicit(patches, concepts, lam)
    return (p * concepts.float()[None]).sum(-1)


def xac_scores_paired(patches: torch.Tensor, owner: torch.Tensor, concepts: torch.Tensor,
                      lam: float = 1.0, matmul_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Scores [C] of each concept against its OWN image only: <p_{o(n) n}, c_n>.

    A negative pool scores each image's own concepts apart from the pool, so that its cost is C·T·D
    rather than the B x C block whose off-diagonal would be masked anyway (B·C·T·D; under
    accumulation that block grows with the square of the rows). Explicit pooling: no Gram matrix.
    """
    z = patches.float()
    c = concepts.float()
    if c.shape[0] == 0:
        return c.new_zeros(0) + 0.0 * (z.sum() + c.sum())
    zo = z[owner]  # [C, T, D]
    s = mp.einsum("ctd,cd->ct", zo, c, matmul_dtype)
    a = torch.softmax(lam * s, dim=-1)
    pooled = mp.einsum("ct,ctd->cd", a, zo, matmul_dtype)
    return (a * s).sum(-1) / pooled.norm(dim=-1).clamp_min(_EPS)
