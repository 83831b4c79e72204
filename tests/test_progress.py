"""Progress of long work: tqdm's bar on a terminal, plain lines with count, rate and ETA in a log."""

from __future__ import annotations

import io
import re

from powerclip.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_plain_lines_with_rate_and_eta():
    log = io.StringIO()  # not a terminal, as a Slurm log or a file behind `| tee`
    with progress_bar(10, "shards", unit="shard", stream=log, log_every_s=0.0) as bar:
        for _ in range(10):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.strip() for line in lines)  # no blank lines
    assert re.search(r"shards: 100%.*10/10 \[.*shard/s\]", lines[-1]), lines[-1]
    assert any(re.search(r"\d+/10 \[\d\d:\d\d<\d\d:\d\d", line) for line in lines[:-1]), lines  # an ETA


def test_log_lines_are_rate_limited():
    log = io.StringIO()
    with progress_bar(1000, "images", stream=log, log_every_s=3600.0) as bar:
        for _ in range(1000):
            bar.update(1)
    # one interval never passes: the first draw and the closing line only, not one line per update
    assert len(log.getvalue().splitlines()) <= 2
    assert "1000/1000" in log.getvalue().splitlines()[-1]


def test_terminal_gets_tqdm_redraws_and_disabled_prints_nothing():
    term = _Terminal()
    with progress_bar(3, "runs", unit="run", stream=term) as bar:
        bar.update(3)
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()
    quiet = io.StringIO()
    with progress_bar(3, "runs", enabled=False, stream=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
