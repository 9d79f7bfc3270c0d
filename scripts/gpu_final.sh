#!/usr/bin/env bash
# One device call at the end of a kernel change: host overhead per call, the kernel table with every peer
# (attnkit bench kernels --quick), then the whole test suite on the GPU. Carry .whl (hypothesis & co).
#   OUT=... bash scripts/gpu_final.sh
OUT=${OUT:-final_out}
mkdir -p "$OUT"
export ATTNKIT_CACHE_DIR="$OUT/c" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/hypothesis-*.whl \
  .whl/sortedcontainers-*.whl .whl/attrs-*.whl 2>&1 | tail -2
PYTHONPATH=src python3 scripts/gpu_host_overhead.py triton 2>&1 | head -7 | tee "$OUT/host.txt"
BENCH_TIMEOUT=${BENCH_TIMEOUT:-220} OUT=$OUT bash scripts/gpu_triton.sh bench --quick 2>&1 | tail -27
PYTHONPATH=src:/tmp/site timeout ${TEST_TIMEOUT:-300} python3 -m pytest tests -q -n 8 -p no:cacheprovider \
  -W ignore::DeprecationWarning 2>&1 | tee "$OUT/tests.log" | tail -8
