"""Batch fields declared once: a field added only by its declaration (a Batch subclass here) flows
through collate, the DataLoader worker hand-off, micro-batch concatenation and the move to the
device by the rules it declares, with nothing else edited."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from powerclip.data.batch import Batch, FieldSpec, declare, field_specs
from powerclip.data.collate import CollateContext, collate
from powerclip.data.device import to_device
from powerclip.train.accum import concat_batches

L, GRID = 6, 2
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _scores(values: list[list[float]], ctx: CollateContext) -> torch.Tensor:
    """A field's own collate rule: per-sample float lists, zero-padded to the batch's longest."""
    out = torch.zeros(len(values), max(len(v) for v in values))
    for b, v in enumerate(values):
        out[b, : len(v)] = torch.tensor(v)
    return out


@dataclass
class ExtraBatch(Batch):
    # per-sample float scores of varying length: padded on concat, dtype kept on the move
    scores: torch.Tensor | None = declare(FieldSpec("sample", _scores, concat="pad"))
    # one row per scored item, pointing at its sample: offset on concat like concept_owner
    score_owner: torch.Tensor | None = declare(FieldSpec("concept", "owners", index_of="sample"))


def _sample(i: int, n_scores: int) -> dict:
    """One processed sample as sample processing hands it to collate (values under field names)."""
    g = torch.Generator().manual_seed(i)
    scores = [float(i) + 0.25 * k for k in range(n_scores)]
    return {"keys": f"s{i}", "images": torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8, generator=g),
            "text": [49406, 10 + i, 49407], "token_valid": 3, "phrase_tokens": [[1]], "phrase_valid": 1,
            "meta": {"caption": f"c{i}"}, "scores": scores, "score_owner": n_scores}


def _micro(first: int, counts: list[int]) -> ExtraBatch:
    batch = collate([_sample(first + j, n) for j, n in enumerate(counts)], CollateContext(L, GRID), ExtraBatch)
    assert isinstance(batch, ExtraBatch)
    return batch


def test_declared_field_collates_concats_and_moves_by_its_rules():
    a, b = _micro(0, [1, 3]), _micro(2, [2])
    assert a.scores.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.25, 1.5]] and a.score_owner.tolist() == [0, 1, 1, 1]
    assert a.region_masks is None and a.text.shape == (2, L)  # fields no sample carries stay None

    full = concat_batches([a, b])
    assert isinstance(full, ExtraBatch) and full.keys == ["s0", "s1", "s2"]
    # "pad": b's single score row is padded to a's three slots, then appended
    assert full.scores.tolist() == [[0.0, 0.0, 0.0], [1.0, 1.25, 1.5], [2.0, 2.25, 0.0]]
    # index_of="sample": b's rows point at its own sample, now the third of the joined batch
    assert full.score_owner.tolist() == [0, 1, 1, 1, 2, 2]
    assert torch.equal(full.images, torch.cat([a.images, b.images]))

    moved = to_device(full, "cpu", torch.bfloat16, MEAN, STD)
    assert isinstance(moved, ExtraBatch)
    assert moved.scores.dtype == torch.float32 and torch.equal(moved.scores, full.scores)  # "exact": dtype kept
    assert moved.images.dtype == torch.bfloat16  # "pixels": normalised, then the compute dtype
    want = ((full.images.float() / 255 - 0.5) / 0.25).to(torch.bfloat16)
    assert torch.allclose(moved.images.float(), want.float(), atol=1e-2)


class _Stream(torch.utils.data.IterableDataset):
    """What the loader's workers do: collate, then hand the batch over the process boundary."""

    def __iter__(self):
        yield _micro(0, [2, 1]).for_wire()


def test_declared_field_crosses_the_worker_boundary():
    want = _micro(0, [2, 1])
    wire = _micro(0, [2, 1]).for_wire()
    # "inline" fields travel as numpy arrays, the "shared" images stay a tensor
    assert isinstance(wire.scores, np.ndarray) and isinstance(wire.images, torch.Tensor)
    loader = torch.utils.data.DataLoader(_Stream(), batch_size=None, num_workers=1)
    (got,) = [b.received() for b in loader]
    assert isinstance(got, ExtraBatch)
    for name, _ in field_specs(ExtraBatch):
        v, w = getattr(got, name), getattr(want, name)
        if isinstance(w, torch.Tensor):
            assert isinstance(v, torch.Tensor) and v.dtype == w.dtype and torch.equal(v, w), name
        else:
            assert v == w, name
