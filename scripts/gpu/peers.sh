#!/usr/bin/env bash
# When to run: after changing a peer backend (flash_attn4, flex_flash, xformers), on a lent GPU (H200).
# It installs FlashAttention-4 / xFormers (../shared/tools/peer-wheels.sh prepares them),
# run tests/test_peers.py, and time FA4 / flex_flash / xFormers / attnkit triton / cuDNN on the ANCHORS shapes.
# Budget: under 4 minutes of GPU time (pytest capped at 140 s, the timing table at 90 s: its rows are printed as they come, so a cut run keeps them in the log).
#
# Before this script, on the same warm machine (see peer-wheels.sh's header; each folder fits one 64 MiB carry):
#   call 1 (carry .peers1):  mkdir -p /tmp/peers && cp .peers1/* /tmp/peers/
#   call 2 (carry .peers2):  bash scripts/gpu/peers.sh
# The script runs .peers2/install.sh itself when /tmp/site.path is missing. Results go under $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if [ ! -s /tmp/site.path ]; then
  if [ -x .peers2/install.sh ]; then
    bash .peers2/install.sh 2>&1 | tail -3 | tee "$OUT/peers_install.txt"
  else
    echo "no .peers2/install.sh here (carry .peers2) and no /tmp/site.path: the peers will be unavailable" \
      | tee "$OUT/peers_install.txt"
  fi
fi
[ -s /tmp/site.path ] && export PYTHONPATH=$(cat /tmp/site.path)${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m attnkit info > "$OUT/info.txt" 2>&1; grep -A12 "flash_attn4" "$OUT/info.txt" | head -20

# 1. every claim against the oracle, and the refusals
timeout 140 python3 -m pytest -q -p no:cacheprovider -rs tests/test_peers.py 2>&1 | tee "$OUT/pytest_peers.log" | tail -25

# 2. one timing table, every peer in the same run (bf16; TFLOP/s count visible pairs)
timeout 90 python3 -m attnkit.bench.kernels --out "$OUT/peers_bench" --rounds 2 \
  --shapes "4,16,4096,128;1,16,16384,128;32,16,512,128;4,32,4096,64" \
  --backends "fa4 (flash_attn.cute),attnkit:flash_attn4,attnkit:flex_flash,attnkit:xformers,xformers (direct),attnkit:triton,sdpa_cudnn" \
  > "$OUT/peers_bench.log" 2>&1
echo "bench exit $?"; grep -E "TFLOP/s|Error|error" "$OUT/peers_bench.log" | head -70
