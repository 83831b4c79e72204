"""tools/gpu_check.py off the GPU: its CPU smoke run of the numerics section (the real code path at toy
size: scores against a float64 reference, the table and the results files), its reporting of sections
that did not run, and the BENCHMARKS.md section it appends and tools/bench_train.py keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--out-dir",
                           str(tmp / "out"), "--work", str(tmp / "work"), *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_cpu_smoke_numerics_writes_table_and_results(tmp_path: Path):
    proc = _run(tmp_path, "--only", "numerics")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| numerics (ok," in table
    rows = json.loads((tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()[0])["rows"]
    assert len(rows) == 6  # powerset scores, powerset loss, XAC scores; TF32 off and on
    for name, value, verdict in rows:
        assert verdict.endswith("ok"), (name, value)
        assert float(value.split()[0]) < 1e-4  # fp32 against float64 at toy size: rounding only
    assert "gpu_check: 1/1 sections ok" in proc.stdout


def test_sections_out_of_budget_are_reported_and_fail(tmp_path: Path):
    proc = _run(tmp_path, "--only", "numerics,bench", "--budget-s", "1")
    assert proc.returncode == 1
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| numerics (NOT RUN, 0 s) | - | skipped:" in table
    assert "| bench (NOT RUN, 0 s) | - | skipped:" in table
    assert "failed or not run: numerics, bench" in proc.stdout


def test_unknown_section_is_refused(tmp_path: Path):
    proc = _run(tmp_path, "--only", "numerics,nope")
    assert proc.returncode == 2 and "unknown sections ['nope']" in proc.stderr


def test_gpu_tables_append_under_one_heading_and_survive_bench_rewrite(tmp_path: Path):
    from tools import bench_train, gpu_check

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# powerclip training benchmarks\n\n| a | b |\n")
    gpu_check.append_to_benchmarks(md, "### GPU check, run 1\n")
    gpu_check.append_to_benchmarks(md, "### GPU check, run 2\n")
    text = md.read_text()
    assert text.count(gpu_check.GPU_CHECK_HEADING) == 1
    assert text.index("run 1") < text.index("run 2")
    assert gpu_check.GPU_CHECK_HEADING == bench_train.GPU_CHECK_HEADING
    tail = bench_train.gpu_check_tail(md)
    assert tail.lstrip().startswith(gpu_check.GPU_CHECK_HEADING) and "run 2" in tail and "| a | b |" not in tail
    assert bench_train.gpu_check_tail(tmp_path / "missing.md") == ""
