"""The one host synchronisation of a training step: every per-rank value the loop needs, in one
small collective and one device-to-host transfer.

Why: on a GPU every ``.item()`` / ``.tolist()`` / ``float(tensor)`` stalls the CPU until the GPU
has caught up, and every collective is a round trip over the network. The loop needs, per step,
the non-finite flag (all ranks must skip the same step, before any backward), the loss and its
terms, and (for logging) per-rank perf values and skip counters. They are packed into one fp64
vector per rank, all-gathered once (``distributed.gather_rows``), reduced on the device into sums,
maxima and rank 0's row, and read back with a single ``.tolist()``.

The host-side values (data wait, peak memory, the gradient norm, skip counters) are those of the
PREVIOUS step: the flag must be decided before this step's backward, when its own timing and
gradient norm do not exist yet. Rank 0's clock decides whether a timed checkpoint is due, carried
in the same vector instead of a broadcast of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from powerclip import distributed as pdist

log = logging.getLogger(__name__)

# skip reasons of the data pipeline, in a fixed order so every rank packs the same vector;
# a reason not listed here is counted as "other" (and named in a warning by the rank that saw it)
SKIP_REASONS = ("unreadable_shard", "truncated_tar", "empty_shard", "missing_json", "bad_json",
                "unsupported_schema", "bad_annotation", "bad_caption", "empty_caption", "missing_image",
                "bad_image", "missing_regions", "bad_regions", "duplicate_key", "other")
# annotation entries dropped from samples that are kept (the loader's ``field_*`` counters): reported
# as data/dropped_*, not counted as skipped samples
DROPPED_FIELDS = ("field_phrase_span", "field_phrase_over_max", "field_concept_empty", "field_concept_over_max",
                  "field_negative_empty", "field_negative_over_max", "field_box_outside_crop",
                  "field_box_over_max", "field_njson_unreadable", "field_njson_phrase_unplaced")
# other counters of the data pipeline that are not skipped samples (logged as data/NAME)
EVENT_COUNTERS = ("regions_dropped", "phrases_caption_only")
COUNTED = SKIP_REASONS + DROPPED_FIELDS + EVENT_COUNTERS  # the packed order
_warned_reasons: set[str] = set()


@dataclass
class HostStats:
    """What the host measured on this rank during the previous step (``grad_norm`` may be a device
    tensor: it is packed, not read)."""

    data_wait_frac: float = 0.0
    peak_mem_mb: float = 0.0
    step_time_s: float = 0.0
    grad_norm: torch.Tensor | float | None = None
    counters: dict[str, int] = field(default_factory=dict)
    valid: bool = False  # False on the first step of a run: there is no previous step


@dataclass
class StepValues:
    loss: float  # mean over ranks of the local total loss
    terms: dict[str, float]  # every composer term, mean over ranks
    logit_scale: float  # rank 0's (identical on every rank)
    applied: bool  # False when a non-finite loss on any rank makes every rank skip the step
    checkpoint_time_due: bool = False  # rank 0's clock: checkpoint.every_minutes have passed
    previous: dict[str, float] = field(default_factory=dict)  # last step's perf/grad/skip values


def _counts(counters: dict[str, int]) -> list[float]:
    """The counters in the fixed order COUNTED."""
    out = dict.fromkeys(COUNTED, 0)
    for reason, n in counters.items():
        if reason in out:
            out[reason] += int(n)
        else:
            if reason not in _warned_reasons:
                _warned_reasons.add(reason)
                log.warning("data skip reason %r is not in step_sync.SKIP_REASONS: counted as 'other'", reason)
            out["other"] += int(n)
    return [float(out[r]) for r in COUNTED]


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    """A small host vector on ``device`` without a stream synchronisation (pinned + non_blocking)."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def reduce_step(loss: torch.Tensor, terms: dict[str, torch.Tensor], logit_scale: torch.Tensor,
                host: HostStats | None = None, time_due: bool = False) -> StepValues:
    """The step's one collective and one host transfer (see the module docstring)."""
    host = host or HostStats()
    names = sorted(terms)
    device = loss.device
    dev_part = [loss.detach().reshape(1)] + [terms[n].detach().reshape(1) for n in names]
    dev_part.append(logit_scale.detach().reshape(1))
    norm = host.grad_norm
    norm_on_device = isinstance(norm, torch.Tensor)
    dev_part.append(norm.detach().reshape(1).to(device) if norm_on_device else torch.zeros(1, device=device))
    local = torch.cat([t.to(torch.float64) for t in dev_part])
    bad = (~torch.isfinite(local[:1])).to(torch.float64)
    host_part = [0.0 if norm_on_device or norm is None else float(norm), float(norm is not None),
                 host.data_wait_frac, host.peak_mem_mb, host.step_time_s, float(time_due),
                 float(host.valid), *_counts(host.counters)]
    packed = torch.cat([bad, local, _to_device(host_part, device)])
    rows = pdist.gather_rows(packed)  # [W, n]
    world = rows.shape[0]
    summary = torch.cat([rows.sum(0), rows.amax(0), rows[0]]).tolist()  # the one host sync
    n = packed.numel()
    total, top, first = summary[:n], summary[n: 2 * n], summary[2 * n:]
    k = 1 + len(names)  # loss + terms
    means = [v / world for v in total[1: 1 + k]]
    i = 1 + k  # logit scale, then device norm, then the host part
    h = i + 2
    previous: dict[str, float] = {}
    if first[h + 6] > 0:  # rank 0 had a previous step (every rank had: they step together)
        if first[h + 1] > 0:
            previous["optim/grad_norm"] = first[i + 1] + first[h]  # identical on every rank
        previous["perf/data_wait_frac"] = total[h + 2] / world
        previous["perf/data_wait_frac_max"] = top[h + 2]
        previous["perf/peak_mem_mb"] = top[h + 3]
        previous["perf/step_time_max_s"] = top[h + 4]
        counts = total[h + 7:]
        n_skip, n_drop = len(SKIP_REASONS), len(DROPPED_FIELDS)
        skipped, dropped, events = counts[:n_skip], counts[n_skip: n_skip + n_drop], counts[n_skip + n_drop:]
        previous["data/skipped_samples"] = float(sum(skipped))
        for reason, v in zip(SKIP_REASONS, skipped):
            if v:
                previous[f"data/skipped_{reason}"] = v
        for reason, v in zip(DROPPED_FIELDS, dropped):
            if v:
                previous[f"data/dropped_{reason[len('field_'):]}"] = v
        for name, v in zip(EVENT_COUNTERS, events):
            previous[f"data/{name}"] = v
    return StepValues(loss=means[0], terms=dict(zip(names, means[1:])), logit_scale=first[i],
                      applied=total[0] == 0, checkpoint_time_due=first[h + 5] > 0, previous=previous)
