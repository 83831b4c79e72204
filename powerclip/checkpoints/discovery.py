"""What a path a user hands us means: a run folder, a checkpoint root, or one checkpoint.

``powerclip export``, ``powerclip eval --model``, ``model.pretrained=`` and ``checkpoint.resume=``
all accept the same three forms, and all classify them here (``locate``), so a folder that one
command accepts is never refused by another:

* a run folder: ``RUN/checkpoints`` holds the checkpoints and ``RUN/config.yaml`` the config;
* a checkpoint root: the folder holding ``latest`` and/or ``step_*`` tag folders;
* one tag folder (it holds ``*model_states.pt``).

Which tag of a root to read differs by use: reading weights (``resolve_checkpoint``) follows
``latest`` strictly; resuming a run falls back past a damaged ``latest`` (``integrity``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from powerclip.checkpoints.layout import PointerError, is_tag_dir, list_tags, read_latest
from powerclip.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A path is not a usable checkpoint; the message names the path and what is missing."""


@dataclass
class CheckpointRef:
    root: Path  # the folder passed to engine.save_checkpoint (holds ``latest``)
    tag: str | None  # the sub-folder of one checkpoint; None: not chosen yet (a root or run folder)
    config: Path  # where the run's resolved config.yaml would be

    @property
    def dir(self) -> Path:
        if self.tag is None:
            raise CheckpointError(f"{self.root}: no checkpoint tag chosen")
        return self.root / self.tag


def locate(path: Path, tag: str | None = None) -> CheckpointRef | None:
    """Classify ``path`` as a run folder, a checkpoint root or one tag folder; None if none of them.

    ``tag`` (a tag folder name under a root) makes a root without ``latest`` recognisable."""
    if (path / "checkpoints").is_dir():
        return CheckpointRef(path / "checkpoints", None, path / "config.yaml")
    if (path / "latest").is_file() or list_tags(path) or (tag and (path / tag).is_dir()):
        return CheckpointRef(path, None, path.parent / "config.yaml")
    if is_tag_dir(path):
        return CheckpointRef(path.parent, path.name, path.parent.parent / "config.yaml")
    return None


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointRef:
    """(root, tag, config.yaml) of the checkpoint to read weights from: ``tag`` if given, else the
    one ``latest`` names (no fallback: reading weights never guesses which checkpoint was meant)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder (expected a run folder or a DeepSpeed checkpoint)")
    ref = locate(path, tag)
    if ref is None:
        raise CheckpointError(f"{path}: neither a run folder (checkpoints/), a checkpoint root (latest) "
                              f"nor a checkpoint folder (*model_states.pt)")
    if ref.tag is None:
        ref.tag = tag or _strict_latest(ref.root)
    return ref


def _strict_latest(root: Path) -> str:
    if not (root / "latest").is_file():
        raise CheckpointError(f"{root}: no 'latest' file (is this a checkpoint root?)")
    try:
        tag = read_latest(root)
    except PointerError as e:
        raise CheckpointError(f"{e}; repair it, or name one checkpoint folder to read") from None
    if not tag:
        raise CheckpointError(f"{root}/latest is empty")
    if not (root / tag).is_dir():
        raise CheckpointError(f"{root}/latest points to {tag!r}, which does not exist")
    return tag
