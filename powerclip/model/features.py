"""What the model hands to the losses: global and dense embeddings, all L2-normalised."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Features:
    """Model outputs for one local batch (shapes as in ``powerclip.data.batch``).

    image       [B, D]      global image embeddings (exactly open_clip's encode_image, normalised)
    text        [B, D]      global caption embeddings (exactly open_clip's encode_text, normalised)
    logit_scale []          exp(clamped log scale), the multiplier applied to cosine similarities
    logit_bias  [] | None   SigLIP bias
    patches     [B, T, D] | None   dense patch embeddings proj(ln_post(x_t)), normalised (docs/losses.md §0)
    tokens      [B, L, D] | None   dense token embeddings ln_final -> text_projection, normalised;
                                  only positions where batch.token_valid is True are meaningful
    concepts    [C, D] | None      concept rows encoded as short texts
    negatives   [B, N, D] | None   hard-negative caption embeddings
    """

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    concepts: torch.Tensor | None = None
    negatives: torch.Tensor | None = None
