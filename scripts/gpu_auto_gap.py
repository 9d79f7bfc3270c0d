"""Why does ``backend="auto"`` read slower than raw cuDNN SDPA where it runs cuDNN (run 8 and 9: the 16k
non-causal forward+backward rows, 5-6%)? Times, with ``attnkit bench kernels``' own step (``prepare``) and
in alternated, rotated rounds, raw cuDNN SDPA, raw cuDNN with an explicit ``scale=``, attnkit pinned to
``sdpa_cudnn`` and attnkit ``auto``; then profiles one raw and one auto step (per-kernel GPU times).

    PYTHONPATH=src python3 scripts/gpu_auto_gap.py [B,H,S,D ...] [c]   # c: causal (default non-causal)
"""

import math
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import attnkit
from attnkit.bench.kernels import prepare

causal = "c" in sys.argv[1:]
shapes = [tuple(int(x) for x in a.split(",")) for a in sys.argv[1:] if "," in a] or [
    (1, 16, 16384, 128),
    (1, 32, 16384, 64),
]


def raw(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def raw_scale(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1 / math.sqrt(q.shape[-1]))


FNS = {
    "raw_cudnn": raw,
    "raw_cudnn_scale": raw_scale,
    "ak_cudnn": lambda q, k, v: attnkit.attention(q, k, v, causal=causal, backend="sdpa_cudnn"),
    "auto": lambda q, k, v: attnkit.attention(q, k, v, causal=causal),
}

for B, H, S, D in shapes:
    for mode in ("fwd_bwd", "fwd"):
        meta = torch.empty(B, H, S, D, device="cuda", dtype=torch.bfloat16)
        print(f"# {B},{H},{S},{D} causal={causal} {mode}: auto picks",
              attnkit.explain(meta, meta, meta, causal=causal).chosen, flush=True)  # fmt: skip
        steps = {n: prepare(f, B, H, S, D, mode, torch.bfloat16, "cuda", True) for n, f in FNS.items()}
        names = list(steps)
        times = {n: [] for n in names}
        for r in range(5):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                times[n].append(do_bench(steps[n], warmup=25, rep=100, return_mode="median"))
        base = sorted(times["raw_cudnn"])[2]
        for n in names:
            ts = sorted(times[n])
            print(f"  {n:<16} median {ts[2]:8.3f} ms  /raw {ts[2] / base:6.3f}  rounds",
                  " ".join(f"{t:.3f}" for t in times[n]), flush=True)  # fmt: skip
        for n in ("raw_cudnn", "auto"):
            step = steps[n]
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            print(f"  -- profile {n} (5 steps)")
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70)
            )
        del steps
        torch.cuda.empty_cache()
