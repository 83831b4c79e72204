"""Every collective the package runs, written once.

Why one module: NCCL accepts only CUDA tensors, gloo is happiest with CPU ones, and a collective
whose ranks disagree about shapes hangs (NCCL) instead of raising. Each helper here therefore

* moves its tensor to the device the process group's backend works on (``comm_device``),
* returns the result on the caller's device, so callers never care which backend runs,
* where shapes can differ between ranks, checks them with one small collective first and raises
  an error that names every rank's shape.

With no process group (or world size 1) every helper is the identity, so world size 1 and world
size W run the same code. ``tests/test_distributed.py`` scans the package and fails if any other
module calls a ``torch.distributed`` collective directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

T = TypeVar("T")


class CollectiveMismatch(RuntimeError):
    """Ranks passed incompatible shapes to a collective (the message names each rank's shape)."""


# ----------------------------------------------------------------------------------- group info
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    return is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def backend() -> str | None:
    """The process group's backend name ("nccl", "gloo", ...), None without a group."""
    return str(dist.get_backend()) if is_initialized() else None


def device_for_backend(name: str, cuda_index: int | None = None) -> torch.device:
    """The device a backend's collectives must see their tensors on.

    ``nccl`` moves only CUDA tensors (``cuda_index``, default the current CUDA device); ``gloo``,
    ``mpi`` and ``ucc`` work on CPU tensors here. A combined backend such as
    ``"cpu:gloo,cuda:nccl"`` serves CPU tensors through its CPU part. Unknown names raise rather
    than guess, since a wrong guess is a crash (or a hang) on the first collective.
    """
    name = name.lower()
    if "cpu:" in name or name in ("gloo", "mpi", "ucc"):
        return torch.device("cpu")
    if name == "nccl" or name.startswith("cuda:"):
        if cuda_index is None:
            cuda_index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", cuda_index)
    raise ValueError(f"no known device for process-group backend {name!r} (expected nccl, gloo, mpi or ucc)")


def comm_device() -> torch.device:
    """The device this process's collectives run on (CPU without a process group)."""
    name = backend()
    return torch.device("cpu") if name is None else device_for_backend(name)


def _to_comm(x: torch.Tensor) -> torch.Tensor:
    return x.to(comm_device()).contiguous()


# ----------------------------------------------------------------------------- size checking
def gather_ints(values: Sequence[int]) -> list[list[int]]:
    """Every rank's short vector of integers (sizes, shapes), in rank order: one small all-gather.

    All ranks must pass the same number of values; the collective runs on ``comm_device()``.
    """
    local = [int(v) for v in values]
    if not is_distributed():
        return [local]
    t = torch.tensor(local, dtype=torch.long, device=comm_device())
    out = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(out, t)
    return torch.stack(out).cpu().tolist()


def require_equal(what: str, per_rank: Sequence[Any]) -> None:
    """Raise ``CollectiveMismatch`` naming every rank's value unless all ranks agree."""
    if any(v != per_rank[0] for v in per_rank):
        listing = ", ".join(f"rank {r}: {v}" for r, v in enumerate(per_rank))
        raise CollectiveMismatch(f"{what}: ranks disagree ({listing}); every rank must pass the same shape")


def check_same_shape(x: torch.Tensor, what: str) -> None:
    """One small collective: every rank's shape of ``x`` must match (raises naming them)."""
    if not is_distributed():
        return
    if x.dim() > 8:
        raise ValueError(f"{what}: shape checks support up to 8 dimensions, got {tuple(x.shape)}")
    shapes = gather_ints([x.dim(), *x.shape, *[0] * (8 - x.dim())])  # fixed length: ranks may differ in dim
    require_equal(what, [tuple(s[1:1 + s[0]]) for s in shapes])


# ------------------------------------------------------------------------------------ gathers
def gather_with_grad(x: torch.Tensor, check: str | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to every rank's chunk.

    This is open_clip's ``gather_with_grad`` semantics: the backward of the all-gather sums the
    gradient contributions of all ranks into each rank's own chunk, so a loss computed from local
    rows against gathered columns gives the same parameter gradients as the single-process loss.
    All ranks must pass the same shape (use ``gather_variable`` otherwise). The check costs a host
    sync, so it runs only when ``check`` names what is gathered (for the error message); the
    per-step losses leave it off because the loader gives every rank the same batch size.
    """
    if not is_distributed():
        return x
    if check is not None:
        check_same_shape(x, check)
    chunks = dist_nn.all_gather(_to_comm(x))
    return torch.cat(chunks, dim=0).to(x.device)


def all_gather_equal(x: torch.Tensor, what: str | None = None) -> list[torch.Tensor]:
    """Every rank's ``x`` (no gradient), in rank order, on the caller's device.

    With ``what`` set the shapes are checked first (one small collective) so a mismatch raises
    instead of hanging.
    """
    if not is_distributed():
        return [x]
    if what is not None:
        check_same_shape(x, what)
    local = _to_comm(x)
    out = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [t.to(x.device) for t in out]


def gather_variable(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, list[int]]:
    """All-gather tensors whose dim 0 differs between ranks; returns (concatenation, sizes).

    Pads every chunk to the largest size, gathers (with gradient when ``with_grad``), and strips the
    padding, so rank r's rows sit at ``offsets[r] : offsets[r] + sizes[r]`` of the result. The
    trailing dimensions must agree: they are checked in the same small collective as the sizes.
    """
    if not is_distributed():
        return x, [int(x.shape[0])]
    shapes = gather_ints([x.dim(), *x.shape, *[0] * (8 - x.dim())])
    require_equal("gather_variable trailing dimensions", [tuple(s[2:1 + s[0]]) for s in shapes])
    sizes = [s[1] for s in shapes]
    pad = max(sizes) - x.shape[0]
    padded = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], dim=0) if pad else x
    if with_grad and padded.requires_grad:
        chunks = [c.to(x.device) for c in dist_nn.all_gather(_to_comm(padded))]
    else:
        chunks = all_gather_equal(padded)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0), sizes


def rank_offset(sizes: list[int]) -> int:
    """Exclusive cumulative sum of ``sizes`` up to this rank: where this rank's rows start."""
    return sum(sizes[: rank()])


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (small state: counters, data cursors)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------- reductions
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum without gradient (counters, flags); a new tensor on the caller's device."""
    if not is_distributed():
        return x
    t = _to_comm(x.detach()).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(x.device)


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``x`` on every rank (a new tensor on the caller's device)."""
    if not is_distributed():
        return x
    t = _to_comm(x.detach()).clone()
    dist.broadcast(t, src=src)
    return t.to(x.device)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (after a final barrier so no rank tears down a peer's collective)."""
    if is_initialized():
        barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- node-local order
def local_zero_first(fn: Callable[[], T], local_rank: int, what: str) -> T:
    """Run ``fn`` on each node's local rank 0 first, then on the other ranks of the node.

    Why: loading starting weights on every rank at once multiplies downloads and file-system reads
    by the ranks per node, and a rank that fails alone leaves the others waiting in the next
    collective until the process-group timeout. Here local rank 0 fills the caches (open_clip
    downloads, the page cache) before the others read, and a failure anywhere is shared with one
    small all-reduce after each phase, so every rank raises at once: the failing rank with its own
    error, the others with ``what`` and the failing ranks' numbers.
    """
    result: T | None = None
    for phase in (0, 1):
        error: BaseException | None = None
        if (local_rank == 0) == (phase == 0):
            try:
                result = fn()
            except Exception as e:  # shared with the other ranks below, then re-raised
                error = e
        failed = all_gather_equal(torch.tensor([int(error is not None)]))
        bad = [r for r, f in enumerate(failed) if int(f.item())]
        if error is not None:
            raise error
        if bad:
            raise RuntimeError(f"{what}: failed on rank(s) {bad} (local rank {'0' if phase == 0 else '> 0'}); "
                               "their log has the error")
    return result  # type: ignore[return-value]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """[W, *x.shape]: every rank's ``x`` in rank order, without gradient, on ``x``'s device.

    One collective for a whole vector of per-rank values: sums, maxima and rank 0's entries are read
    from the result afterwards, so reductions with different operators share one round trip.
    """
    return torch.stack(all_gather_equal(x), dim=0)


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
    padded = padded.to(comm_device()).contiguous()
    if with_grad and padded.requires_grad:
        chunks = dist_nn.all_gather(padded)
    else:
        chunks = [torch.zeros_like(padded) for _ in range(world_size())]
        dist.all_gather(chunks, padded)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0).to(x.device)


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
    send = x.to(comm_device()).contiguous()
    return dist_nn.all_to_all_single(torch.empty_like(send), send).to(x.device)
