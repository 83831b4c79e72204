"""train.keep_freed_host_memory: after glibc's thresholds are raised, a step's freed tensors are
reused instead of being unmapped and page-faulted back in (counted with getrusage, in a fresh
process so that the pytest process keeps its allocator untouched)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, torch
from powerclip.train.host_memory import keep_freed_host_memory

def faults_per_step():
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        acts = [torch.ones(16 * 2**20 // 4) for _ in range(6)]  # 6 x 16 MB, written: like activations
        grad = torch.ones(100 * 2**20 // 4)  # 100 MB: above any dynamic mmap threshold
        del acts, grad
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])  # steady state, after the first step

stock = faults_per_step()
ok = keep_freed_host_memory()
faults_per_step()  # the first step after the change maps the memory once more
kept = faults_per_step()
print(json.dumps({"ok": ok, "stock": stock, "kept": kept}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc only")
def test_freed_memory_is_reused_between_steps():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=300)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["ok"]
    # 196 MB written per step: ~50k 4 KB pages fault in every step with glibc's defaults
    assert res["stock"] > 20_000, res
    assert res["kept"] < res["stock"] / 20, res
