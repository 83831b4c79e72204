"""Region and phrase embeddings for the powerset loss (docs/losses.md §2), as pure tensor functions.

Region m of image i pools the patches inside its box: phi_{i,m} = normalise(sum_{t in R_m} z_{i,t}).
Phrase (parse-tree node) k of caption j pools its leaf tokens: p_{j,k} = mean (or sum) of w_{j,l}
over the node's token positions. Phrase embeddings are NOT re-normalised: docs/losses.md §2 defines them as
the plain mean of unit leaf vectors, so a node whose words disagree scores lower than a coherent one.

All computation happens in fp32 (float64 stays float64, for gradcheck) whatever the model precision.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` (s/tau ~ 1e3 magnifies half-precision errors); the meta
    device, on which tools/bench_scale.py counts the work, has no autocast to switch off."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs (s/tau ~ 1e3 overflows half precision), float64 kept as is."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def region_embeddings(patches: torch.Tensor, region_masks: torch.Tensor,
                      region_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """phi [B, M, D] (unit vectors; exactly 0 for padded or empty regions) and validity [B, M] bool.

    patches [B, T, D] normalised patch embeddings; region_masks [B, M, T] bool (patches inside each
    box); region_valid [B, M] bool (None: every slot holding at least one patch is valid). A slot
    marked valid whose mask is empty is treated as padding: it has no embedding to score.
    """
    if patches.dim() != 3 or region_masks.dim() != 3:
        raise ValueError(f"region_embeddings needs patches [B, T, D] and region_masks [B, M, T], got "
                         f"{tuple(patches.shape)} and {tuple(region_masks.shape)}")
    b, t, _ = patches.shape
    if region_masks.shape[0] != b or region_masks.shape[2] != t:
        raise ValueError(f"region_masks {tuple(region_masks.shape)} does not match patches {tuple(patches.shape)}"
                         f" (expected [{b}, M, {t}]: is data.num_regions / the patch grid consistent?)")
    z = patches.to(compute_dtype(patches))
    masks = region_masks.to(device=z.device, dtype=torch.bool)
    nonempty = masks.any(-1)
    valid = nonempty if region_valid is None else region_valid.to(device=z.device, dtype=torch.bool) & nonempty
    pooled = torch.bmm((masks & valid[..., None]).to(z.dtype), z)  # [B, M, D]; padded slots sum to 0
    return F.normalize(pooled, dim=-1), valid


def phrase_embeddings(tokens: torch.Tensor, phrase_tokens: torch.Tensor,
                      phrase_valid: torch.Tensor | None = None, token_valid: torch.Tensor | None = None,
                      pool: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """p [B, K, D] (0 for padded phrases) and validity [B, K] bool.

    tokens [B, L, D] normalised token embeddings; phrase_tokens [B, K, L] bool token positions of each
    node; token_valid [B, L] bool restricts nodes to real word tokens (docs/losses.md §0: never SOT/EOT/pad).
    pool: ``mean`` (the default of docs/losses.md) or ``sum``. A node with no real token left is treated as padding.
    """
    if pool not in ("mean", "sum"):
        raise ValueError(f"loss.powerset.phrase_pool={pool!r} is not one of ('mean', 'sum')")
    if tokens.dim() != 3 or phrase_tokens.dim() != 3:
        raise ValueError(f"phrase_embeddings needs tokens [B, L, D] and phrase_tokens [B, K, L], got "
                         f"{tuple(tokens.shape)} and {tuple(phrase_tokens.shape)}")
    b, seq, _ = tokens.shape
    if phrase_tokens.shape[0] != b or phrase_tokens.shape[2] != seq:
        raise ValueError(f"phrase_tokens {tuple(phrase_tokens.shape)} does not match tokens {tuple(tokens.shape)}")
    w = tokens.to(compute_dtype(tokens))
    nodes = phrase_tokens.to(device=w.device, dtype=torch.bool)
    if token_valid is not None:
        nodes = nodes & token_valid.to(device=w.device, dtype=torch.bool)[:, None, :]
    count = nodes.sum(-1)  # [B, K]
    valid = count > 0
    if phrase_valid is not None:
        valid = valid & phrase_valid.to(device=w.device, dtype=torch.bool)
    pooled = torch.bmm((nodes & valid[..., None]).to(w.dtype), w)  # [B, K, D]
    if pool == "mean":
        pooled = pooled / count.clamp_min(1).to(w.dtype)[..., None]
    return pooled, valid
