"""The one typed batch every consumer (model, losses, eval) reads.

Shapes (B local images, L context length, M regions, K phrase nodes, T = grid*grid patches,
C concept rows, N negatives per sample):

=================  =====================  =======================================================
field              shape / dtype           meaning
=================  =====================  =======================================================
keys               list[str] (B)           webdataset ``__key__`` of each sample (resume tests)
images             [B, 3, H, W] uint8/fp   transformed images: uint8 pixels from the loader,
                                          normalised floats after ``data.device.to_device``
text               [B, L] long             caption tokens (open_clip layout: SOT ... EOT, 0-pad)
token_valid        [B, L] bool             real word tokens: not SOT, EOT or padding (METHODS 0)
phrase_tokens      [B, K, L] bool          token positions of each parse-tree node (+ root)
phrase_valid       [B, K] bool             real phrase slots (K is padded to the batch max)
region_masks       [B, M, T] bool          patches inside each region box
region_valid       [B, M] bool             real region slots
concept_text       [C, L] long             concept noun phrases, tokenised as short texts
concept_owner      [C] long                index of the owning image in this local batch
concept_ids        [C] long                hash of the normalised concept text (false-negative rule)
neg_text           [B, N, L] long          hard-negative captions (N = data.num_negatives)
neg_valid          [B, N] bool             real negatives (samples may have fewer than N)
=================  =====================  =======================================================

Fields a run does not need are ``None``. ``phrase_tokens`` rows always include the root node
(the whole caption), so every valid caption has K >= 1.

As filled by ``powerclip.data.build_loader``: phrase row 0 is the root; ``region_valid`` is all
True (stored boxes are filled up with random ones to M); ``concept_*`` are set when
``data.concepts`` is on, ``neg_*`` when ``data.num_negatives > 0``; ``meta[i]`` holds
``caption``, ``label`` (zero-shot class index or None), ``eval_negatives`` and ``url`` (the shard).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Batch:
    keys: list[str]
    images: torch.Tensor
    text: torch.Tensor
    token_valid: torch.Tensor | None = None
    phrase_tokens: torch.Tensor | None = None
    phrase_valid: torch.Tensor | None = None
    region_masks: torch.Tensor | None = None
    region_valid: torch.Tensor | None = None
    concept_text: torch.Tensor | None = None
    concept_owner: torch.Tensor | None = None
    concept_ids: torch.Tensor | None = None
    neg_text: torch.Tensor | None = None
    neg_valid: torch.Tensor | None = None
    # free-form per-sample metadata for evaluation and debugging (never used by losses)
    meta: list[dict] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def pin_memory(self) -> Batch:
        """Every tensor in page-locked host memory (numpy fields become tensors first), so that
        ``to(device)`` copies asynchronously. DataLoader's pin-memory thread calls this."""
        import numpy as np

        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(v)
            out[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return Batch(**out)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device``; ``dtype`` applies to the floating image tensor only."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            out[f.name] = v
        return Batch(**out)
