"""Output folders a command may write into, replace, or must leave alone.

No command deletes or overwrites what it did not create: a command that writes a folder of its own
(an export, a shard set, a comparison) accepts a new or empty path, or a folder that it wrote before
(recognised by what the command itself leaves there); anything else is refused before the first
byte is written, and a folder holding a training run or checkpoints always is. A folder that is
replaced is replaced by a swap: the new one is written next to it first, so a failure leaves the
old one whole.

Files and folders follow the process umask, like every other tool, so a team sharing storage can
read them; ``private=True`` (a config key or flag asks for it) makes them readable by the owner only.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from powerclip.errors import UserError


class OutputFolderError(UserError, ValueError):
    """The output path would overwrite or delete something this command did not create."""


def run_content(path: Path) -> str | None:
    """What training state ``path`` holds, if any: a run, checkpoints or a parent of runs."""
    if (path / "checkpoints").is_dir():
        return "a training run (checkpoints/)"
    if (path / "latest").is_file() or any(path.glob("*_model_states.pt")):
        return "checkpoints"
    try:
        children = [c for c in path.iterdir() if c.is_dir()]
    except OSError:
        return None
    for child in children:
        if (child / "checkpoints").is_dir() or (child / "latest").is_file():
            return f"the training run {child.name}/"
    return None


def check_output_dir(out: str | Path, owned: Callable[[Path], bool], what: str, option: str = "--out") -> Path:
    """``out`` resolved, if writing ``what`` there destroys nothing: it does not exist, is an empty
    folder, or ``owned(out)`` says it is a ``what`` this command wrote before. Raises
    ``OutputFolderError`` naming the path and the fix otherwise."""
    out = Path(out).resolve()
    if not out.exists():
        return out
    if not out.is_dir():
        raise OutputFolderError(f"{option} {out}: exists and is not a folder; choose a new folder")
    if not any(out.iterdir()):
        return out
    held = run_content(out)
    if held is not None:
        raise OutputFolderError(f"{option} {out}: holds {held}; refusing to write there (choose a new folder)")
    if not owned(out):
        raise OutputFolderError(f"{option} {out}: exists and is not {what}; refusing to overwrite it "
                                "(choose a new or empty folder)")
    return out


def new_dir_beside(target: Path, private: bool = False) -> Path:
    """A new, empty folder next to ``target`` (same file system, so it can be renamed onto it)."""
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700 if private else 0o777)
    return tmp


def swap_in(new: Path, target: Path, owned: Callable[[Path], bool]) -> Path:
    """Move the finished folder ``new`` to ``target``; an old ``target`` must still be ``owned``
    (checked after it is moved aside, so nothing written there in between is lost) and is deleted
    only once ``new`` is in place. An empty old folder is simply replaced."""
    old = None
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        else:
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            if not owned(old):
                old.rename(target)
                raise OutputFolderError(f"{target}: changed while it was being replaced and is no longer "
                                        "a folder this command wrote; left as it was")
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def make_private(path: Path) -> None:
    """Owner-only access for ``path`` and everything under it (folders 0700, files 0600)."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)


def follow_umask(path: Path) -> None:
    """Give ``path`` (a file) the mode a plain ``open()`` would have: 0666 minus the umask.

    For files written by libraries that create them owner-only (safetensors writes 0600)."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` alone can only
    be read by setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
