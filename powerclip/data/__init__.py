"""Data: webdataset shards → typed Batch (see loader.py), shard tools, synthetic data."""

from .batch import Batch
from .geometry import Geometry, grid_size, model_geometry
from .loader import DataError, Loader, build_loader, concept_id, expand_shards

__all__ = ["Batch", "DataError", "Geometry", "Loader", "build_loader", "concept_id", "expand_shards",
           "grid_size", "model_geometry"]
