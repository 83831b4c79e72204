"""Per-patch embeddings for open_clip ``TimmModel`` towers whose timm ViT pools with a MAP head
(``AttentionPoolLatent``: SigLIP ViTs such as open_clip's "ViT-B-16-SigLIP").

Why a separate path. A ViT with a class token reads patches as ``proj(ln_post(x_t))`` (docs/losses.md §0).
A MAP tower has no such projection: its pooled embedding is

    pooled = H( sum_t a_t v(x_t) ),     H(y) = head( fc_norm( y' + mlp(norm(y')) ) ),  y' = proj(y)

where x_t are the final tokens after the trunk's ``norm``, a_t the latent query's attention (q from
the learned latent, k from the tokens), v the value half of the head's ``kv`` projection, and ``head``
timm's classifier (Identity in SigLIP) followed by open_clip's adapter head (empty for
``timm_proj: none``; Linear / Mlp otherwise).

Choice. The embedding of patch t is ``H(v(x_t))``: the head's own output if its attention put all of
its weight on patch t (a one-hot a). Every operation after the attention is applied per token
exactly as the head applies it to the pooled vector (value projection, output projection, residual
MLP with its LayerNorm, fc_norm, classifier and open_clip's projection), so patch embeddings live in
the same space as the pooled embedding and the text embeddings it is trained against, and no new
parameters appear. The linear part commutes with pooling (sum_t a_t proj(v(x_t)) = proj(sum_t a_t
v(x_t))); only the residual MLP makes H(sum) differ from sum(H), which is inherent to the head. The
alternatives were worse: raw trunk tokens x_t are not in the joint space at all, and v(x_t) + proj
without the MLP would skip a block the pooled path always applies. Multi-head layout needs no care:
with one-hot attention every head returns v_h(x_t) and the head-concat equals the full ``kv`` value
half. Multiple latents (latent_len > 1) all give the same per-patch vector, so ``pool='token'`` or
``'avg'`` over latents changes nothing.

The pooled output is computed by the very calls ``TimmModel.forward`` makes (``trunk.forward_features``
then ``trunk.forward_head`` then ``visual.head``), so it is bit-identical to ``visual(images)``.
"""

from __future__ import annotations

import torch
from torch import nn


def _map_trunk(visual: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(timm trunk, its AttentionPoolLatent) or a clear error."""
    from timm.layers import AttentionPoolLatent

    trunk = getattr(visual, "trunk", None)
    pool = getattr(trunk, "attn_pool", None)
    if trunk is None or not isinstance(pool, AttentionPoolLatent):
        raise ValueError(
            f"timm_image_dense needs an open_clip TimmModel whose timm trunk pools with a MAP head "
            f"(AttentionPoolLatent, timm_pool='map'); got trunk {type(trunk).__name__} with "
            f"attn_pool {type(pool).__name__}")
    for name in ("forward_features", "forward_head", "fc_norm", "head_drop", "head", "num_prefix_tokens"):
        if not hasattr(trunk, name):
            raise ValueError(f"timm trunk {type(trunk).__name__} has no {name!r}: not a timm VisionTransformer")
    return trunk, pool


def map_head_per_token(pool: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The MAP head applied to each token as if the attention were one-hot on it: [B, T, out]."""
    c = tokens.shape[-1]
    # kv = Linear(C, 2C): columns [0, C) of its output are k, [C, 2C) are v. Called through the module
    # (not F.linear on a slice of its weight) so that ZeRO-3 gathers the partitioned weight; the
    # wasted k half costs ~1% of a ViT-B/16 forward.
    y = pool.kv(tokens)[..., c:]
    y = pool.proj_drop(pool.proj(y))
    if pool.mlp is not None:
        y = y + pool.mlp(pool.norm(y))
    return y


def timm_image_dense(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled [B, D], patches [B, T, D]), both unnormalised, from one trunk pass.

    pooled is bit-identical to ``visual(images)``; patches follow the module docstring's choice.
    """
    trunk, pool = _map_trunk(visual)
    x = trunk.forward_features(images)  # [B, prefix + T, C], after the trunk's final norm
    pooled = visual.head(trunk.forward_head(x))

    npt = int(trunk.num_prefix_tokens)
    patches = x[:, npt:]
    if pool.pos_embed is not None:  # the head adds its own position table to its input tokens
        # its input is x[:, npt:] unless the trunk pools prefix tokens too (then the table covers them)
        pos = pool.pos_embed[npt:] if getattr(trunk, "pool_include_prefix", False) else pool.pos_embed
        patches = patches + pos.unsqueeze(0).to(patches.dtype)
    y = map_head_per_token(pool, patches)
    y = trunk.head(trunk.head_drop(trunk.fc_norm(y)))
    return pooled, visual.head(y)

