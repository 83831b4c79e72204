"""Collectives the losses need, written once.

Every loss sees the global batch through these helpers, so world size 1 and world size W run the
same code: with no process group (or W = 1) each helper is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to every rank's chunk.

    This is open_clip's ``gather_with_grad`` semantics: the backward of the all-gather sums the
    gradient contributions of all ranks into each rank's own chunk, so a loss computed from local
    rows against gathered columns gives the same parameter gradients as the single-process loss.
    All ranks must pass the same shape (use ``gather_variable`` otherwise).
    """
    if not is_distributed():
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's count of something (images, concept rows), in rank order."""
    if not is_distributed():
        return [n]
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return [int(v.item()) for v in out]


def gather_variable(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, list[int]]:
    """All-gather tensors whose dim 0 differs between ranks; returns (concatenation, sizes).

    Pads every chunk to the largest size, gathers (with gradient when ``with_grad``), and strips the
    padding, so rank r's rows sit at ``offsets[r] : offsets[r] + sizes[r]`` of the result.
    """
    if not is_distributed():
        return x, [int(x.shape[0])]
    sizes = gather_sizes(int(x.shape[0]), x.device)
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0) if pad else x
    if with_grad and padded.requires_grad:
        chunks = dist_nn.all_gather(padded.contiguous())
    else:
        chunks = [torch.zeros_like(padded) for _ in range(world_size())]
        dist.all_gather(chunks, padded.contiguous())
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0), sizes


def rank_offset(sizes: list[int]) -> int:
    """Exclusive cumulative sum of ``sizes`` up to this rank: where this rank's rows start."""
    return sum(sizes[: rank()])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum without gradient (counters, flags)."""
    if is_distributed():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_known_sizes(x: torch.Tensor, sizes: list[int], with_grad: bool = True) -> torch.Tensor:
    """All-gather rows whose per-rank counts ``sizes`` every rank already knows (no size exchange).

    A negative pool drawn identically on every rank tells each rank how many rows every other rank
    contributes, so unlike ``gather_variable`` this needs one collective and no host sync. Pads to
    max(sizes) because all_gather needs equal shapes (a mismatch hangs under NCCL), then strips.
    The tensor crosses on the backend's device (NCCL: CUDA only) and comes back on the caller's.
    """
    if not is_distributed():
        return x
    if x.shape[0] != sizes[rank()]:
        raise ValueError(f"rank {rank()} passes {x.shape[0]} rows but the agreed count is {sizes[rank()]}")
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0) if pad else x
    padded = padded.to(_backend_device()).contiguous()
    if with_grad and padded.requires_grad:
        chunks = dist_nn.all_gather(padded)
    else:
        chunks = [torch.zeros_like(padded) for _ in range(world_size())]
        dist.all_gather(chunks, padded)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0).to(x.device)


def _backend_device() -> torch.device:
    """Where this group's collectives need their tensors: CUDA for NCCL, CPU otherwise."""
    if str(dist.get_backend()).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_to_all_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rank r sends chunk s of ``x`` (dim 0 split in W equal chunks) to rank s and receives chunk r of
    every rank, concatenated in rank order; differentiable (the backward sends the gradients back).

    Lets a loss compute each (row, column) block once on one rank and hand the other rank the block
    it needs instead of recomputing it there.
    """
    if not is_distributed():
        return x
    if x.shape[0] % world_size():
        raise ValueError(f"all_to_all_with_grad: dim 0 ({x.shape[0]}) is not a multiple of the world size")
    send = x.to(_backend_device()).contiguous()
    return dist_nn.all_to_all_single(torch.empty_like(send), send).to(x.device)
