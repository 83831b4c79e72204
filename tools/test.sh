#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): set up ./.venv if needed, then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k powerset`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
# exit code 5 ("no tests collected") is a failure here, as is any failed test
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
