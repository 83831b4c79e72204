#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): set up ./.venv if needed, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k powerset`).
# Two pytest-xdist workers by default (PYTEST_WORKERS=0: one process): most tests spend their time
# starting Python processes, waiting on ranks or on Slurm, so two share a 2-core machine well. The
# tests that use the Slurm cluster all run on one worker (tests/conftest.py groups them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
# exit code 5 ("no tests collected") is a failure here, as is any failed test
exec .venv/bin/python -m pytest -ra --durations=15 -n "${PYTEST_WORKERS:-2}" --dist loadgroup "$@"
