"""Checkpoint files that hold only tensors and primitives, so they load with ``weights_only=True``.

DeepSpeed pickles a few of its own objects (the loss scaler, ZeRO's fragment addresses) into its
checkpoint files. ``SafeCheckpointEngine`` encodes those as tagged dicts of primitives on save and
rebuilds them on load, so every file loads with ``torch.load(weights_only=True)`` and only classes
from the ``deepspeed`` package can ever be rebuilt (never by calling their code).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from collections import OrderedDict
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

_OBJ = "__powerclip_object__"


def encode(obj: Any, path: str = "") -> Any:
    """Turn DeepSpeed's pickled helper objects into primitives; fail on anything unexpected."""
    if obj is None or isinstance(obj, (bool, str, bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, enum.Enum):  # ZeroStageEnum is an int enum; zero_to_fp32 compares it as int
        return obj.value
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, dict):
        items = [(k, encode(v, f"{path}.{k}")) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        seq = [encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return seq if isinstance(obj, list) else tuple(seq)
    if isinstance(obj, (set, frozenset)):
        return sorted(encode(v, path) for v in obj)
    cls = type(obj)
    if not cls.__module__.startswith("deepspeed."):
        raise TypeError(f"checkpoint entry {path or '<root>'} is a {cls.__module__}.{cls.__qualname__}; "
                        "checkpoints may hold only tensors and primitives")
    state = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else vars(obj)
    return {_OBJ: f"{cls.__module__}:{cls.__qualname__}", "state": encode(dict(state), path)}


def decode(obj: Any) -> Any:
    """Inverse of ``encode``: rebuild the tagged DeepSpeed objects (``deepspeed.*`` classes only)."""
    if isinstance(obj, dict):
        if _OBJ in obj:
            module, qualname = obj[_OBJ].split(":")
            if not module.startswith("deepspeed."):
                raise ValueError(f"refusing to rebuild {obj[_OBJ]} from a checkpoint")
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            state = decode(obj["state"])
            if dataclasses.is_dataclass(cls):
                return cls(**state)
            inst = cls.__new__(cls)
            inst.__dict__.update(state)
            return inst
        items = [(k, decode(v)) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(decode(v) for v in obj)
    return obj


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, writing weights_only-loadable files."""

    def save(self, state_dict, path: str):
        super().save(encode(state_dict), path)

    def load(self, path: str, map_location=None):
        return decode(torch.load(path, map_location=map_location, weights_only=True))


def install_safe_checkpoint_engine(engine) -> None:
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
