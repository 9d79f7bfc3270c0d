#!/usr/bin/env bash
# One device call: every variant group of scripts/gpu_variants.py in its own process, then a summary.
#   VARIANT_VARIANT_GROUPS="fwd fwd_toy bwd" bash scripts/gpu_variants.sh
OUT=${OUT:-variants_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 ATTNKIT_CACHE_DIR="$OUT/cache"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv > "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/env.txt"
for g in ${VARIANT_GROUPS:-fwd fwd_toy bwd}; do
  timeout ${GROUP_TIMEOUT:-150} python3 scripts/gpu_variants.py "$g" "$OUT/rows.jsonl" > "$OUT/$g.log" 2>&1
  echo "$g exit $?" | tee -a "$OUT/status.txt"
done
python3 - "$OUT/rows.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    key = (r["B"], r["H"], r["S"], r["D"], r["causal"], r["group"])
    if "ms" in r and r["err"] < 2e-2 and (key not in best or r["ms"] < best[key]["ms"]):
        best[key] = r
bad = [r for r in rows if "error" in r or r.get("err", 0) >= 2e-2]
for k, r in sorted(best.items()):
    print(*k, r["variant"], r["tile"], f'{r["tflops"]:.0f}', f'x{r["vs_cudnn"]:.2f}', f'err {r["err"]:.1e}')
print("failed or wrong:", len(bad))
for r in bad[:12]:
    print(r["group"], r["S"], r["D"], r["causal"], r["tile"], r.get("error", "")[-160:], r.get("err"))
PY
