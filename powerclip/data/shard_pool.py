"""Run one function per shard, in this process or a process pool, with a progress bar.

The shard tools (build, annotate, negatives) all share this loop: every shard is independent and
writes its own finished record, so the only choices are how many processes and whether to show a
bar. ``initializer`` runs once per process (a spaCy pipeline or a generator is loaded once, not
once per shard); with one worker it runs here, so the single-process path is the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any


def run_shards(todo: Sequence[Any], work: Callable[[Any], Any], *, workers: int = 1,
               initializer: Callable[..., None] | None = None, initargs: tuple = (), desc: str = "shards",
               progress: bool = True) -> list[Any]:
    """``work(item)`` for every item of ``todo`` (picklable, as ``work`` itself when workers > 1);
    returns the results in completion order. The first error is re-raised: the shards finished
    before it keep their records, so a rerun resumes."""
    if not todo:
        return []
    from powerclip.progress import progress_bar

    out: list[Any] = []
    with progress_bar(len(todo), desc, unit="shard", enabled=progress) as bar:
        if workers <= 1:
            if initializer is not None:
                initializer(*initargs)
            for item in todo:
                out.append(work(item))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers, initializer=initializer, initargs=initargs) as ex:
                for fut in as_completed([ex.submit(work, item) for item in todo]):
                    out.append(fut.result())
                    bar.update(1)
    return out


def check_output_folder(shards: Sequence[Path], out: str | Path) -> Path:
    """``out`` resolved, after refusing what would overwrite or mix shards: an output folder that is
    an input folder, or two input shards with one name (they would land on one output file)."""
    out = Path(out).resolve()
    if any(Path(p).resolve().parent == out for p in shards):
        raise ValueError(f"{out}: the output folder must not be the input folder (write new shards elsewhere)")
    names = [Path(p).name for p in shards]
    if len(set(names)) != len(names):
        raise ValueError("shard names collide in one output folder")
    return out
