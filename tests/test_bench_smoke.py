"""Smoke test of tools/bench_train.py: the one bench command runs end to end at --quick sizes and
writes its markdown table. Not a timing test: timings on a shared CI machine mean nothing; only the
ZeRO optimiser-state ratio, which is a byte count, is checked as a number."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_train_quick_writes_table(tmp_path: Path):
    out = tmp_path / "BENCHMARKS.md"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--quick", "--threads", "1",
                           "--zero-stages", "0,2", "--no-stock", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=880, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# powerclip training benchmarks")
    assert re.search(r"Machine: .+, \d+ cores", text)
    for row in ("open_clip_train CLIP step", "powerclip CLIP-only step", "powerclip / open_clip throughput ratio",
                "powerclip end to end, real shards", "powerset step / CLIP-only step",
                "concept_npc step / CLIP-only step", "concept_xac step / CLIP-only step",
                "degla step / CLIP-only step", "ZeRO-0, 2 ranks", "ZeRO-2, 2 ranks",
                "data loading, full pipeline"):
        assert row in text, row
    ratio = float(re.search(r"powerclip / open_clip throughput ratio \| \*\*([0-9.]+)\*\*", text).group(1))
    assert ratio > 0
    # ZeRO-2 shards AdamW's state over the 2 ranks: half of ZeRO-0's, up to the flat-buffer padding
    zero = float(re.search(r"ZeRO-2 / ZeRO-0 optimiser state per rank \| \*\*([0-9.]+)\*\*", text).group(1))
    assert zero == pytest.approx(0.5, abs=0.01)


def test_loader_timing_never_reports_zero_worker_cpu():
    """/proc counts worker CPU in whole clock ticks: a loader faster than one tick over the timed batches
    (the draft decoder at toy sizes) measured 0 and the bench's report divided by it. With no worker
    processes at all the floor is exactly one tick."""
    import os

    import torch

    from tools.bench_loader import time_loader

    loader = [(torch.zeros(4, 1),)] * 3  # in-process batches: no worker, no worker CPU
    res = time_loader(loader, batches=2, warm=1)
    assert res["samples"] == 8
    assert res["worker_cpu"] == pytest.approx(1 / os.sysconf("SC_CLK_TCK") / 8)
