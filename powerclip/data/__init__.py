"""Data: webdataset shards → typed Batch (samples.py → collate.py → loader.py; fields declared in batch.py), shard tools, synthetic data.

Names are imported lazily (PEP 562) so that light tools (build_shards, make_synthetic) do not pay
for importing open_clip and torch just to reach ``powerclip.data.build``."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Batch": "batch", "Geometry": "geometry", "grid_size": "geometry", "model_geometry": "geometry",
    "DataError": "loader", "Loader": "loader", "build_loader": "loader", "concept_id": "loader",
    "expand_shards": "loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
