#!/usr/bin/env bash
# When to run: at the end of any change to kernels, dispatch or the benchmarks, on a GPU machine (the lead's
# device calls). Each stage fits one 600 s device call; run both. From the repo root:
#   STAGE=bench bash scripts/gpu/final.sh   # environment, host time per call (HOST=0 skips it), the kernel
#                                            # table with every peer (attnkit bench kernels --quick), and
#                                            # auto against raw cuDNN (AUTO=0 skips it)
#   STAGE=tests bash scripts/gpu/final.sh   # the whole test suite on the GPU (CUDA tests included)
# Results land in $OUT (default final_out): env.txt, host.txt, kernels.{csv,json,png}, bench.log,
# auto_check.txt, tests.log. A kept run goes to docs/results/DATE-GPU/ with a row in docs/results/README.md.
# Carried wheels in .whl/ (pytest-xdist, hypothesis & co) are installed into /tmp/site when present.
OUT=${OUT:-final_out}
mkdir -p "$OUT"
export ATTNKIT_CACHE_DIR="$OUT/c" PYTHONUNBUFFERED=1 PYTHONPATH=src
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=src:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv | tee "$OUT/env.txt"
python3 -m attnkit info | tee -a "$OUT/env.txt" | head -8
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
if [[ ${STAGE:-bench} == bench ]]; then
  if [[ ${HOST:-1} == 1 ]]; then
    timeout 120 python3 scripts/gpu/host_overhead.py 2>&1 | head -40 | tee "$OUT/host.txt"
  fi
  timeout ${BENCH_TIMEOUT:-300} python3 -m attnkit.bench.kernels --quick --out "$OUT" 2>&1 \
    | tee "$OUT/bench.log" | tail -30
  if [[ ${AUTO:-1} == 1 ]]; then
    timeout 120 python3 scripts/gpu/auto_check.py 2>&1 | tee "$OUT/auto_check.txt"
  fi
else
  timeout ${TEST_TIMEOUT:-540} python3 -m pytest tests -q $XDIST -p no:cacheprovider \
    -W ignore::DeprecationWarning 2>&1 | tee "$OUT/tests.log" | tail -12
fi
