"""Checkpoints that restart a run exactly, hold only tensors and primitives, and never half-exist.

Layout (DeepSpeed's own, so ``zero_to_fp32`` and ``powerclip export`` read it)::

    RUN/checkpoints/step_00001000/   mp_rank_00_model_states.pt, *_optim_states.pt (one per rank),
                                     checksums.json (size + sha256 of each file: ckpt_integrity)
    RUN/checkpoints/latest           the tag of the newest COMPLETE checkpoint

* ``latest`` is written by us, not by DeepSpeed (``save_latest=False``): only after every rank has
  finished writing (barrier), through a temporary file and ``os.replace`` (atomic on POSIX). A run
  killed mid-save leaves ``latest`` on the previous checkpoint. Which checkpoint a run resumes from
  when ``latest`` is lost or damaged, and which ones ``prune`` may delete, is ``ckpt_integrity``'s job.
* DeepSpeed pickles a few of its own objects (the loss scaler, ZeRO's fragment addresses) into the
  files. ``SafeCheckpointEngine`` encodes those as tagged dicts of primitives on save and rebuilds
  them on load, so every file loads with ``torch.load(weights_only=True)`` and only classes from the
  ``deepspeed`` package can ever be rebuilt.
* DeepSpeed stores ``client_state`` from rank 0 only, so each rank's own state (data cursor, RNG
  states) is all-gathered into a list indexed by rank before saving.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import random
import re
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from powerclip import distributed as pdist
from powerclip.train import ckpt_integrity

_OBJ = "__powerclip_object__"
TAG_RE = re.compile(r"^step_(\d{8,})$")


# ------------------------------------------------------------------ primitives-only serialisation
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


# ------------------------------------------------------------------------------ RNG states
def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, as tensors and primitives."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, g = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, g))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------ save / resume
def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag or None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (tmp file + fsync + rename)."""
    tmp = ckpt_dir / f".latest.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / "latest")


def prune(ckpt_dir: Path, keep_last: int, inherited_before: int | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints this process wrote; never the one
    ``latest`` names, never another process's (see ``ckpt_integrity.prune``)."""
    return ckpt_integrity.prune(ckpt_dir, keep_last, read_latest(ckpt_dir), inherited_before)


def gather_rank_states(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's private state (data cursor, RNG), in rank order."""
    return pdist.all_gather_object(local)


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int,
         is_main: bool, before_latest: Callable[[Path], None] | None = None,
         inherited_before: int | None = None) -> str:
    """Collective: every rank calls it. Returns the tag written.

    ``before_latest(tag_dir)`` writes extra files (the EMA teacher) before ``latest`` moves; the
    checksums of every file are sealed after that, also before ``latest`` moves.
    """
    tag = tag_for(step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        ckpt_integrity.set_aside(ckpt_dir / tag)  # a leftover of another process: moved, not overwritten
    pdist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if before_latest is not None:
        before_latest(ckpt_dir / tag)
    pdist.barrier()  # every rank's optimizer shard is on disk
    ckpt_integrity.seal(ckpt_dir / tag, pdist.rank(), pdist.world_size())
    if is_main:
        write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep_last, inherited_before)
    pdist.barrier()
    return tag


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Map ``checkpoint.resume`` to (load_dir, tag), or None for a fresh start.

    ``latest``: the run's own latest complete checkpoint if any (a fresh run has none). ``none``:
    start fresh. Anything else: a checkpoint folder (``.../step_00001000``) or a checkpoints/run
    folder. Collective (the ranks share the checksum verification); a damaged or missing ``latest``
    falls back to the newest complete checkpoint (``ckpt_integrity.choose_resume_tag``).
    """
    if resume == "none":
        return None
    rank, world = pdist.rank(), pdist.world_size()
    if resume == "latest":
        tag = ckpt_integrity.choose_resume_tag(ckpt_dir, read_latest(ckpt_dir), rank, world)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    for cand in (path, path / "checkpoints"):
        if cand.is_dir() and ((cand / "latest").exists() or ckpt_integrity.list_tags(cand)):
            tag = ckpt_integrity.choose_resume_tag(cand, read_latest(cand), rank, world)
            if tag:
                return cand, tag
    if path.is_dir() and any(path.glob("*mp_rank_00_model_states.pt")):
        if (path / ckpt_integrity.MANIFEST).is_file():
            err = ckpt_integrity.verify_everywhere(path, rank, world)
            if err:
                raise ckpt_integrity.CheckpointIntegrityError(f"checkpoint.resume={resume!r}: {err}")
        return path.parent, path.name
    raise FileNotFoundError(f"checkpoint.resume={resume!r}: no DeepSpeed checkpoint or 'latest' file there")
