"""Where the host time of one Triton-backend launch goes, piece by piece (GPU machine, tiny shape).

Records the arguments of one real launch of each kernel (forward, delta preprocess, dK/dV, dQ), then times,
per launch: Triton's whole ``kernel[grid](...)``, its argument binder alone, its cache-key step, a direct
call of the compiled kernel's launcher with the bound arguments, and attnkit's ``_launch.Launch``. Also the
stream calls of the backward's side-stream path, a CUDA ``torch.empty``, and a cProfile of forward+backward.

    PYTHONPATH=src python3 scripts/gpu_host_breakdown.py
"""

import cProfile
import io
import pstats
import time

import torch

import attnkit
from attnkit.backends.triton.ops import attention as ops


def per_call(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


class Recorder:
    """Stands in for a JITFunction for one call: records (grid, args, kwargs), then launches for real."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        def go(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
            return self.fn[grid](*args, **kwargs)

        return go


class Dummy(torch.autograd.Function):
    """The cheapest Python autograd.Function on CUDA tensors: what the engine and its device thread cost."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        return g, g, g


def threads_and_engine(q, k, v, do, fwd_bwd):
    import sys
    import threading

    print("python threads:", [t.name for t in threading.enumerate()])
    out = attnkit.attention(q, k, v, causal=True, backend="triton")
    cases = {
        "fwd, no grad": lambda: attnkit.attention(
            q.detach(), k.detach(), v.detach(), causal=True, backend="triton"
        ),
        "fwd, grad (graph dropped)": lambda: attnkit.attention(q, k, v, causal=True, backend="triton"),
        "bwd on a kept graph": lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
        "fwd+bwd": fwd_bwd,
        "dummy Function fwd+bwd": lambda: torch.autograd.grad(Dummy.apply(q, k, v), (q, k, v), do),
        "ops.attention fwd+bwd (no api)": lambda: torch.autograd.grad(
            ops.attention(
                q, k, v, None, None, None, None, "bhsd", 128, 128, 0.125, True, -1, 0, 0.0, 0.0, False
            )[0],
            (q, k, v),
            do,
        ),  # fmt: skip
    }
    for name, fn in cases.items():
        print(f"{name}: {per_call(fn):.0f} us")
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    print(f"fwd+bwd, switch interval 1 us: {per_call(fwd_bwd):.0f} us")
    sys.setswitchinterval(old)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fwd_bwd()
        torch.cuda.synchronize()
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 20
    print(f"GPU time per fwd+bwd (sum of device ops): {gpu:.0f} us")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:8]:
        print(f"  {e.key[:60]}: {e.self_device_time_total / 20:.1f} us, {e.count / 20:.0f} per call")


def split_fwd_bwd(q, k, v, do, n=300):
    """Where a forward+backward's host time goes when the graph is built and freed every call: the
    forward call, the ``autograd.grad`` call, and inside them our op bodies (wrapped with timers)."""
    import gc
    import os

    spent = {"_triton_fwd": 0.0, "_triton_bwd": 0.0}
    real = {name: getattr(ops, name) for name in spent}

    def timed(name):
        def go(*a, **kw):
            t = time.perf_counter()
            try:
                return real[name](*a, **kw)
            finally:
                spent[name] += time.perf_counter() - t

        return go

    def run(label, backward):
        for name in spent:
            spent[name] = 0.0
        t_f = t_b = 0.0
        for i in range(n + 20):
            if i == 20:
                torch.cuda.synchronize()
                t_f = t_b = 0.0
                for name in spent:
                    spent[name] = 0.0
            t0 = time.perf_counter()
            out = attnkit.attention(q, k, v, causal=True, backend="triton")
            t1 = time.perf_counter()
            backward(out)
            t_b += time.perf_counter() - t1
            t_f += t1 - t0
        torch.cuda.synchronize()
        body = ", ".join(f"{k_} {v_ / n * 1e6:.0f}" for k_, v_ in spent.items())
        print(f"{label}: forward call {t_f / n * 1e6:.0f} us, backward call {t_b / n * 1e6:.0f} us ({body})")

    for name in spent:
        setattr(ops, name, timed(name))
    try:
        run("autograd.grad", lambda out: torch.autograd.grad(out, (q, k, v), do))
        run("out.backward", lambda out: out.backward(do))
        os.environ["ATTNKIT_TRITON_BWD_STREAMS"] = "0"
        run("autograd.grad, no side stream", lambda out: torch.autograd.grad(out, (q, k, v), do))
        del os.environ["ATTNKIT_TRITON_BWD_STREAMS"]
        gc.disable()
        run("autograd.grad, gc off", lambda out: torch.autograd.grad(out, (q, k, v), do))
        gc.enable()
    finally:
        for name in spent:
            setattr(ops, name, real[name])


def time_launch(fn, grid, args, kwargs) -> dict:
    """Host us of one launch: whole, binder, cache key, current stream, and the compiled launcher alone."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    kwargs = {k: v for k, v in kwargs.items() if k != "stream"}  # Launch's keyword, not Triton's
    dev = torch.cuda.current_device()
    kernel_cache, kernel_key_cache, target, backend, binder = fn.device_caches[dev]
    kw = dict(kwargs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, options = binder(*args, **kw)
    key = compute_cache_key(kernel_key_cache, spec, options)
    kern = kernel_cache[key]
    vals = tuple(bound.values())
    stream = torch.cuda.current_stream().cuda_stream
    g = tuple(grid) + (1,) * (3 - len(grid))

    def direct():
        kern.run(g[0], g[1], g[2], stream, kern.function, kern.packed_metadata, None, None, None, *vals)

    return {
        "triton launch": per_call(lambda: fn[grid](*args, **kwargs)),
        "binder": per_call(lambda: binder(*args, **kw)),
        "cache key": per_call(lambda: compute_cache_key(kernel_key_cache, spec, options)),
        "current stream": per_call(lambda: torch.cuda.current_stream(dev)),
        "direct launcher": per_call(direct),
    }


def short_shape_probe(B=32, H=16, S=512, D=128):
    """Host-bound or not, at a short shape: per forward+backward step, do_bench's time (the GPU's pace when
    the host keeps up), the host's own time per step (30 steps queued without a sync), and the summed GPU
    kernel time (torch.profiler); alternately with the dQ side stream as shipped (off at this size) and forced
    on."""
    import os

    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    for causal in (False, True):
        q, k, v = (
            torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
        )
        do = torch.randn_like(q)

        def step(causal=causal, q=q, k=k, v=v, do=do):
            out = attnkit.attention(q, k, v, causal=causal, backend="triton")
            return torch.autograd.grad(out, (q, k, v), do)

        for flag in ("auto", "1", "auto", "1"):  # the dQ side stream: off at this size (auto), forced on
            os.environ["ATTNKIT_TRITON_BWD_STREAMS"] = flag
            bench_ms = do_bench(step, warmup=25, rep=100, return_mode="median")
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(30):
                step()
            host_ms = (time.perf_counter() - t) / 30 * 1e3
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.device_time for e in kern) / 10 / 1e3
            names = sorted({e.name[:28] for e in kern})
            print(f"{B},{H},{S},{D} causal={causal} bwd_streams={flag}: do_bench {bench_ms:.3f} ms,", end=" ")
            print(f"host/step {host_ms:.3f} ms, GPU kernels/step {gpu_ms:.3f} ms", end=" ")
            print(f"({len(kern) // 10} launches: {names})")
        os.environ.pop("ATTNKIT_TRITON_BWD_STREAMS")


def main():
    q, k, v = (
        torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
    )
    do = torch.randn_like(q)

    def fwd_bwd():
        out = attnkit.attention(q, k, v, causal=True, backend="triton")
        return torch.autograd.grad(out, (q, k, v), do)

    fwd_bwd()
    recs = {}
    for name in ("attn_fwd", "bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"):
        recs[name] = Recorder(getattr(ops, name))
        setattr(ops, name, recs[name])
    fwd_bwd()
    torch.cuda.synchronize()
    for name, r in recs.items():
        setattr(ops, name, r.fn)
    print(f"fwd+bwd through attnkit: {per_call(fwd_bwd):.0f} us")
    for name, r in recs.items():
        if not r.calls:
            print(f"{name}: not launched (a Gluon kernel ran in its place)")
            continue
        grid, args, kwargs = r.calls[0]
        rows = time_launch(r.fn.fn, grid, args, kwargs)
        launch = r.fn[grid]
        rows["attnkit Launch"] = per_call(lambda go=launch, a=args, kw=kwargs: go(*a, **kw))
        print(f"{name} ({len(args)} positional, {len(kwargs)} keyword):",
              ", ".join(f"{k} {v:.1f} us" for k, v in rows.items()))  # fmt: skip
    names = [n for n, r in recs.items() if r.calls]
    for fast in (False, True, False, True):  # alternated: the host's speed drifts within a run
        for name in names:
            getattr(ops, name).fast = fast
        print(f"fwd+bwd, Launch fast path {'on' if fast else 'off'}: {per_call(fwd_bwd, 1000):.0f} us")
    short_shape_probe()
    split_fwd_bwd(q, k, v, do)
    threads_and_engine(q, k, v, do, fwd_bwd)
    side = torch.cuda.Stream()
    main_s = torch.cuda.current_stream()

    def stream_dance():
        side.wait_stream(main_s)
        with torch.cuda.stream(side):
            pass
        main_s.wait_stream(side)

    print(f"side-stream wait/enter/exit/wait: {per_call(stream_dance):.1f} us")
    print(f"torch.empty (cuda): {per_call(lambda: torch.empty(1024, device='cuda')):.1f} us")
    print(f"torch.zeros (cuda): {per_call(lambda: torch.zeros(1024, device='cuda')):.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fwd_bwd()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(35)
    print(s.getvalue())


if __name__ == "__main__":
    main()
