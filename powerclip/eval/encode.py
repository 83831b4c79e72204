"""Batched, rank-sharded feature extraction shared by every evaluation.

Each rank encodes one contiguous chunk of the items and the chunks are all-gathered, so W ranks do
1/W of the work each and every rank ends with the features of all items in the original order.
Every rank runs the SAME number of forward calls (short chunks are padded with a repeat of a valid
item and the padding is dropped after the gather): ZeRO-3 gathers parameters inside forward and
hangs when ranks disagree on the number of calls. With no process group this is plain batching.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from powerclip import distributed as pdist
from powerclip.progress import progress_bar


class _Indexed(Dataset):
    """A view of ``base`` at the given indices (padding repeats allowed)."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[self.indices[i]]


def shard_indices(n: int, world: int, rank: int) -> tuple[list[int], int]:
    """This rank's contiguous chunk of ``range(n)`` padded to ``ceil(n / world)``; (indices, per_rank)."""
    per = math.ceil(n / world) if n else 0
    own = list(range(rank * per, min(n, (rank + 1) * per)))
    pad_with = own[-1] if own else 0
    return own + [pad_with] * (per - len(own)), per


def _gather_ordered(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's equal-sized chunk in rank order and drop the padding rows."""
    if not pdist.is_distributed():
        return local[:n]
    chunks = pdist.all_gather_equal(local, what="evaluation features")
    return torch.cat(chunks, dim=0)[:n]


def eval_autocast(device: torch.device, amp: bool):
    """Autocast for ``--amp`` evaluation: bf16 on CPU (the only half type CPU kernels cover well), fp16
    on GPU (what clip_benchmark's ``--amp`` uses, so numbers compare with its)."""
    if not amp:
        return nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """Images go in at the weights' dtype (a bf16 DeepSpeed module rejects fp32 inputs)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def encode_images(model: torch.nn.Module, dataset: Dataset, batch_size: int = 64, workers: int = 0,
                  amp: bool = False, collate: Callable | None = None, progress: str | None = None) -> torch.Tensor:
    """L2-normalised ``encode_image`` features [len(dataset), D] of a map-style dataset of image tensors.

    ``dataset[i]`` returns a preprocessed image tensor [3, H, W]. Decoding runs in ``workers``
    DataLoader processes; the rows come back in dataset order on every rank. ``progress``: a label
    for a progress bar over this rank's images (rank 0 shows it), or None for none.
    """
    n = len(dataset)
    indices, per = shard_indices(n, pdist.world_size(), pdist.rank())
    device, dtype = model_device(model), model_dtype(model)
    out: list[torch.Tensor] = []
    if per:
        loader = DataLoader(_Indexed(dataset, indices), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=collate)
        with progress_bar(per, progress or "", unit="img", enabled=bool(progress) and pdist.rank() == 0) as bar:
            for images in loader:
                with eval_autocast(device, amp):
                    feats = model.encode_image(images.to(device, dtype))
                out.append(F.normalize(feats.float(), dim=-1))
                bar.update(len(images))
    local = torch.cat(out) if out else _empty_features(model, device)
    return _gather_ordered(local, n).cpu()


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], texts: Sequence[str],
                 batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """L2-normalised ``encode_text`` features [len(texts), D], sharded over ranks like images."""
    n = len(texts)
    indices, per = shard_indices(n, pdist.world_size(), pdist.rank())
    device = model_device(model)
    out: list[torch.Tensor] = []
    for start in range(0, per, batch_size):
        chunk = [texts[i] for i in indices[start:start + batch_size]]
        with eval_autocast(device, amp):
            feats = model.encode_text(tokenizer(chunk).to(device))
        out.append(F.normalize(feats.float(), dim=-1))
    local = torch.cat(out) if out else _empty_features(model, device)
    return _gather_ordered(local, n).cpu()


def _empty_features(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    dim = _embed_dim(model)
    return torch.zeros(0, dim, device=device)


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    visual = getattr(model, "visual", None)
    return int(getattr(visual, "output_dim", 0))
