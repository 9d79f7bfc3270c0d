"""Is backend="auto" as fast as the backend it picks? Alternates raw SDPA (cuDNN), attnkit auto and attnkit
pinned to cuDNN and to our Triton kernels on the same inputs several times (clock drift shows as spread
between repeats) and prints auto's choice. Forward by default; ``fwd_bwd`` times forward+backward; ``nc``
drops the causal mask.

    PYTHONPATH=src python3 scripts/gpu_auto_check.py [fwd_bwd] [nc] [d64]   # d64: the head-dim-64 shapes
"""

import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit


def check(B, H, S, D, causal, backward):
    q, k, v = (
        torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=backward) for _ in range(3)
    )
    do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    print(B, H, S, D, f"causal={causal} backward={backward}: auto picks",
          attnkit.explain(q, k, v, causal=causal).chosen)  # fmt: skip

    def timed(f):
        def go():
            out = f()
            if backward:
                torch.autograd.grad(out, (q, k, v), do)

        return go

    def raw():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    fns = (
        ("raw_cudnn", timed(raw)),
        ("auto", timed(lambda: attnkit.attention(q, k, v, causal=causal))),
        ("ak_cudnn", timed(lambda: attnkit.attention(q, k, v, causal=causal, backend="sdpa_cudnn"))),
        ("ak_triton", timed(lambda: attnkit.attention(q, k, v, causal=causal, backend="triton"))),
    )
    for rep in range(3):
        t = {n: do_bench(f, warmup=25, rep=100, return_mode="median") for n, f in fns}
        print(
            "  rep",
            rep,
            {n: round(x, 4) for n, x in t.items()},
            "raw/auto",
            round(t["raw_cudnn"] / t["auto"], 3),
        )


SHAPES = (
    [(4, 32, 4096, 64), (1, 32, 16384, 64)]
    if "d64" in sys.argv
    else [(4, 16, 4096, 128), (1, 16, 16384, 128)]
)
for shape in SHAPES:
    check(*shape, causal="nc" not in sys.argv, backward="fwd_bwd" in sys.argv)
