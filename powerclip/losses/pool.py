"""Negative pools for the method terms: which columns of the global batch a local row is scored against.

The global contrastive loss scores B local rows against all G = W·B gathered columns, which costs
O(B·G·D) per rank: negligible at D = 512. The method terms (powerset: M·K pairs per (image, caption);
XAC: T patches per (image, concept)) cost hundreds of times more per pair, so against ALL G columns
their per-rank cost grows linearly with the number of GPUs. A pool bounds it by configuration:

``all``       every column of the global batch (docs/losses.md's formula; per-rank cost grows with W).
``local``     only this rank's own B columns (per-rank cost fixed; the negatives depend on W).
``sample:N``  N pair indices drawn uniformly without replacement from the G of the global batch, the
              same draw on every rank (seeded from the optimiser step), plus each row's own positive.
              Row i is scored against S ∪ {i}; its negatives are S \\ {i}. Per-rank cost B·(N + B)
              pairs whatever W, and the loss of the global batch does not depend on how it is split
              over ranks (same G, same step -> same S -> same value and gradient at W = 1 and W = 2).
              With N >= G it IS ``all`` (the same code path and the same numbers).

Why the draw is over pair indices of the global batch rather than N/W rows per rank: a per-rank
quota would make the pool depend on W (and could not be checked against a single process); a shared
draw costs one ``randperm(G)`` on the host per step, and every rank derives every rank's share from
it, so no extra collective exchanges sizes.

The step comes from ``set_step`` (the trainer calls it once per optimiser step, before the A
accumulation passes, so all passes of one step see the same pool).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_STEP = 0
_SEED = 0x5EED_9001  # fixed: the pool must be reproducible from the step alone (resume, W changes)


def set_step(step: int) -> None:
    """Make ``step`` the seed of every sampled pool until the next call (see module docstring)."""
    global _STEP
    _STEP = int(step)


@dataclass(frozen=True)
class PoolSpec:
    kind: str  # all | local | sample
    size: int = 0  # N for sample

    def covers(self, total: int) -> bool:
        """Whether this pool holds every one of ``total`` global columns (-> the exact formula of docs/losses.md)."""
        return self.kind == "all" or (self.kind == "sample" and self.size >= total)


def parse_pool(spec: str, key: str) -> PoolSpec:
    """``all`` | ``local`` | ``sample:N`` (N >= 1); errors name the config key."""
    s = str(spec).strip().lower()
    if s in ("all", "local"):
        return PoolSpec(s)
    if s.startswith("sample:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return PoolSpec("sample", n)
    raise ValueError(f"{key}={spec!r} is not one of 'all', 'local', 'sample:N' (N a positive integer)")


def sample_members(total: int, size: int, salt: int = 0, step: int | None = None) -> torch.Tensor:
    """Sorted global indices [min(size, total)] drawn without replacement, identical on every rank.

    Drawn on the host with its own generator (the global RNG differs between ranks) and seeded from
    (step, salt) so a resumed run or a run on another world size draws the same pool at a step.
    """
    step = _STEP if step is None else step
    if size >= total:
        return torch.arange(total)
    gen = torch.Generator().manual_seed((_SEED * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
    return torch.randperm(total, generator=gen)[:size].sort().values


def members_per_rank(members: torch.Tensor, offsets: list[int], sizes: list[int]) -> tuple[list[int], torch.Tensor]:
    """How many members each rank owns (rank r owns [offsets[r], offsets[r] + sizes[r])) and a [P]
    tensor of each member's owning rank (members sorted, so they come out grouped by rank)."""
    bounds = torch.tensor([o + s for o, s in zip(offsets, sizes)])
    owner_rank = torch.bucketize(members, bounds, right=True)
    counts = torch.bincount(owner_rank, minlength=len(sizes)).tolist()
    return counts, owner_rank


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host-drawn index tensor to ``device`` without stalling the host on the GPU queue: a copy
    from pageable memory waits for the stream, one from pinned memory with non_blocking does not."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
