"""Which checkpoints are complete and intact, which one to resume from, and which may be deleted.

A run on shared storage for weeks meets every failure: a save killed half way, a ``latest`` file
lost or emptied, a shard truncated by a full disk or flipped by a bad disk. The rules here:

* **Sealed.** After every rank has written its files, ``seal`` records the size and sha256 of each
  file of the checkpoint in ``<tag>/checksums.json`` (written atomically, before ``latest`` moves).
  A tag folder with a manifest whose files all match is *complete*; anything else is not.
  The hashing is shared out over the ranks (file i on rank i mod W), so a large checkpoint costs
  each rank 1/W of its bytes.
* **Resume.** ``latest`` names the checkpoint to resume. If it is missing, empty, dangling or its
  checkpoint fails verification, the newest complete checkpoint is used instead and the log says
  why; if tag folders exist but none is complete, the run refuses to start (no silent restart from
  step 0 over someone's checkpoints).
* **Never lose.** A tag folder that a new save would overwrite is moved aside
  (``<tag>.aside-<time>``), not deleted. Which checkpoints may be deleted (``keep_last``, half-written
  saves) is ``checkpoints.ownership``'s rule: only this run's own, proven by a checksum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from powerclip import distributed as pdist
from powerclip.checkpoints.layout import PointerError, list_tags, read_latest
from powerclip.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"
_WRITTEN: set[Path] = set()  # tag folders this process wrote (the only ones prune may delete)


class CheckpointIntegrityError(UserError, RuntimeError):
    """A checkpoint is incomplete or damaged; the message names the folder and the bad file."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def _gather(local: Any) -> list[Any]:
    return pdist.all_gather_object(local)


def seal(tag_dir: Path, rank: int, world: int) -> None:
    """Collective, after every rank's files are on disk: write ``<tag>/checksums.json``."""
    files = _files(tag_dir)
    mine = {str(p.relative_to(tag_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for i, p in enumerate(files) if i % world == rank}
    entries: dict[str, Any] = {}
    for part in _gather(mine):
        entries.update(part)
    if rank == 0:
        tmp = tag_dir / f".{MANIFEST}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"algorithm": "sha256", "files": dict(sorted(entries.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, tag_dir / MANIFEST)
    _WRITTEN.add(tag_dir.resolve())


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), f"a {type(value).__name__}")


def parse_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` of a ``checksums.json``, checked against its schema; raise naming the file.

    Schema: ``{"algorithm": "sha256" (optional), "files": {relative name: {"size": int >= 0,
    "sha256": 64 hex digits}}}``. Valid JSON of another shape is as untrustworthy as random bytes,
    and a name that leaves the folder (``../x``, ``/etc/x``) would make a reader hash files
    elsewhere, so both are refused the same way as a damaged file."""
    def bad(why: str) -> CheckpointIntegrityError:
        return CheckpointIntegrityError(f"{path}: malformed {MANIFEST}: {why} (damaged, or not a powerclip "
                                        "checkpoint)")

    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:
        raise CheckpointIntegrityError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict):
        raise bad(f"the top level is {_kind(data)}, not an object")
    if data.get("algorithm", "sha256") != "sha256":
        raise bad(f"algorithm {data.get('algorithm')!r}, expected 'sha256'")
    if "files" not in data:
        raise bad("no 'files' entry")
    files = data["files"]
    if not isinstance(files, dict):
        raise bad(f"'files' is {_kind(files)}, not an object of file name -> {{size, sha256}}")
    for name, entry in files.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or name == MANIFEST:
            raise bad(f"file name {name!r} is not a file inside the checkpoint folder")
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if (not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str)
                or not _DIGEST.match(digest)):
            raise bad(f"the entry of {name!r} is {json.dumps(entry)[:60]}, not {{size: bytes, sha256: hex digest}}")
    return files


def _manifest(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / MANIFEST
    if not path.is_file():
        raise CheckpointIntegrityError(f"{tag_dir}: no {MANIFEST} (an interrupted save, or not a powerclip "
                                       "checkpoint)")
    return parse_manifest(path)


def verify(tag_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Check this rank's share of the files (all of them when world == 1); raise naming a bad file."""
    files = _manifest(tag_dir)
    for i, (name, want) in enumerate(sorted(files.items())):
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointIntegrityError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointIntegrityError(f"{path}: {size} bytes, the checkpoint wrote {want['size']} "
                                           "(truncated?)")
        if i % world != rank:
            continue
        try:
            digest = file_sha256(path)
        except OSError as e:
            raise CheckpointIntegrityError(f"{path}: cannot read: {e.strerror or e}") from None
        if digest != want["sha256"]:
            raise CheckpointIntegrityError(f"{path}: sha256 differs from {MANIFEST} (corrupted)")


def verify_everywhere(tag_dir: Path, rank: int, world: int) -> str | None:
    """Collective: each rank verifies its share; every rank gets the same verdict (None = intact)."""
    try:
        verify(tag_dir, rank, world)
        mine = None
    except CheckpointIntegrityError as e:
        mine = str(e)
    errors = [e for e in _gather(mine) if e]
    return errors[0] if errors else None


def choose_resume_tag(ckpt_dir: Path, rank: int, world: int) -> str | None:
    """Collective. The tag to resume from (see module docstring), or None for a fresh start.

    Raises ``CheckpointIntegrityError`` when checkpoints exist but none is usable.
    """
    tags = list_tags(ckpt_dir)
    problems: list[str] = []
    try:
        latest = read_latest(ckpt_dir)
    except PointerError as e:  # like a damaged checkpoint: fall back to the newest complete one
        latest = None
        problems.append(str(e))
    if latest and latest in tags:
        if not (ckpt_dir / latest / MANIFEST).is_file():  # written before checksums existed
            if rank == 0:
                log.warning("%s has no %s: resuming from it unverified", ckpt_dir / latest, MANIFEST)
            return latest
        err = verify_everywhere(ckpt_dir / latest, rank, world)
        if err is None:
            return latest
        problems.append(err)
    elif latest:
        problems.append(f"{ckpt_dir / 'latest'} names {latest!r}, which does not exist")
    elif problems:
        pass  # the damaged pointer itself is the problem
    elif (ckpt_dir / "latest").exists():
        problems.append(f"{ckpt_dir / 'latest'} is empty")
    elif tags:
        problems.append(f"{ckpt_dir / 'latest'} is missing")
    for tag in reversed(tags):
        if tag == latest or not (ckpt_dir / tag / MANIFEST).is_file():
            if tag != latest:
                problems.append(f"{ckpt_dir / tag}: no {MANIFEST} (incomplete)")
            continue
        err = verify_everywhere(ckpt_dir / tag, rank, world)
        if err is None:
            if rank == 0:
                log.warning("resuming from the newest complete checkpoint %s instead: %s", ckpt_dir / tag,
                            "; ".join(problems))
            return tag
        problems.append(err)
    if tags or latest or (ckpt_dir / "latest").exists():
        raise CheckpointIntegrityError(
            f"{ckpt_dir}: no complete checkpoint to resume from ({'; '.join(problems)}); refusing to start "
            "over it. Repair it, resume from a named checkpoint (checkpoint.resume=PATH), or use another "
            "train.run_dir")
    return None


def set_aside(tag_dir: Path) -> Path | None:
    """Move an existing ``tag_dir`` out of the way of a new save (never delete what we did not write)."""
    if not tag_dir.exists() or tag_dir.resolve() in _WRITTEN:
        return None
    aside = tag_dir.with_name(f"{tag_dir.name}.aside-{int(time.time())}-{os.getpid()}")
    tag_dir.rename(aside)
    log.warning("a checkpoint folder %s already existed (from another process); moved it to %s", tag_dir, aside)
    return aside


def written_here(tag_dir: Path) -> bool:
    """This process sealed ``tag_dir`` (and has not pruned it since)."""
    return tag_dir.resolve() in _WRITTEN


def forget(tag_dir: Path) -> None:
    _WRITTEN.discard(tag_dir.resolve())
