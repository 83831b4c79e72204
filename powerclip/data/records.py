"""Reading back the json records the shard tools keep beside their output (settings, plans, one
record per finished shard), with their shape checked.

The two kinds fail differently. A shard's finished record is a cache: when it is truncated or of the
wrong shape the shard is simply redone (one warning line names the file). A settings or plan file
pins what the whole folder was made with, and nothing can rebuild it: a damaged one is refused in
one line naming the file and the two ways out.

A shape is a type (or tuple of types), a ``dict`` of key -> shape (keys ending in ``?`` may be
absent; other keys are allowed), ``ListOf(shape)`` or ``MapOf(shape)`` (string keys).
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)


class DamagedRecordError(UserError, ValueError):
    """A settings or plan file of a shard tool's output folder that cannot be read back."""


@dataclass(frozen=True)
class ListOf:
    """A list whose every item has the shape ``item``."""

    item: Any


@dataclass(frozen=True)
class MapOf:
    """An object of any keys whose every value has the shape ``value`` (counts by name)."""

    value: Any


def _check(value: Any, shape: Any, where: str) -> None:
    """Raise ValueError naming the first place where ``value`` does not have ``shape``."""
    if isinstance(shape, ListOf):
        if not isinstance(value, list):
            raise ValueError(f"{where or 'the top level'} is not a list")
        for i, v in enumerate(value):
            _check(v, shape.item, f"{where}[{i}]")
    elif isinstance(shape, MapOf):
        if not isinstance(value, dict):
            raise ValueError(f"{where or 'the top level'} is not an object")
        for k, v in value.items():
            _check(v, shape.value, f"{where}[{k!r}]")
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{where or 'the top level'} is not an object")
        for key, sub in shape.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                raise ValueError(f"{where + '.' if where else ''}{name} is missing")
            _check(value[name], sub, f"{where + '.' if where else ''}{name}")
    elif not isinstance(value, shape) or (isinstance(value, bool) and bool not in _types(shape)):
        raise ValueError(f"{where or 'the top level'} is a {type(value).__name__}, not {_names(shape)}")


def _types(shape: Any) -> tuple:
    return shape if isinstance(shape, tuple) else (shape,)


def _names(shape: Any) -> str:
    return " or ".join(t.__name__ for t in _types(shape))


def parse(path: Path, shape: Any, gz: bool = False) -> Any:
    """The json in ``path`` (gzip-compressed when ``gz``), checked against ``shape``; ValueError (or
    OSError when unreadable) with the reason otherwise."""
    data = Path(path).read_bytes()
    try:
        value = json.loads(gzip.decompress(data) if gz else data)
    except (ValueError, EOFError, OSError, zlib.error) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise ValueError(f"not readable json ({type(e).__name__})") from None
    _check(value, shape, "")
    return value


def read_finished(path: Path, shape: Any, gz: bool = False) -> Any | None:
    """A finished record, or None when it is absent or damaged (a warning names the file): the
    caller redoes the shard, which writes the record anew."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return parse(path, shape, gz)
    except (ValueError, OSError) as e:
        log.warning("%s: damaged record (%s); redoing the work it records", path, e)
        return None


def read_pinned(path: Path, shape: Any, tool: str) -> Any:
    """A settings or plan file, or DamagedRecordError naming the file and the fix."""
    try:
        return parse(Path(path), shape)
    except ValueError as e:
        raise DamagedRecordError(
            f"{path} is damaged ({e}): restore it, or delete it and rerun {tool} with the same inputs "
            "and settings (or start over in an empty output folder)") from None
