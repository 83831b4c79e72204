"""Names and pointers of a checkpoint folder: tag folders, the ``latest`` file, model-state files.

DeepSpeed's own layout, so ``zero_to_fp32`` and every reader here agree on it::

    ROOT/step_00001000/   mp_rank_00_model_states.pt (ZeRO-3: zero_pp_rank_0_mp_rank_00_model_states.pt),
                          *_optim_states.pt (one per rank with ZeRO >= 1), checksums.json
    ROOT/latest           the tag of the newest complete checkpoint

``latest`` is written by the trainer, not by DeepSpeed, and only after the checkpoint is sealed,
through a temporary file and ``os.replace`` so that a reader never sees half a tag.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from powerclip.errors import UserError

TAG_RE = re.compile(r"^step_(\d{8,})$")
# what ``latest`` may name: one folder beside it (DeepSpeed's own saves use tags such as
# ``global_step100``), never a path that leads elsewhere
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,255}$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def tag_step(tag: str) -> int:
    """The step a tag names; -1 for a folder name that is not a step tag."""
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else -1


def list_tags(root: Path) -> list[str]:
    """Tag folders (``step_XXXXXXXX``) under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=tag_step)


class PointerError(UserError, ValueError):
    """``latest`` holds something other than one tag name (binary garbage, a path, two lines...);
    the message names the file. Readers treat it like a damaged checkpoint: resume falls back,
    reading weights refuses."""


def read_latest(root: Path) -> str | None:
    """The tag ``root/latest`` names; None when the file is missing or empty.

    Raises ``PointerError`` when it holds anything but one folder name: a pointer such as
    ``../other_run/step_1`` would otherwise lead a reader out of this checkpoint root."""
    f = root / "latest"
    if not f.is_file():
        return None
    try:
        text = f.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise PointerError(f"{f}: not a text file naming a checkpoint tag (damaged?)") from None
    if not text:
        return None
    if not NAME_RE.match(text) or text in (".", ".."):
        raise PointerError(f"{f}: holds {text[:60]!r}, not the name of a checkpoint folder beside it such as "
                           "'step_00001000' (damaged?)")
    return text


def write_latest(root: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (tmp file + fsync + rename)."""
    tmp = root / f".latest.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / "latest")
    finally:  # a full disk must not leave the temporary file behind
        tmp.unlink(missing_ok=True)


def is_tag_dir(path: Path) -> bool:
    """``path`` is one DeepSpeed checkpoint (it holds a model-states file)."""
    return any(path.glob("*model_states.pt"))


def model_states_file(tag_dir: Path) -> Path:
    """Rank 0's model-states file: module weights (stage 0-2), shapes, client state."""
    stage3 = tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return stage3 if stage3.is_file() else tag_dir / "mp_rank_00_model_states.pt"
