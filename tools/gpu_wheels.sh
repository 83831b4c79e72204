#!/usr/bin/env bash
# Wheels for a bare GPU machine whose python3 (3.12) already has torch but none of powerclip's other
# dependencies, into .whl/ (git-ignored), pinned by constraints.txt. DeepSpeed ships as an sdist: it
# is built here as a pure-Python wheel (DS_BUILD_OPS=0; powerclip uses torch's AdamW, no DS kernels).
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD; ./tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
pin() { grep -i "^$1==" constraints.txt; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin hjson)" "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin typing_extensions)" "$(pin webdataset)" "$(pin braceexpand)" "$(pin open_clip_torch)" "$(pin ftfy)" \
    "$(pin wcwidth)" "$(pin omegaconf)" "$(pin orjson)" "$(pin submitit)" "$(pin timm)"
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || \
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "$(pin deepspeed)" -w .whl
du -sh .whl
