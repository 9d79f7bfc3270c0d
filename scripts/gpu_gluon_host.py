"""Short-sequence forward through the Gluon path, layer by layer: the kernel call alone, attnkit's op body,
and the public API, each as GPU time per call (do_bench median) and as host time per call (enqueue rate,
no sync); the plain-Triton forward beside them; then a cProfile of the API call.

    PYTHONPATH=src python3 scripts/gpu_gluon_host.py
"""

import cProfile
import io
import os
import pstats
import time

import torch
from triton.testing import do_bench

import attnkit
from attnkit.backends.triton.ops import attention as ops


def host_us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def one_shape(gluon, B, H, S, D, causal):
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    scale = D**-0.5
    cases = {
        "gluon_forward": lambda: gluon.gluon_forward(q, k, v, "bhsd", scale, causal),
        "ops._triton_fwd": lambda: ops._triton_fwd(
            q, k, v, None, None, None, None, "bhsd", S, S, scale, causal, -1, -1, 0.0, 0.0
        ),
        "attnkit.attention": lambda: attnkit.attention(q, k, v, causal=causal, backend="triton"),
    }
    flops = 4 * B * H * S * S * D / (2 if causal else 1)
    for name, fn in cases.items():
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{B},{H},{S},{D} causal={causal} {name}: {flops / ms / 1e9:.0f} TFLOP/s, "
              f"{ms * 1e3:.0f} us GPU-timed, {host_us(fn):.0f} us host")  # fmt: skip
    os.environ["ATTNKIT_TRITON_GLUON"] = "0"
    fn = cases["attnkit.attention"]
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    print(f"{B},{H},{S},{D} causal={causal} plain triton (GLUON=0): {flops / ms / 1e9:.0f} TFLOP/s, "
          f"{ms * 1e3:.0f} us, {host_us(fn):.0f} us host")  # fmt: skip
    del os.environ["ATTNKIT_TRITON_GLUON"]


def main():
    gluon = ops._gluon()
    for shape in ((32, 16, 512, 128, False), (32, 16, 512, 128, True), (32, 32, 512, 64, False),
                  (32, 32, 512, 64, True), (4, 16, 4096, 128, False)):  # fmt: skip
        one_shape(gluon, *shape)
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in "qkv")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        attnkit.attention(q, k, v, causal=True, backend="triton")
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())


if __name__ == "__main__":
    main()
