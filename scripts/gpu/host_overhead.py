"""Host (CPU) time per attnkit call at a tiny shape, where the GPU work is negligible, and where it goes.

When to run: after a change to the call path (validation, dispatch, launchers, the launch cache), on a GPU
machine, and as part of ``scripts/gpu/final.sh``: short sequences are host-bound, and their rows of the
kernel table move with this number. Prints wall microseconds per call (forward without grad, forward+
backward, backward alone) for each backend named (default: triton, sdpa_cudnn, flex), then a cProfile of
the first backend's forward+backward (top functions by own time). Only the public API is called.

    PYTHONPATH=src python3 scripts/gpu/host_overhead.py [backend ...]
"""

import cProfile
import pstats
import sys
import time

import torch

import attnkit


def per_call_us(fn, n=200, warmup=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def cases(backend):
    q, k, v = (
        torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return attnkit.attention(q, k, v, causal=True, backend=backend)

    def fwd_bwd():
        out = attnkit.attention(q, k, v, causal=True, backend=backend)
        return torch.autograd.grad(out, (q, k, v), do)

    out = attnkit.attention(q, k, v, causal=True, backend=backend)

    def bwd():
        return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

    return {"fwd (no grad)": fwd, "fwd_bwd": fwd_bwd, "bwd": bwd}


def main():
    backends = sys.argv[1:] or ["triton", "sdpa_cudnn", "flex"]
    for backend in backends:
        for name, fn in cases(backend).items():
            print(f"{backend:<12} {name:<14} {per_call_us(fn):7.0f} us per call")
    fwd_bwd = cases(backends[0])["fwd_bwd"]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
