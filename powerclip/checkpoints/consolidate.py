"""The full fp32 weights of a DeepSpeed checkpoint of any ZeRO stage, read without running code.

ZeRO stage 1/2/3 checkpoints are consolidated with DeepSpeed's own ``zero_to_fp32`` merge
(``safe_load.consolidate_zero``); stage 0 stores the full module state. Either way every file is
read with ``weights_only=True`` and, when the checkpoint is sealed, verified against its checksums
first, so a damaged or foreign checkpoint is refused with the file named rather than half-read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from powerclip.checkpoints import integrity
from powerclip.checkpoints.discovery import CheckpointError, resolve_checkpoint
from powerclip.checkpoints.layout import is_tag_dir
from powerclip.checkpoints.safe_load import CheckpointReadError, consolidate_zero, safe_load

log = logging.getLogger(__name__)


def consolidate_checkpoint(path: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the trained module, from a checkpoint of any ZeRO stage.

    ``path``: a run folder, a checkpoint root or one tag folder (``discovery.resolve_checkpoint``)."""
    ref = resolve_checkpoint(path, tag)
    if not is_tag_dir(ref.dir):
        raise CheckpointError(f"{ref.dir}: no *model_states.pt files, not a DeepSpeed checkpoint")
    if (ref.dir / integrity.MANIFEST).is_file():
        try:
            integrity.verify(ref.dir)
        except integrity.CheckpointIntegrityError as e:
            raise CheckpointError(str(e)) from None
    else:
        log.warning("%s has no %s: its files cannot be verified", ref.dir, integrity.MANIFEST)
    try:
        if any(ref.dir.glob("*zero_pp_rank_*optim_states.pt")):
            return consolidate_zero(ref.dir)
        # ZeRO stage 0: one rank's module state holds every parameter (in the training dtype)
        files = sorted(ref.dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{ref.dir}: no mp_rank_*_model_states.pt")
        state = safe_load(files[0])
    except CheckpointReadError as e:
        raise CheckpointError(str(e)) from None
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{files[0]}: no 'module' state dict")
    return _stage0_fp32(module, state.get("optimizer"))


def _stage0_fp32(module: dict[str, torch.Tensor], optimizer: Any) -> dict[str, torch.Tensor]:
    """Stage-0 weights in fp32: the fp32 master copies when the run was bf16/fp16.

    DeepSpeed's stage-0 mixed-precision optimizers save ``fp32_groups`` (lists of master tensors in
    param-group order) without names. Each group is a subsequence of the module's parameter order,
    and each master rounds to the saved low-precision weight, so a left-to-right match on shape and
    rounded value names them. If that fails, the saved module weights are used (with a warning).
    """
    out = {k: (v.float() if v.is_floating_point() else v) for k, v in module.items()}
    groups = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    low = {k: v for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32}
    if not groups or not low:
        return out
    names = list(low)
    used: set[str] = set()
    masters: dict[str, torch.Tensor] = {}
    for group in groups:
        if not isinstance(group, (list, tuple)):
            log.warning("stage-0 fp32 master groups are flat; exporting the %s module weights",
                        next(iter(low.values())).dtype)
            return out
        start = 0
        for t in group:
            for i in range(start, len(names)):
                n = names[i]
                if n not in used and low[n].shape == t.shape and torch.equal(t.to(low[n].dtype), low[n]):
                    masters[n], start = t.float(), i + 1
                    used.add(n)
                    break
            else:
                log.warning("could not name the stage-0 fp32 master weights; exporting the %s module weights",
                            next(iter(low.values())).dtype)
                return out
    out.update(masters)
    return out
