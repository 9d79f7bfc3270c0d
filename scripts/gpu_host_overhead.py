"""Host (CPU) time per attnkit call at a tiny shape, where the GPU work is negligible, and where it goes
(cProfile, top functions by own time). Prints wall microseconds per call for forward and forward+backward.

    PYTHONPATH=src python3 scripts/gpu_host_overhead.py [backend]
"""

import cProfile
import pstats
import sys
import time

import torch

import attnkit


def _bwd_args(q, k, v, out, do):
    """Positional arguments of ops.triton_bwd for a causal bhsd call (row stats from a forward)."""
    from attnkit.backends.triton.ops import attention as ops

    S = q.shape[2]
    o, _lse, rng, stats = ops.triton_fwd(
        q, k, v, None, None, None, None, "bhsd", S, S, q.shape[-1] ** -0.5, True, -1, 0, 0.0, 0.0
    )
    return (do, q, k, v, o, stats, None, None, None, None, None, rng, "bhsd", S, S, q.shape[-1] ** -0.5,
            True, -1, 0, 0.0, 0.0, False)  # fmt: skip


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "triton"
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

    cases = [("fwd", fwd), ("fwd_bwd", fwd_bwd), ("bwd", bwd)]
    if backend == "triton":
        import gc
        import os

        from attnkit.backends.triton.ops import attention as ops

        saved = out.grad_fn  # the autograd node holds what the custom op saved; call the op's body directly
        args = _bwd_args(q, k, v, out, do)
        cases.append(("triton_bwd body", lambda: ops._triton_bwd(*args)))
        cases.append(("triton_bwd op", lambda: ops.triton_bwd(*args)))

        def no_streams():
            os.environ["ATTNKIT_TRITON_BWD_STREAMS"] = "0"
            try:
                return bwd()
            finally:
                os.environ.pop("ATTNKIT_TRITON_BWD_STREAMS")

        def no_gc():
            gc.disable()
            try:
                return bwd()
            finally:
                gc.enable()

        cases += [("bwd, no side stream", no_streams), ("bwd, gc off", no_gc)]
        del saved
    for name, fn in cases:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        print(f"{backend} {name}: {(time.perf_counter() - t) / 200 * 1e6:.0f} us per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
