#!/usr/bin/env bash
# The device calls at the end of a kernel change (carry .whl: hypothesis & co). Each part fits one call
# (600 s):
#   STAGE=bench bash scripts/gpu_final.sh   # host time per launch and per call (HOST=0 skips it), the kernel
#                                            # table with every peer (attnkit bench kernels --quick), the
#                                            # triton GPU tests
#   STAGE=tests bash scripts/gpu_final.sh   # the rest of the test suite on the GPU
OUT=${OUT:-final_out}
mkdir -p "$OUT"
export ATTNKIT_CACHE_DIR="$OUT/c" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/hypothesis-*.whl \
  .whl/sortedcontainers-*.whl .whl/attrs-*.whl 2>&1 | tail -2
TRITON_TESTS="tests/test_triton.py tests/test_triton_launch.py tests/test_dispatch.py"
if [[ ${STAGE:-bench} == bench ]]; then
  if [[ ${HOST:-1} == 1 ]]; then  # HOST=0 skips the host-time probe (about 2 minutes)
    PYTHONPATH=src timeout 120 python3 scripts/gpu_host_breakdown.py 2>&1 | head -34 | tee "$OUT/host.txt"
  fi
  BENCH_TIMEOUT=${BENCH_TIMEOUT:-250} OUT=$OUT bash scripts/gpu_triton.sh bench --quick 2>&1 | tail -27
  PYTHONPATH=src:/tmp/site ATTNKIT_TRITON_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-200} python3 -m pytest $TRITON_TESTS \
    -q -n 16 -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tee "$OUT/tests_triton.log" | tail -6
else
  ignore=$(for t in $TRITON_TESTS; do printf -- "--ignore=%s " "$t"; done)
  PYTHONPATH=src:/tmp/site timeout ${TEST_TIMEOUT:-480} python3 -m pytest tests $ignore -q -n 16 \
    -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tee "$OUT/tests.log" | tail -8
fi
