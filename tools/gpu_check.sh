#!/usr/bin/env bash
# The GPU check in one command (see tools/gpu_check.py): ./tools/gpu_check.sh [--only a,b] [--cpu-smoke]
# Results: $OUT/gpu_check.{md,jsonl} (or runs/gpu_check/), the final table appended to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
