"""Progress of long work: a tqdm bar on a terminal, plain periodic lines in a log file.

tqdm redraws one line with carriage returns, which a Slurm log or a ``| tee`` file keeps as one
endless line (or thousands of fragments). When stderr is not a terminal the same tqdm bar is
written through a stream that turns each redraw into its own line, at most once every
``log_every_s`` seconds, so a log shows count, rate and ETA in lines a person (and ``grep``) can read.
"""

from __future__ import annotations

import sys
from typing import IO, Any

LOG_EVERY_S = 30.0


class _LineStream:
    """Each tqdm redraw as one newline-terminated line, without carriage returns or blank lines."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                 stream: IO[str] | None = None, log_every_s: float = LOG_EVERY_S) -> Any:
    """A ``tqdm`` bar over ``total`` units (``update(n)``, ``close()``, a context manager).

    On a terminal it is tqdm's own bar; otherwise one plain line every ``log_every_s`` seconds and a
    last one on close. ``enabled=False`` gives a bar that prints nothing (ranks other than 0, tests).
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if not enabled:
        return tqdm(total=total, disable=True)
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return tqdm(total=total, desc=desc, unit=unit, file=_LineStream(stream), mininterval=log_every_s,
                maxinterval=max(log_every_s, 1.0), ascii=True, ncols=100)
