"""Which checkpoints belong to this run, so that ``keep_last`` bounds the run folder and nothing else
is ever deleted.

A run lives through many processes (restarts, Slurm requeues), and each one must be able to prune
the checkpoints its predecessors wrote, or the folder grows by ``keep_last`` checkpoints per
requeue. Deleting is only safe for what provably is this run's, so every save starts by writing
``<tag>/run.json`` (``{"run_id": ...}``) before any weights, and the checksums seal it with the rest:

* **The run's identity** is a random id created by a fresh run and inherited by every process that
  resumes from a checkpoint of the same checkpoint folder (``identity``). Resuming from a checkpoint
  elsewhere (``checkpoint.resume=PATH``) or starting over (``checkpoint.resume=none``) starts a new
  run: it never deletes the folder's older checkpoints.
* **Pruned** (``prune``): this run's complete checkpoints beyond its newest ``keep_last`` (others'
  never shorten that window). This run's: sealed by this process, or ``run.json`` names this run,
  matches its sha256 in ``checksums.json``, and the folder holds exactly the files the manifest
  lists, at their sizes. A checkpoint copied in from another run, written by an older powerclip (no
  ``run.json``), or holding a file someone added is kept. ``latest`` is never deleted.
* **Half-written saves** (a save that died of a full disk or a kill: no ``checksums.json``) of this
  run are deleted once a later save has succeeded (``sweep_half_written``), also when they were
  moved aside (``<tag>.aside-...``); a half-written folder holding anything but checkpoint files is
  kept.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path

from powerclip.atomic import write_text_atomic
from powerclip.checkpoints import integrity
from powerclip.checkpoints.layout import TAG_RE, list_tags, tag_step

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_ASIDE = re.compile(r"^(step_\d{8,})\.aside-\d+-\d+$")
# what a save writes into a tag folder before it is sealed: DeepSpeed's and the EMA teacher's .pt
# files, run.json, and the temporary files of atomic writes
_SAVE_FILE = re.compile(r"^(.+\.pt|run\.json|\..+\.tmp\.\d+|.+\.tmp\d+)$")


def new_run_id() -> str:
    return uuid.uuid4().hex


def write_run_mark(tag_dir: Path, run_id: str) -> None:
    """Record which run a save in ``tag_dir`` belongs to (before any weights are written)."""
    write_text_atomic(tag_dir / RUN_FILE, json.dumps({"run_id": run_id}))


def run_of(tag_dir: Path) -> str | None:
    """The run id ``tag_dir/run.json`` names; None when missing or malformed (then not provably
    any run's: such a folder is never deleted)."""
    path = tag_dir / RUN_FILE
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    rid = data.get("run_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and _RUN_ID.match(rid) else None


def identity(ckpt_dir: Path, resumed: Path | None) -> str:
    """This process's run id: the one of the checkpoint it resumed from when that lies in its own
    checkpoint folder ``ckpt_dir``, else a new one (a fresh run, or a run started from elsewhere)."""
    if resumed is not None and resumed.parent.resolve() == ckpt_dir.resolve():
        rid = run_of(resumed)
        if rid is not None:
            return rid
        log.info("%s has no valid %s (an older checkpoint): the checkpoints before it are not pruned by "
                 "checkpoint.keep_last", resumed, RUN_FILE)
    return new_run_id()


def owned_complete(tag_dir: Path, run_id: str) -> bool:
    """``tag_dir`` is a sealed checkpoint of ``run_id``, holding exactly the files it sealed."""
    try:
        files = integrity.parse_manifest(tag_dir / integrity.MANIFEST)
    except integrity.CheckpointIntegrityError:
        return False
    entry = files.get(RUN_FILE)
    if entry is None or run_of(tag_dir) != run_id:
        return False
    if integrity.file_sha256(tag_dir / RUN_FILE) != entry["sha256"]:
        return False
    present = {str(p.relative_to(tag_dir)): p.stat().st_size for p in tag_dir.rglob("*") if p.is_file()}
    present.pop(integrity.MANIFEST, None)
    return present == {name: e["size"] for name, e in files.items()}


def half_written(folder: Path, run_id: str) -> bool:
    """``folder`` is an unsealed save of ``run_id`` holding nothing but what a save writes."""
    if (folder / integrity.MANIFEST).exists() or run_of(folder) != run_id:
        return False
    return all(p.is_file() and _SAVE_FILE.match(p.name) for p in folder.rglob("*"))


def sweep_half_written(ckpt_dir: Path, run_id: str, keep: str) -> list[str]:
    """After a successful save of ``keep``: delete this run's half-written saves (tag folders and
    ones moved aside). Returns the folder names deleted."""
    removed = []
    for folder in sorted(ckpt_dir.iterdir()) if ckpt_dir.is_dir() else []:
        if folder.name == keep or not folder.is_dir() or folder.is_symlink():
            continue
        if (TAG_RE.match(folder.name) or _ASIDE.match(folder.name)) and half_written(folder, run_id):
            shutil.rmtree(folder)
            removed.append(folder.name)
    if removed:
        log.info("removed half-written checkpoint folders of this run in %s: %s", ckpt_dir, ", ".join(removed))
    return removed


def prune(ckpt_dir: Path, keep_last: int, latest: str | None, run_id: str | None = None,
          inherited_before: int | None = None) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints, among those of this run (see the
    module docstring; ``run_id`` None: only those this process sealed), and, when
    ``inherited_before`` is a step, complete checkpoints older than it. Never ``latest``."""
    def deletable(tag: str) -> bool:
        path = ckpt_dir / tag
        if path.is_symlink():
            return False
        if integrity.written_here(path) or (run_id is not None and owned_complete(path, run_id)):
            return True
        return inherited_before is not None and tag_step(tag) < inherited_before

    # the window of keep_last counts this run's checkpoints only: another run's never shortens it
    tags = [t for t in list_tags(ckpt_dir) if (ckpt_dir / t / integrity.MANIFEST).is_file() or t == latest]
    runs = [t for t in tags if t == latest or deletable(t)]
    doomed = runs[:-keep_last] if keep_last > 0 and len(runs) > keep_last else []
    removed = []
    for tag in doomed:
        if tag == latest:
            continue
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        integrity.forget(ckpt_dir / tag)
        removed.append(tag)
    return removed
