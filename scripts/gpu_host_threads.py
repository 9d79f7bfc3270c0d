"""Does the autograd engine's device thread cost the host time of a short forward+backward? (GPU machine)

The backward of a CUDA graph runs on the autograd engine's per-device worker thread, the forward on the
caller's thread. ``gpu_host_breakdown.py`` found both op bodies taking about twice their isolated time inside
a forward+backward loop. This probe times, alternated, a forward+backward step as shipped and with
``torch.autograd.set_multithreading_enabled(False)`` (the backward on the calling thread), each also with
ops' replays off (``ops.REPLAY = False``) and with the Launch fast path off too, at a tiny shape (host time
per step, nothing else) and at B=32, S=512 (do_bench, the benchmark's timer), with compiled
FlexAttention and cuDNN beside it; then a cProfile of single-threaded steps, where the backward's Python is
visible too. Run it twice, once under ``taskset -c N`` (both threads on one core), to separate thread
hand-off from cache-line traffic between cores.

    PYTHONPATH=src python3 scripts/gpu_host_threads.py [label]
"""

import cProfile
import io
import os
import pstats
import sys

import torch
from gpu_host_breakdown import per_call  # (scripts/ is on the path when run as a script)
from triton.testing import do_bench

import attnkit
from attnkit.backends.triton.ops import attention as ops


def inputs(B, H, S, D):
    q, k, v = (
        torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
    )
    return q, k, v, torch.randn_like(q)


def attnkit_step(q, k, v, do, causal):
    out = attnkit.attention(q, k, v, causal=causal, backend="triton")
    return torch.autograd.grad(out, (q, k, v), do)


def single_threaded(fn):
    def go():
        with torch.autograd.set_multithreading_enabled(False):
            return fn()

    return go


def launches():
    """Every ``_launch.Launch`` of the backend (Triton and Gluon kernels)."""
    from attnkit.backends.triton.kernels.hopper import bwd as _gluon_bwd
    from attnkit.backends.triton.kernels.hopper import fwd as _gluon_fwd

    return [ops.attn_fwd, ops.bwd_preprocess, ops.attn_bwd_dkdv, ops.attn_bwd_dq, _gluon_fwd._FWD_LAUNCH,
            _gluon_bwd._DKDV_LAUNCH]  # fmt: skip


def main():
    label = sys.argv[1] if len(sys.argv) > 1 else "default"
    print(f"# {label}: affinity {sorted(os.sched_getaffinity(0))}")
    tiny = inputs(1, 2, 128, 128)
    for causal in (False, True):
        step = lambda c=causal: attnkit_step(*tiny, c)  # noqa: E731
        for rnd in range(2):
            a = per_call(step)
            b = per_call(single_threaded(step))
            ops.REPLAY = False
            c = per_call(step)
            d = per_call(single_threaded(step))
            for launch in launches():
                launch.fast = False
            e = per_call(step)
            for launch in launches():
                launch.fast = True
            ops.REPLAY = True
            print(f"tiny causal={causal} round {rnd}: host/step {a:.0f} us shipped,",
                  f"{b:.0f} us single-threaded; replays off: {c:.0f} / {d:.0f} us;",
                  f"replays and Launch fast path off: {e:.0f} us")  # fmt: skip

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    B, H, S, D = 32, 16, 512, 128
    q, k, v, do = inputs(B, H, S, D)
    for causal in (False, True):
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, S, S, device="cuda")

        def flex_step(mask=mask):
            out = flex(q, k, v, block_mask=mask)
            return torch.autograd.grad(out, (q, k, v), do)

        def cudnn_step(causal=causal):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return torch.autograd.grad(out, (q, k, v), do)

        ours = lambda c=causal: attnkit_step(q, k, v, do, c)  # noqa: E731

        def no_replay(fn=ours):
            ops.REPLAY = False
            try:
                return fn()
            finally:
                ops.REPLAY = True

        rows = {"attnkit": ours, "attnkit single-threaded": single_threaded(ours),
                "attnkit no replay": no_replay, "flex": flex_step,
                "flex single-threaded": single_threaded(flex_step), "cudnn": cudnn_step}  # fmt: skip
        for rnd in range(2):
            ms = {name: do_bench(fn, warmup=25, rep=100, return_mode="median") for name, fn in rows.items()}
            print(f"{B},{H},{S},{D} causal={causal} round {rnd} do_bench ms:",
                  ", ".join(f"{n} {t:.3f}" for n, t in ms.items()))  # fmt: skip

    step = single_threaded(lambda: attnkit_step(*tiny, True))
    step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        step()
    torch.cuda.synchronize()
    prof.disable()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(45)
    print(s.getvalue())


if __name__ == "__main__":
    main()
