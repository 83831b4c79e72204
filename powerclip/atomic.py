"""Write a file so that a reader sees its old content or its new content, never half of it.

Run ledgers, evaluation results and benchmark results are read by other processes (a requeued job,
a parent process, a person) while the writer can be killed at any moment. The text goes to a
temporary file next to the target, which is then renamed over it: a rename within one directory is
atomic on POSIX file systems. The temporary name carries the writer's pid, so two processes writing
the same path never write into one temporary file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` by ``text`` in one rename; the parent folder must exist."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """``write_text_atomic`` of ``json.dumps(data, indent=indent)``; unserialisable data leaves
    ``path`` as it was."""
    return write_text_atomic(path, json.dumps(data, indent=indent))
