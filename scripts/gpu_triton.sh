#!/usr/bin/env bash
# GPU check of the triton backend, in one call on the device machine (results under $OUT):
#   scripts/gpu_triton.sh [tests|bench|all] [extra args for attnkit.bench.kernels]
# Runs from the repo root with the machine's own torch/triton: PYTHONPATH=src, nothing installed.
set -o pipefail
STAGE=${1:-all}
shift || true
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 ATTNKIT_CACHE_DIR="$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
if [[ $STAGE == tests || $STAGE == all ]]; then
  # block sizes from the shipped table: autotuning every flag combination would take the whole lease
  ATTNKIT_TRITON_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-280} python3 -m pytest tests/test_triton.py -q -n 8 \
    -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tee "$OUT/tests.log" | tail -25
fi
if [[ $STAGE == bench || $STAGE == all ]]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m attnkit.bench.kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -v "^attnkit\|^sdpa\|^flex" | tail -60
fi
