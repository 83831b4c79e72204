"""EMA teacher for the DeGLA stage (docs/losses.md §4): θ_T ← α·θ_T + (1−α)·θ_S after every optimiser step.

Why a separate, unwrapped module: under ZeRO-3 the student's parameters are partitioned across ranks
(each ``param.data`` is empty outside a gather), so the teacher cannot share or wrap them. Every rank
keeps its own FULL teacher copy (it must run the teacher forward on its own local batch), and reads
the student's full parameters under ``deepspeed.zero.GatheredParameters`` a bucket at a time, so the
transient memory is one bucket, never the whole model. Under ZeRO 0/1/2 the gather is a no-op.

The EMA blends the optimiser's fp32 MASTER weights, not the half-precision working copy the student
runs with under bf16/fp16 (``_MasterWeights``): blending the rounded copy would add its rounding
noise to the teacher at every step. Under ZeRO 1/2 each rank holds the master fragment of its
partition; the fragments are summed into full values one bucket at a time (one all-reduce per bucket).

The teacher is kept in fp32 (``dtype``) by default: with α = 0.9996 a bf16 teacher rounded to
nearest would lose every (1−α)-sized update. ``dtype=torch.bfloat16`` halves its memory and rounds
each blended value stochastically (unbiased: the updates survive in expectation), from a generator
seeded by the update count, so every rank rounds alike. ``features(batch, dtype)`` runs its forward
under autocast in the run's half dtype, so it costs what the student's forward costs.

All ranks apply the same update to the same values, so teachers stay identical across ranks without
communication beyond the gathers; only rank 0 needs to save ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def _is_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 owns the parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Full values of ``params`` inside the block (read-only); a no-op unless ZeRO-3 partitioned them.

    Parameters ZeRO-3 already holds in full (``ds_status`` AVAILABLE: the small "persistent" ones,
    kept gathered between steps) are read as they are and NOT passed to GatheredParameters: its exit
    would partition them, and ZeRO-3's prefetch trace, which expects them available, then fails on
    a later step ("tracing error ... expected the next parameters ...").
    """
    if params and hasattr(params[0], "ds_id"):
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        todo = [p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE]
        if todo:
            with deepspeed.zero.GatheredParameters(todo, modifier_rank=None):
                yield
            return
    yield


def _buckets(params: list[nn.Parameter], bucket_numel: int) -> Iterator[list[int]]:
    """Indices of consecutive parameters whose total size stays under ``bucket_numel`` (at least one)."""
    bucket: list[int] = []
    size = 0
    for i, p in enumerate(params):
        numel = int(getattr(p, "ds_numel", p.numel()))
        if bucket and size + numel > bucket_numel:
            yield bucket
            bucket, size = [], 0
        bucket.append(i)
        size += numel
    if bucket:
        yield bucket


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 → bf16 rounded up or down with probability proportional to the distance (unbiased):
    random low 16 bits are added to the fp32 bit pattern, which is then truncated."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the 16 bits bf16 drops
    out = rounded.view(torch.float32).to(torch.bfloat16)  # exact: the dropped bits are zero
    return torch.where(torch.isfinite(x), out, x.to(torch.bfloat16))


class _MasterWeights:
    """The fp32 master value of each student parameter, from DeepSpeed's optimiser.

    * fp32 working weights: the parameter is its own master.
    * ZeRO 1/2 and DeepSpeed's bf16 optimiser: ``param._hp_mapping`` points at this rank's fp32
      fragment; ``bucket`` sums the fragments of all ranks into full tensors (one all-reduce).
    * ZeRO 3: ``safe_get_full_fp32_param`` (DeepSpeed gathers each parameter's fp32 partitions).
    * FP16_Optimizer / FP16_UnfusedOptimizer (ZeRO 0, fp16 or bf16 with a client optimiser): one
      flat fp32 copy per parameter group in the group's order / one fp32 copy per parameter.
    """

    def __init__(self, optimizer) -> None:
        self.has_optimizer = optimizer is not None  # before deepspeed.initialize: no masters yet
        self.fp16_views: dict[int, torch.Tensor] = {}
        half_groups = getattr(optimizer, "fp16_groups", None) or []
        for params, flat in zip(half_groups, getattr(optimizer, "fp32_groups_flat", None) or []):
            offset = 0  # FP16_Optimizer: one flat fp32 copy per group
            for p in params:
                self.fp16_views[id(p)] = flat.detach().narrow(0, offset, p.numel()).view(p.shape)
                offset += p.numel()
        for params, masters in zip(half_groups, getattr(optimizer, "fp32_groups", None) or []):
            for p, m in zip(params, masters):  # FP16_UnfusedOptimizer: one fp32 copy per parameter
                self.fp16_views[id(p)] = m.detach()

    def bucket(self, params: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """Full fp32 masters of ``params`` (a collective when any is fragmented), or None when every
        one is fp32 already or there is no optimiser yet (then the gathered parameters are read)."""
        if not self.has_optimizer or all(p.dtype == torch.float32 for p in params):
            return None
        if any(hasattr(p, "ds_id") for p in params):
            from deepspeed.utils import safe_get_full_fp32_param

            out = []
            for p in params:
                if p.requires_grad:
                    out.append(safe_get_full_fp32_param(p).view(p.ds_shape))
                else:  # frozen: no master; its working value, gathered
                    with _gathered([p]):
                        out.append(p.detach().float().clone())
            return out
        if any(hasattr(p, "_hp_mapping") for p in params):
            from powerclip import distributed as pdist

            numels = [p.numel() for p in params]
            flat = torch.zeros(sum(numels), dtype=torch.float32, device=params[0].device)
            offset = 0
            for p, n in zip(params, numels):
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None:  # this rank's fragment (None: another rank holds all of it)
                    addr = mapping.lp_fragment_address
                    flat.narrow(0, offset + addr.start, addr.numel).copy_(mapping.get_hp_fragment())
                elif not hasattr(p, "_hp_mapping") and pdist.rank() == 0:  # frozen: no master; once
                    flat.narrow(0, offset, n).copy_(p.detach().flatten())
                offset += n
            flat = pdist.all_reduce_sum(flat)
            return [t.view(p.shape) for t, p in zip(flat.split(numels), params)]
        return [self.fp16_views[id(p)] if id(p) in self.fp16_views else p.detach().float() for p in params]


def _unwrap(student: nn.Module) -> nn.Module:
    """A DeepSpeed engine wraps the model in ``.module``; the teacher mirrors the model itself."""
    return getattr(student, "module", student) if hasattr(student, "optimizer") else student


class EmaTeacher:
    """An EMA copy of a student model, updated in place, never trained by gradients.

    Build it from the student's STARTING weights (after loading the pretrained checkpoint, before or
    after ``deepspeed.initialize``): ``EmaTeacher(model, decay)`` deep-copies an unpartitioned model;
    for a ZeRO-3 partitioned one pass ``template`` (a fresh module of the same architecture), whose
    values are then overwritten by the gathered student weights.
    """

    def __init__(self, student: nn.Module, decay: float, template: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32, bucket_numel: int = 50_000_000) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        student = _unwrap(student)
        self.decay = float(decay)
        self.bucket_numel = int(bucket_numel)
        self.num_updates = 0
        self.dtype = dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"EMA teacher dtype must be float32 or bfloat16, got {dtype}")
        if template is None:
            if _is_partitioned(student):
                raise ValueError("the student is ZeRO-3 partitioned: pass template= (a fresh module of "
                                 "the same architecture) to build the EMA teacher")
            template = copy.deepcopy(student)
        self.module = template
        self.module.to(dtype=dtype)
        self.module.requires_grad_(False)
        self.module.eval()
        device = next((p.device for p in student.parameters()), None)
        if device is not None:  # a partitioned parameter still reports its rank's device
            self.module.to(device)
        self._check_names(student)
        self.copy_from(student)

    # ------------------------------------------------------------------------------ internals
    def _check_names(self, student: nn.Module) -> None:
        s_names = [n for n, _ in student.named_parameters()]
        t_names = [n for n, _ in self.module.named_parameters()]
        if s_names != t_names:
            missing = sorted(set(s_names) ^ set(t_names))[:5]
            raise ValueError(f"teacher and student parameters differ (e.g. {missing})")

    def _pairs(self, student: nn.Module) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
        return list(student.parameters()), [p for p in self.module.parameters()]

    @torch.no_grad()
    def _blend(self, student: nn.Module, alpha: float, optimizer=None) -> None:
        """θ_T ← alpha·θ_T + (1−alpha)·θ_S, bucket by bucket, θ_S the fp32 masters of ``optimizer``
        (the working weights without one); buffers are copied as they are."""
        s_params, t_params = self._pairs(student)
        masters = _MasterWeights(optimizer)
        gen = None
        if self.dtype == torch.bfloat16:
            device = t_params[0].device if t_params else torch.device("cpu")
            gen = torch.Generator(device=device).manual_seed(1_000_003 * (self.num_updates + 1))
        for idx in _buckets(s_params, self.bucket_numel):
            group = [s_params[i] for i in idx]
            full = masters.bucket(group)  # None: the (gathered) parameters are the fp32 values
            with _gathered(group) if full is None else contextlib.nullcontext():
                for j, i in enumerate(idx):
                    src = (s_params[i].detach() if full is None else full[j]).to(t_params[i].device)
                    if src.shape != t_params[i].shape:
                        raise RuntimeError(f"student parameter {i} has shape {tuple(src.shape)} but the "
                                           f"teacher's is {tuple(t_params[i].shape)}")
                    if alpha == 1.0:
                        continue
                    new = src.float() if alpha == 0.0 else t_params[i].float().mul_(alpha).add_(src.float(),
                                                                                              alpha=1.0 - alpha)
                    t_params[i].copy_(new if gen is None else stochastic_round_bf16(new, gen))
        for t_buf, s_buf in zip(self.module.buffers(), student.buffers()):
            t_buf.copy_(s_buf.detach().to(device=t_buf.device, dtype=t_buf.dtype))

    # --------------------------------------------------------------------------------- public
    def copy_from(self, student: nn.Module) -> None:
        """Set the teacher to the student's current weights (initialisation)."""
        self._blend(_unwrap(student), 0.0, getattr(student, "optimizer", None))

    def update(self, student: nn.Module) -> None:
        """One EMA step; call after every optimiser step that was applied (not after skipped ones).

        Collective under ZeRO-3 (every rank must call it), a no-op on the values when decay == 1.
        """
        self._blend(_unwrap(student), self.decay, getattr(student, "optimizer", None))
        self.num_updates += 1

    @torch.no_grad()
    def features(self, batch, dtype: torch.dtype | None = None, **kwargs):
        """The teacher's forward on ``batch`` (a ``Batch``), without gradient.

        The teacher's weights are fp32; with a half-precision run (``dtype`` fp16/bf16, the images
        already cast to it) the inputs go back to fp32 and the forward runs under autocast in
        ``dtype``, so the teacher costs what the student costs and never hits a dtype mismatch.
        """
        device = next(self.module.parameters()).device
        batch = batch.to(device, torch.float32)
        if self.dtype == torch.bfloat16:  # a bf16 teacher always runs under bf16 autocast
            dtype = torch.bfloat16
        if dtype is None or dtype == torch.float32:
            return self.module(batch, **kwargs)
        with torch.autocast(device_type=device.type, dtype=dtype):
            return self.module(batch, **kwargs)

    def state_dict(self) -> dict:
        """Tensors and primitives only (checkpoint rule): teacher weights, decay, update count."""
        return {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"], strict=True)
        self.num_updates = int(state["num_updates"])
        if float(state["decay"]) != self.decay:
            # a changed decay is allowed (config edit on resume) but never silent
            import logging

            logging.getLogger(__name__).warning("EMA decay changed on resume: %s -> %s",
                                                state["decay"], self.decay)

    def save(self, path: str | Path) -> Path:
        """Write ``state_dict()`` atomically (tmp file + rename) so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
