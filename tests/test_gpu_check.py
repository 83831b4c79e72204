"""tools/gpu_check.py off the GPU: its CPU smoke run of the numerics section (the real code path at toy
size: scores against a float64 reference, the table and the results files), its reporting of sections
that did not run, and the BENCHMARKS.md section it appends and tools/bench_train.py keeps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp: Path, *args: str, timeout: float = 300, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    env.pop("OUT", None)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--out-dir",
                           str(tmp / "out"), "--work", str(tmp / "work"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


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


def test_bench_variants_cover_every_precision_choice_and_merge_duplicates():
    from powerclip.config import choices
    from tools.bench_breakdown import Variant, lowest_stage, parse_variant, variants

    vs = variants({"precision": "bf16", "zero_stage": 1, "compile": False}, [parse_variant("big=data.batch_size=512")])
    names = [v.name for v in vs]
    for mode in choices("train.precision"):  # a precision mode added to the config is measured too
        at = f"{mode} ZeRO-{lowest_stage(mode)}"  # half weights at ZeRO-1: refused at ZeRO-0
        assert any(n.split(" = ")[0] == at or f" = {at}" in n for n in names), (mode, names)
    assert names[0] == "today (bf16, ZeRO-1) = bf16 ZeRO-1"  # the preset's recipe is the ZeRO-1 variant
    assert Variant("bf16 ZeRO-1 compile", ["train.compile=true"]) in vs
    assert vs[-1] == Variant("big", ["data.batch_size=512"])
    assert len({tuple(v.overrides) for v in vs}) == len(vs)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cpu_smoke_bench_runs_every_measurement(tmp_path: Path):
    """The bench section end to end at toy size: every model-only variant split into forward, backward and
    optimizer, both loaders, both trainers end to end, the profiler trace, and gpu_check's rows."""
    from powerclip.config import choices
    from tools.bench_breakdown import lowest_stage

    # the check's own temporary folder, looked at afterwards; a short path: the loader's workers pass file
    # descriptors over AF_UNIX sockets made under it, whose paths may not pass 107 bytes (pytest's are long)
    tmpdir = Path(tempfile.mkdtemp(prefix="gc-"))
    try:
        proc = _run(tmp_path, "--only", "bench", timeout=1400, tmpdir=tmpdir)
        assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
        assert not list(tmpdir.glob("bench-breakdown-toy-*")), "the bench left its toy config behind"
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    out = tmp_path / "out"
    res = json.loads((out / "bench_breakdown.json").read_text())
    best = res["model"]["best"]
    assert "open_clip_train step" in best
    for mode in choices("train.precision"):
        assert any(f"{mode} ZeRO-{lowest_stage(mode)}" in name for name in best), (mode, list(best))
    assert any("compile" in name for name in best) and any("ZeRO-1" in name for name in best)
    for name, w in best.items():  # medians: each phase is inside every step, so its median is too
        assert all(0 < w[k] <= w["step"] for k in ("forward", "backward", "optimizer")), (name, w)
    assert res["model"]["errors"] == {} and res["section_errors"] == {}
    assert set(res["loader"]["loaders"]) == {"open_clip", "powerclip", "powerclip_draft"}
    assert all(r["worker_cpu"] > 0 and r["sps"] > 0 for r in res["loader"]["loaders"].values())
    assert res["loader"]["device_decode"]["sps"] > 0
    assert set(res["e2e"]["best_s"]) == {"open_clip_train", "powerclip today"}
    trace = json.loads((out / "profile_step.json").read_text())
    assert any("aten::" in ev.get("name", "") for ev in trace["traceEvents"])
    assert "Self CPU" in (out / "profile_top_kernels.txt").read_text()
    table = (out / "bench_breakdown.md").read_text()
    assert "| open_clip_train step |" in table and "per-core ratio powerclip" in table
    gpu_table = (out / "gpu_check.md").read_text()
    assert "| bench (ok," in gpu_table and "loader per core" in gpu_table and "end to end powerclip today" in gpu_table
