"""Checkpoints that restart a run exactly, hold only tensors and primitives, and never half-exist.

Layout (DeepSpeed's own, so ``zero_to_fp32`` and ``powerclip export`` read it)::

    RUN/checkpoints/step_00001000/   mp_rank_00_model_states.pt, *_optim_states.pt (one per rank),
                                     checksums.json (size + sha256 of each file)
    RUN/checkpoints/latest           the tag of the newest COMPLETE checkpoint

* ``latest`` is written by us, not by DeepSpeed (``save_latest=False``): only after every rank has
  finished writing (barrier), through a temporary file and ``os.replace`` (atomic on POSIX). A run
  killed mid-save leaves ``latest`` on the previous checkpoint. Which checkpoint a run resumes from
  when ``latest`` is lost or damaged, and which ones ``prune`` may delete, is
  ``powerclip.checkpoints.integrity``'s job; the file names and pointers are ``checkpoints.layout``'s.
* Every file holds only tensors and primitives (``checkpoints.codec.SafeCheckpointEngine``, which
  the trainer installs on its engine), so every file loads with ``torch.load(weights_only=True)``.
* DeepSpeed stores ``client_state`` from rank 0 only, so each rank's own state (data cursor, RNG
  states) is all-gathered into a list indexed by rank before saving.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from powerclip import distributed as pdist
from powerclip.checkpoints import integrity
from powerclip.checkpoints.discovery import locate
from powerclip.checkpoints.layout import read_latest, tag_for, write_latest
from powerclip.config import CheckpointConfig
from powerclip.outputs import make_private
from powerclip.train.state import TrainState


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
def prune(ckpt_dir: Path, keep_last: int, inherited_before: int | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints this process wrote; never the one
    ``latest`` names, never another process's (see ``checkpoints.integrity.prune``)."""
    return integrity.prune(ckpt_dir, keep_last, read_latest(ckpt_dir), inherited_before)


def gather_rank_states(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's private state (data cursor, RNG), in rank order."""
    return pdist.all_gather_object(local)


def save(engine, ckpt_dir: Path, state: TrainState, client_state: dict[str, Any], options: CheckpointConfig,
         is_main: bool, before_latest: Callable[[Path], None] | None = None) -> str:
    """Collective: every rank calls it. Returns the tag written (named after ``state.step``).

    ``before_latest(tag_dir)`` writes extra files (the EMA teacher) before ``latest`` moves; the
    checksums of every file are sealed after that, also before ``latest`` moves. Then all but the
    newest ``options.keep_last`` checkpoints this process wrote are pruned (with
    ``options.prune_inherited``, also those older than the one ``state`` resumed from).
    """
    tag = tag_for(state.step)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if options.private and is_main:
        os.chmod(ckpt_dir, 0o700)  # nothing below is reachable by others, whatever the writers' modes
    if is_main:
        integrity.set_aside(ckpt_dir / tag)  # a leftover of another process: moved, not overwritten
    pdist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if before_latest is not None:
        before_latest(ckpt_dir / tag)
    pdist.barrier()  # every rank's optimizer shard is on disk
    integrity.seal(ckpt_dir / tag, pdist.rank(), pdist.world_size())
    if is_main:
        if options.private:
            make_private(ckpt_dir / tag)
        write_latest(ckpt_dir, tag)
        prune(ckpt_dir, options.keep_last, state.prune_before(options.prune_inherited))
    pdist.barrier()
    return tag


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """Map ``checkpoint.resume`` to (load_dir, tag), or None for a fresh start.

    ``latest``: the run's own latest complete checkpoint if any (a fresh run has none). ``none``:
    start fresh. Anything else: a checkpoint folder (``.../step_00001000``) or a checkpoints/run
    folder. Collective (the ranks share the checksum verification); a damaged or missing ``latest``
    falls back to the newest complete checkpoint (``integrity.choose_resume_tag``).
    """
    if resume == "none":
        return None
    rank, world = pdist.rank(), pdist.world_size()
    if resume == "latest":
        tag = integrity.choose_resume_tag(ckpt_dir, read_latest(ckpt_dir), rank, world)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    ref = locate(path) if path.is_dir() else None
    if ref is not None and ref.tag is None:  # a run folder or checkpoint root: choose its tag
        tag = integrity.choose_resume_tag(ref.root, read_latest(ref.root), rank, world)
        if tag:
            return ref.root, tag
    elif ref is not None:  # one named checkpoint (a tag folder): it, or an error
        if (path / integrity.MANIFEST).is_file():
            err = integrity.verify_everywhere(path, rank, world)
            if err:
                raise integrity.CheckpointIntegrityError(f"checkpoint.resume={resume!r}: {err}")
        return ref.root, ref.tag
    raise FileNotFoundError(f"checkpoint.resume={resume!r}: no DeepSpeed checkpoint or 'latest' file there")
