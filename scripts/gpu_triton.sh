#!/usr/bin/env bash
# GPU check of the triton backend, in one call on the device machine (results under $OUT):
#   scripts/gpu_triton.sh [tests|bench|all] [extra args for attnkit.bench.kernels]
#   scripts/gpu_triton.sh perf    # one lease-sized call: bench (new, and old from .old_triton if present),
#                                 # then the GPU tests; a summary table last
# Runs from the repo root with the machine's own torch/triton: PYTHONPATH=src, nothing installed.
set -o pipefail
STAGE=${1:-all}
shift || true
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 ATTNKIT_CACHE_DIR="$OUT"
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then  # carried test wheels (pytest, hypothesis)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=src:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
run_tests() {  # block sizes from the shipped table: autotuning every flag combination would take the lease
  ATTNKIT_TRITON_AUTOTUNE=0 ATTNKIT_CACHE_DIR=/tmp/ak_tests timeout ${TEST_TIMEOUT:-280} python3 -m pytest \
    tests/test_triton.py -q $XDIST -p no:cacheprovider -W ignore::DeprecationWarning "$@" 2>&1 \
    | tee "$OUT/tests.log" | tail -25
}
bench() {  # bench NAME TIMEOUT args...: kernels.json of the run lands in $OUT/NAME.json
  local name=$1 t=$2
  shift 2
  timeout "$t" python3 -m attnkit.bench.kernels --out "/tmp/bench_$name" "$@" 2>&1 | tee -a "$OUT/bench.log" \
    | grep -v "^attnkit\|^sdpa\|^flex" | tail -30
  cp "/tmp/bench_$name/kernels.json" "$OUT/$name.json" 2>/dev/null
}
if [[ $STAGE == tests || $STAGE == all ]]; then
  run_tests
fi
if [[ $STAGE == bench || $STAGE == all ]]; then
  timeout ${BENCH_TIMEOUT:-420} python3 -m attnkit.bench.kernels --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" \
    | grep -v "^attnkit\|^sdpa\|^flex" | tail -60
fi
if [[ $STAGE == perf ]]; then
  PEERS=${PEERS:-flex,sdpa_cudnn}
  bench new_a 200 --backends attnkit:triton,attnkit:triton_det,$PEERS --shapes "4,16,4096,128;32,32,512,64" \
    ${PERF_ARGS}
  bench new_b 70 --backends attnkit:triton,attnkit:triton_det,sdpa_cudnn --shapes "1,16,16384,128" ${PERF_ARGS}
  if [[ -z $NO_OLD && -d .old_triton/attnkit ]]; then  # the previous version (shipped, already-tuned blocks), same run
    PYTHONPATH=.old_triton ATTNKIT_TRITON_AUTOTUNE=0 bench old 90 --backends attnkit:triton \
      --shapes "4,16,4096,128;1,16,16384,128;32,32,512,64" ${PERF_ARGS}
  fi
  TEST_TIMEOUT=${TEST_TIMEOUT:-150} run_tests
  python3 - "$OUT" <<'PY'
import json, os, sys
rows = []
for name in ("old", "new_a", "new_b"):
    p = os.path.join(sys.argv[1], name + ".json")
    if os.path.exists(p):
        for r in json.load(open(p)):
            r["backend"] = ("old:" if name == "old" else "") + r["backend"]
            rows.append(r)
names = list(dict.fromkeys(r["backend"] for r in rows))
keys = list(dict.fromkeys((r["B"], r["H"], r["S"], r["D"], r["mode"], r["causal"]) for r in rows))
print("TFLOP/s", " ".join(n.replace("attnkit:", "") for n in names))
for k in keys:
    v = {r["backend"]: r["tflops"] for r in rows if (r["B"], r["H"], r["S"], r["D"], r["mode"], r["causal"]) == k}
    print(",".join(map(str, k[:4])), k[4], k[5], " ".join(f"{v.get(n, float('nan')):.1f}" for n in names))
PY
fi
