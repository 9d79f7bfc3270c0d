#!/usr/bin/env bash
# One call on a lent GPU machine: the whole test suite (CUDA tests included) plus the benchmarks.
# Usage there (from the repo root, with .whl carried):  bash scripts/gpu_check.sh [pytest args...]
# Writes logs and results under $OUT (default ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m attnkit info | tee "$OUT/info.txt"
python3 -m pytest -q -x -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" | tail -40
python3 scripts/gpu_probe.py > "$OUT/probe.log" 2>&1
grep -E "FAIL|ERROR|probe done|re-run" "$OUT/probe.log"
