"""A full disk, a quota or a read-only file system under a run folder, told as what it is.

A checkpoint save that runs out of space fails deep inside torch's zip writer (``unexpected pos``)
or with ``[Errno 28]``, neither of which names the folder or says how much room a save needs. The
save and the start-up check turn such failures into one ``StorageError`` that names the path, the
bytes a checkpoint of the run needs and the bytes free, so the fix (free space, move the run) is
clear; what was already on disk is untouched and the run resumes from its last complete checkpoint.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from powerclip.checkpoints import integrity
from powerclip.checkpoints.discovery import CheckpointError
from powerclip.checkpoints.layout import PointerError, list_tags, read_latest

_FULL = {errno.ENOSPC, errno.EDQUOT}
# torch's zip writer reports a short write as one of these, without the errno
_TORCH_WRITE = ("unexpected pos", "file write failed")


class StorageError(CheckpointError):
    """The file system refused a write (out of space, over quota, read-only); the message names the
    path and, for space, the bytes needed and free."""


def size_text(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def free_bytes(path: Path) -> int:
    """Bytes free to an unprivileged writer on the file system holding ``path`` (or its nearest
    existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_bytes(ckpt_dir: Path) -> int | None:
    """The size of the run's newest complete checkpoint (what the next save will need), from its
    manifest; None when there is none."""
    try:
        latest = read_latest(ckpt_dir)
    except PointerError:
        latest = None
    tags = list_tags(ckpt_dir)
    for tag in ([latest] if latest in tags else []) + list(reversed(tags)):
        try:
            files = integrity.parse_manifest(ckpt_dir / tag / integrity.MANIFEST)
        except integrity.CheckpointIntegrityError:
            continue
        return sum(e["size"] for e in files.values())
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def as_storage_error(exc: BaseException, path: Path, needed: int, resume_hint: str) -> StorageError | None:
    """``exc`` (raised while writing under ``path``) as a one-line ``StorageError``, or None when it
    is not a file-system refusal. ``needed``: bytes the write needs; ``resume_hint``: what a rerun
    resumes from."""
    chain = _chain(exc)
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    text = " ".join(str(e) for e in chain)
    free = free_bytes(path)
    if errno.EROFS in codes:
        return StorageError(f"{path}: the file system is read-only, the checkpoint cannot be written; make it "
                            f"writable (or use another train.run_dir) and rerun: {resume_hint}")
    torch_write = any(s in text for s in _TORCH_WRITE)
    if codes & _FULL or (torch_write and free < needed):
        return StorageError(f"{path}: out of disk space while saving the checkpoint: it needs about "
                            f"{size_text(needed)}, {size_text(free)} free; free space (or lower "
                            f"checkpoint.keep_last, or move train.run_dir) and rerun: {resume_hint}")
    if torch_write or codes:
        reason = next((str(e).splitlines()[0] for e in chain if str(e).strip()), type(exc).__name__)
        return StorageError(f"{path}: writing the checkpoint failed ({reason[:200]}); {size_text(free)} "
                            f"free; rerun: {resume_hint}")
    return None


def check_space(ckpt_dir: Path, needed: int, what: str) -> None:
    """Refuse to start a run whose next checkpoint cannot fit (before anything is written)."""
    free = free_bytes(ckpt_dir)
    if free < needed:
        raise StorageError(f"{ckpt_dir}: not enough disk space for a checkpoint: {what} needs about "
                           f"{size_text(needed)}, {size_text(free)} free; free space (or move train.run_dir) "
                           "and rerun (nothing was written)")
