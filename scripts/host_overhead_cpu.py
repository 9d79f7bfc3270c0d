"""attnkit's own host (Python) time per triton-backend call, on a machine without a GPU: the Triton
interpreter path with every kernel launch stubbed out, so what is left is normalization, dispatch, the
launchers' argument building, autograd and allocation. Prints us per call (median of 7 rounds), then a
cProfile of fwd+bwd.

    python scripts/host_overhead_cpu.py

The GPU-side launch cost (Triton's launcher, the driver) is not in this number: scripts/gpu_host_overhead.py.
"""

import cProfile
import os
import pstats
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402

import attnkit  # noqa: E402
from attnkit.backends.triton.ops import attention as ops  # noqa: E402


class Stub:
    def __getitem__(self, grid):
        return lambda *a, **k: None


for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "bwd_preprocess"):
    setattr(ops, name, Stub())
q, k, v = (torch.randn(1, 2, 128, 64, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)


def fwd_nograd():
    with torch.no_grad():
        return attnkit.attention(q, k, v, causal=True, backend="triton")


def fwd():
    return attnkit.attention(q, k, v, causal=True, backend="triton")


def fwd_bwd():
    out = attnkit.attention(q, k, v, causal=True, backend="triton")
    return torch.autograd.grad(out, (q, k, v), do)


# the three loops take turns, 7 rounds of 300 calls each: the median round is the number (a busy machine
# moves single rounds by 10-30%), the fastest one is shown beside it
ROUNDS, CALLS = 7, 300
cases = (("fwd nograd", fwd_nograd), ("fwd grad", fwd), ("fwd_bwd", fwd_bwd))
times: dict[str, list[float]] = {name: [] for name, _ in cases}
for _, fn in cases:
    for _ in range(20):
        fn()
for _ in range(ROUNDS):
    for name, fn in cases:
        t = time.perf_counter()
        for _ in range(CALLS):
            fn()
        times[name].append((time.perf_counter() - t) / CALLS * 1e6)
for name, ts in times.items():
    print(name, f"{statistics.median(ts):.0f} us (fastest round {min(ts):.0f})")
pr = cProfile.Profile()
pr.enable()
for _ in range(300):
    fwd_bwd()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(30)
