"""Collate: B processed samples → one Batch, each field by the rule its ``FieldSpec`` names.

A sample carries one value per Batch field under the field's name (``data.samples``); a field no
sample carries stays None. The rules below are the shapes those values come in (token id lists,
lengths, position sets, ...); a field whose values fit none of them declares its own callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batch import Batch, field_specs
from .regions import stack_regions


@dataclass(frozen=True)
class CollateContext:
    """What the rules need beyond the values: the context length ``length`` (token rows are
    [.., length]), the patch ``grid`` side (region masks are [M, grid*grid]) and ``images``, the
    buffer the samples' images were written into (or None)."""

    length: int
    grid: int
    images: torch.Tensor | None = None


def _token_rows(id_lists: list[list[int]], length: int) -> torch.Tensor:
    """Token id lists (each <= length) → one zero-padded [n, length] long tensor, in one allocation."""
    out = np.zeros((len(id_lists), length), dtype=np.int64)  # numpy row writes, not a tensor per row
    for i, ids in enumerate(id_lists):
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)


def _images(images: list[torch.Tensor], ctx: CollateContext) -> torch.Tensor:
    """The batch image tensor: ``ctx.images`` when every image was already written into its slot."""
    into = ctx.images
    if into is not None and all(img.data_ptr() == into[i].data_ptr() for i, img in enumerate(images)):
        return into[: len(images)]
    return torch.stack(images)


def _token_span(n_tok: list[int], ctx: CollateContext) -> torch.Tensor:
    """[B, L] bool: the real word tokens of captions of ``n_tok`` tokens (not SOT, EOT or padding)."""
    ar = torch.arange(ctx.length)
    n = torch.tensor(n_tok)
    return (ar[None, :] >= 1) & (ar[None, :] < (n - 1)[:, None])


def _token_sets(sets: list[list[list[int]]], ctx: CollateContext) -> torch.Tensor:
    """[B, K, L] bool: per sample, K (padded to the batch max) sets of token positions."""
    K = max(len(s) for s in sets)
    out = np.zeros((len(sets), K, ctx.length), dtype=np.bool_)
    for b, s in enumerate(sets):
        for k, pos in enumerate(s):
            if pos[-1] - pos[0] + 1 == len(pos):  # a phrase is a contiguous token run: slice, not fancy index
                out[b, k, pos[0]: pos[-1] + 1] = True
            else:
                out[b, k, pos] = True
    return torch.from_numpy(out)


def _lengths(lengths: list[int], ctx: CollateContext) -> torch.Tensor:
    """[B, max length] bool: the first ``lengths[b]`` slots of row b are real."""
    out = np.zeros((len(lengths), max(lengths)), dtype=np.bool_)
    for b, n in enumerate(lengths):
        out[b, :n] = True
    return torch.from_numpy(out)


def _owners(counts: list[int], ctx: CollateContext) -> torch.Tensor:
    """[sum counts] long: the index of the sample that owns each flattened row."""
    return torch.tensor([b for b, n in enumerate(counts) for _ in range(n)], dtype=torch.long)


def _token_row_sets(rows: list[list[list[int]]], ctx: CollateContext) -> torch.Tensor:
    """[B, N, L] long: N token rows per sample (every sample has N, padded with empty rows)."""
    B, N = len(rows), len(rows[0])
    return _token_rows([r for sample_rows in rows for r in sample_rows], ctx.length).view(B, N, ctx.length)


RULES: dict[str, Callable[[list, CollateContext], Any]] = {
    "list": lambda values, ctx: list(values),
    "images": _images,
    "token_rows": lambda ids, ctx: _token_rows(ids, ctx.length),
    "token_span": _token_span,
    "token_sets": _token_sets,
    "lengths": _lengths,
    "regions": lambda per_sample, ctx: stack_regions(per_sample, ctx.grid),
    "flat_token_rows": lambda per_sample, ctx: _token_rows([r for rows in per_sample for r in rows], ctx.length),
    "owners": _owners,
    "flat_ints": lambda per_sample, ctx: torch.tensor([i for ints in per_sample for i in ints], dtype=torch.long),
    "token_row_sets": _token_row_sets,
    "bools": lambda rows, ctx: torch.tensor(rows, dtype=torch.bool),
}


def collate(samples: list[dict], ctx: CollateContext, batch_type: type[Batch] = Batch) -> Batch:
    """One ``batch_type`` of the processed ``samples``: every declared field the samples carry,
    made by its FieldSpec's collate rule; the others None."""
    out: dict[str, Any] = {}
    for name, spec in field_specs(batch_type):
        if name not in samples[0]:
            continue
        rule = spec.collate if callable(spec.collate) else RULES[spec.collate]
        out[name] = rule([s[name] for s in samples], ctx)
    return batch_type(**out)
