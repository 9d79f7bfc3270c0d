"""Is backend="auto" as fast as the backend it picks? Alternates raw SDPA (cuDNN) and attnkit auto on the
same inputs several times (clock drift shows as spread between repeats) and prints auto's choice.

    PYTHONPATH=src python3 scripts/gpu_auto_check.py
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit


def check(B, H, S, D):
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    print(B, H, S, D, "causal: auto picks", attnkit.explain(q, k, v, causal=True).chosen)

    def raw():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def auto():
        return attnkit.attention(q, k, v, causal=True)

    def pinned():
        return attnkit.attention(q, k, v, causal=True, backend="sdpa_cudnn")

    for rep in range(3):
        fns = (("raw_cudnn", raw), ("auto", auto), ("ak_cudnn", pinned))
        t = {n: do_bench(f, warmup=25, rep=100, return_mode="median") for n, f in fns}
        ratio = round(t["raw_cudnn"] / t["auto"], 3)
        print("  rep", rep, {n: round(x, 4) for n, x in t.items()}, "auto/raw", ratio)


for shape in [(4, 16, 4096, 128), (1, 16, 16384, 128)]:
    check(*shape)
