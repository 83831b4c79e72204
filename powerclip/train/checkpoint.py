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
from powerclip.checkpoints import integrity, ownership, storage
from powerclip.checkpoints.discovery import locate
from powerclip.checkpoints.layout import PointerError, read_latest, tag_for, write_latest
from powerclip.config import CheckpointConfig, ConfigError, ModelConfig, dotted_items
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
def prune(ckpt_dir: Path, keep_last: int, inherited_before: int | None = None, run_id: str | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints of this run (``run_id``; those
    this process wrote when None); never the one ``latest`` names, never another run's (see
    ``checkpoints.ownership``)."""
    try:
        latest = read_latest(ckpt_dir)
    except PointerError:
        return []  # nothing is pruned while the pointer is damaged: it is the next resume's problem
    return ownership.prune(ckpt_dir, keep_last, latest, run_id, inherited_before)


def gather_rank_states(local: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's private state (data cursor, RNG), in rank order."""
    return pdist.all_gather_object(local)


def save(engine, ckpt_dir: Path, state: TrainState, client_state: dict[str, Any], options: CheckpointConfig,
         is_main: bool, before_latest: Callable[[Path], None] | None = None, run_id: str | None = None,
         needed_bytes: int = 0) -> str:
    """Collective: every rank calls it. Returns the tag written (named after ``state.step``).

    ``before_latest(tag_dir)`` writes extra files (the EMA teacher) before ``latest`` moves; the
    checksums of every file are sealed after that, also before ``latest`` moves. Then all but the
    newest ``options.keep_last`` checkpoints of the run ``run_id`` are pruned (with
    ``options.prune_inherited``, also those older than the one ``state`` resumed from) and the
    run's half-written saves deleted. A full disk or read-only file system raises ``StorageError``
    naming the folder and the bytes a checkpoint needs (the newest complete one's size, else
    ``needed_bytes``); ``latest`` then still names the last complete checkpoint.
    """
    tag = tag_for(state.step)
    tag_dir = ckpt_dir / tag
    try:
        latest = read_latest(ckpt_dir)
    except PointerError:
        latest = None
    hint = f"the run resumes from {ckpt_dir / latest}" if latest else "the run starts over"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if options.private and is_main:
            os.chmod(ckpt_dir, 0o700)  # nothing below is reachable by others, whatever the writers' modes
        if is_main:
            integrity.set_aside(tag_dir)  # a leftover of another process: moved, not overwritten
            if run_id is not None:
                tag_dir.mkdir(exist_ok=True)
                ownership.write_run_mark(tag_dir, run_id)  # before any weights: a half save is known ours
        pdist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if before_latest is not None:
            before_latest(tag_dir)
        pdist.barrier()  # every rank's optimizer shard is on disk
        integrity.seal(tag_dir, pdist.rank(), pdist.world_size())
        if is_main:
            if options.private:
                make_private(tag_dir)
            write_latest(ckpt_dir, tag)
    except (OSError, RuntimeError) as e:
        error = storage.as_storage_error(e, tag_dir, checkpoint_size(ckpt_dir, needed_bytes), hint)
        if error is None:
            raise
        raise error from None
    if is_main:
        prune(ckpt_dir, options.keep_last, state.prune_before(options.prune_inherited), run_id)
        if run_id is not None:
            ownership.sweep_half_written(ckpt_dir, run_id, keep=tag)
    pdist.barrier()
    return tag


def model_settings(cfg: ModelConfig) -> dict[str, Any]:
    """The model settings that decide parameter shapes, as primitives (stored in every checkpoint so
    that a resume with another shape names the key that changed)."""
    return {"name": cfg.name, "config": cfg.config, "pool": cfg.pool}


def check_model_matches(tag_dir: Path, saved: dict[str, tuple[int, ...]], model: torch.nn.Module,
                        cfg: ModelConfig, saved_settings: Any) -> None:
    """Refuse, in one line, to resume ``tag_dir`` (parameter name -> shape: ``saved``) into a model
    of other shapes; the message names the config keys that differ (from the settings the
    checkpoint recorded) or else the first parameter, with both values."""
    mine = {n: tuple(int(x) for x in getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    if mine == saved:
        return
    differ = sorted(n for n in mine.keys() & saved.keys() if mine[n] != saved[n])
    only_new, only_old = sorted(mine.keys() - saved.keys()), sorted(saved.keys() - mine.keys())
    if differ:
        what = (f"{len(differ)} parameter(s) differ in shape, e.g. {differ[0]}: {list(mine[differ[0]])} here, "
                f"{list(saved[differ[0]])} in the checkpoint")
    else:
        what = (f"the parameters differ: {len(only_new)} only in this model (e.g. {(only_new or ['-'])[0]}), "
                f"{len(only_old)} only in the checkpoint (e.g. {(only_old or ['-'])[0]})")
    keys = ""
    if isinstance(saved_settings, dict):
        now, then = dotted_items(model_settings(cfg), "model"), dotted_items(saved_settings, "model")
        changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
        keys = "; ".join(f"{k} is {now.get(k)!r} in the config, {then.get(k)!r} in the checkpoint"
                         for k in changed[:3])
    raise ConfigError(
        f"cannot resume {tag_dir}: it holds another model shape ({keys + ': ' if keys else ''}{what}); resume "
        "with the checkpoint's model settings, or train the new shape in another train.run_dir (to start "
        "fresh from these weights with unchanged shapes: model.pretrained=<this run> checkpoint.resume=none "
        "in a new train.run_dir); nothing was changed")


def estimate_bytes(model: torch.nn.Module, zero_stage: int, low_precision: bool) -> int:
    """A lower bound on the size of a first checkpoint of ``model`` (before one exists to measure):
    the module weights (stages 0-2; 2 bytes each in bf16/fp16, else 4) and, per trainable
    parameter, Adam's two fp32 moments plus an fp32 master copy in mixed precision."""
    total = trainable = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        total += n
        trainable += n if p.requires_grad else 0
    weights = 0 if zero_stage == 3 else total * (2 if low_precision else 4)
    return weights + trainable * (12 if low_precision else 8)


def checkpoint_size(ckpt_dir: Path, default: int) -> int:
    """The size of the newest complete checkpoint in ``ckpt_dir`` (``default`` when none)."""
    measured = storage.checkpoint_bytes(ckpt_dir)
    return default if measured is None else measured


def check_space(ckpt_dir: Path, estimate: int) -> int:
    """Refuse to start when the next checkpoint cannot fit; returns the bytes a checkpoint needs
    (the newest complete one's size, or ``estimate`` for a run without one)."""
    measured = storage.checkpoint_bytes(ckpt_dir)
    needed = measured if measured is not None else estimate
    storage.check_space(ckpt_dir, needed, "the newest checkpoint" if measured is not None else "this model")
    return needed


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
        tag = integrity.choose_resume_tag(ckpt_dir, rank, world)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    ref = locate(path) if path.is_dir() else None
    if ref is not None and ref.tag is None:  # a run folder or checkpoint root: choose its tag
        tag = integrity.choose_resume_tag(ref.root, rank, world)
        if tag:
            return ref.root, tag
    elif ref is not None:  # one named checkpoint (a tag folder): it, or an error
        if (path / integrity.MANIFEST).is_file():
            err = integrity.verify_everywhere(path, rank, world)
            if err:
                raise integrity.CheckpointIntegrityError(f"checkpoint.resume={resume!r}: {err}")
        return ref.root, ref.tag
    raise FileNotFoundError(f"checkpoint.resume={resume!r}: no DeepSpeed checkpoint or 'latest' file there")
