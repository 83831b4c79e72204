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
token_valid        [B, L] bool             real word tokens: not SOT, EOT or padding (docs/losses.md §0)
phrase_tokens      [B, K, L] bool          token positions of each parse-tree node (+ root)
phrase_valid       [B, K] bool             real phrase slots (K is padded to the batch max)
region_masks       [B, M, T] bool          patches inside each region box
region_valid       [B, M] bool             real region slots
concept_text       [C, L] long             concept noun phrases, tokenised as short texts
concept_owner      [C] long                index of the owning image in this local batch
concept_ids        [C] long                hash of the normalised concept text (false-negative rule)
neg_text           [B, N, L] long          hard-negative captions (N = data.num_negatives)
neg_valid          [B, N] bool             real negatives (samples may have fewer than N)
jpegs              list (B) | None         ``data.decode_on_device``: per sample (JPEG bytes, crop
                                          (top, left, h, w)) still to decode into its zeroed
                                          ``images`` slot, or None (pixels already there);
                                          consumed (set None) by ``data.device.to_device``
=================  =====================  =======================================================

Each field declares, once, in its ``dataclasses.field`` metadata (a ``FieldSpec``), what its rows
are, how the samples' values become the field (collate), how micro-batches are joined (feature
caching accumulation), how it is moved to the device and how it crosses the DataLoader worker
boundary. Collate, the worker hand-off, pinning, ``to``, ``train.accum.concat_batches`` and the
model's text-tower read all loop over these declarations, so a new field is declared here and
produced by sample processing (one value per sample under the field's name), nowhere else.

Fields a run does not need are ``None``. ``phrase_tokens`` rows always include the root node
(the whole caption), so every valid caption has K >= 1.

As filled by ``powerclip.data.build_loader``: phrase row 0 is the root; ``region_valid`` is all
True (stored boxes are filled up with random ones to M); ``concept_*`` are set when
``data.concepts`` is on, ``neg_*`` when ``data.num_negatives > 0``; ``meta[i]`` holds
``caption``, ``label`` (zero-shot class index or None), ``eval_negatives`` and ``url`` (the shard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

# What dim 0 of a field counts: "sample" = the B images/captions of the local batch, "concept" = the C
# concept rows (several per caption, of varying number), "none" = not a tensor (python lists).
Rows = Literal["sample", "concept", "none"]
# How micro-batches are joined along dim 0: "list" (python lists, extended), "cat" (rows of one shape),
# "pad" (other dims padded with zero/False to the largest micro-batch first, e.g. K phrase slots).
Concat = Literal["list", "cat", "pad"]
# How the field is moved: "pixels" = the image tensor (uint8 normalised on the device by
# ``data.device.to_device``, floating cast to the compute dtype), "exact" = moved with its dtype kept.
Move = Literal["pixels", "exact"]
# How a worker hands the field to the main process: "shared" = written into the worker's ring of
# shared-memory buffers (copied out on receipt), "inline" = pickled inline as a numpy array (one
# shared-memory segment per small tensor per batch would cost more than the tensor), "python" = as is.
Wire = Literal["shared", "inline", "python"]


@dataclass(frozen=True)
class FieldSpec:
    """The declaration of one Batch field (see the module docstring).

    ``collate``: the name of a rule in ``data.collate.RULES`` (token rows, masks of lengths, ...)
    or a callable ``(values, ctx) -> value`` over the B samples' values of the field.
    ``index_of``: the values index rows of that kind (concept_owner indexes samples), so joining
    micro-batches offsets them by the rows before.
    ``encodes``: the field is text-tower input and its embeddings fill that ``Features`` field;
    every such field goes through one text-tower call, in declaration order, captions first.
    """

    rows: Rows
    collate: str | Callable[[list, Any], Any]
    concat: Concat = "cat"
    move: Move = "exact"
    wire: Wire = "inline"
    index_of: Rows | None = None
    encodes: str | None = None


_REQUIRED = object()


def declare(spec: FieldSpec, default: Any = None) -> Any:
    """A dataclass field carrying ``spec`` (``default`` None: fields a run may not need)."""
    if default is _REQUIRED:
        return field(metadata={"spec": spec})
    if callable(default):
        return field(default_factory=default, metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


def field_specs(batch_type: type) -> Iterator[tuple[str, FieldSpec]]:
    """(name, spec) of every declared field of a Batch class, in declaration order."""
    for f in fields(batch_type):
        if "spec" not in f.metadata:
            raise TypeError(f"{batch_type.__name__}.{f.name} has no FieldSpec: declare it with batch.declare")
        yield f.name, f.metadata["spec"]


def text_fields(batch_type: type) -> Iterator[tuple[str, FieldSpec]]:
    """(name, spec) of the fields that are text-tower input, in declaration order (captions first)."""
    return ((name, spec) for name, spec in field_specs(batch_type) if spec.encodes is not None)


@dataclass
class Batch:
    keys: list[str] = declare(FieldSpec("none", "list", concat="list", wire="python"), _REQUIRED)
    images: torch.Tensor = declare(FieldSpec("sample", "images", move="pixels", wire="shared"), _REQUIRED)
    text: torch.Tensor = declare(FieldSpec("sample", "token_rows", encodes="text"), _REQUIRED)
    token_valid: torch.Tensor | None = declare(FieldSpec("sample", "token_span"))
    phrase_tokens: torch.Tensor | None = declare(FieldSpec("sample", "token_sets", concat="pad"))
    phrase_valid: torch.Tensor | None = declare(FieldSpec("sample", "lengths", concat="pad"))
    region_masks: torch.Tensor | None = declare(FieldSpec("sample", "regions"))
    region_valid: torch.Tensor | None = declare(FieldSpec("sample", "lengths"))
    concept_text: torch.Tensor | None = declare(FieldSpec("concept", "flat_token_rows", encodes="concepts"))
    concept_owner: torch.Tensor | None = declare(FieldSpec("concept", "owners", index_of="sample"))
    concept_ids: torch.Tensor | None = declare(FieldSpec("concept", "flat_ints"))
    neg_text: torch.Tensor | None = declare(FieldSpec("sample", "token_row_sets", encodes="negatives"))
    neg_valid: torch.Tensor | None = declare(FieldSpec("sample", "bools"))
    # data.decode_on_device: per sample (JPEG bytes, crop window) or None; decoded by data.device.to_device
    jpegs: list[tuple[bytes, tuple[int, int, int, int]] | None] | None = declare(
        FieldSpec("none", "list", concat="list", wire="python"))
    # free-form per-sample metadata for evaluation and debugging (never used by losses)
    meta: list[dict] = declare(FieldSpec("none", "list", concat="list", wire="python"), list)

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    def _replace(self, values: dict) -> Batch:
        return type(self)(**{f.name: values.get(f.name, getattr(self, f.name)) for f in fields(self)})

    def for_wire(self) -> Batch:
        """Inside a DataLoader worker: the ``inline`` tensors as numpy arrays (in place)."""
        for name, spec in field_specs(type(self)):
            v = getattr(self, name)
            if spec.wire == "inline" and isinstance(v, torch.Tensor):
                setattr(self, name, v.numpy())
        return self

    def received(self) -> Batch:
        """In the main process, a batch from a worker: ``shared`` tensors copied out of the worker's
        ring (unless the pin-memory thread already copied them into pinned memory) and ``inline``
        numpy arrays back to tensors (in place)."""
        for name, spec in field_specs(type(self)):
            v = getattr(self, name)
            if spec.wire == "shared" and isinstance(v, torch.Tensor) and not v.is_pinned():
                setattr(self, name, v.clone())
            elif isinstance(v, np.ndarray):
                setattr(self, name, torch.from_numpy(v))
        return self

    def pin_memory(self) -> Batch:
        """Every tensor in page-locked host memory (numpy fields become tensors first), so that
        ``to(device)`` copies asynchronously. DataLoader's pin-memory thread calls this."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                v = torch.from_numpy(v)
            out[f.name] = v.pin_memory() if isinstance(v, torch.Tensor) else v
        return self._replace(out)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device``; ``dtype`` applies to floating ``pixels`` fields only."""
        out = {}
        for name, spec in field_specs(type(self)):
            v = getattr(self, name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if dtype is not None and spec.move == "pixels" and v.is_floating_point():
                    v = v.to(dtype)
            out[name] = v
        return self._replace(out)
