"""Forward+backward of one shape through attnkit's triton backend: do_bench time and GPU time per kernel
(torch.profiler), under the environment given (A/B of backward options). Prints one JSON row.

    PYTHONPATH=src python3 scripts/gpu_fwd_bwd_profile.py 32,32,512,64 [--causal] [--rotate N]
"""

import json
import os
import sys

import torch
from gpu_variants import kernel_times  # noqa: E402 (scripts/ is on sys.path when run as a script)
from triton.testing import do_bench

import attnkit


def main():
    B, H, S, D = map(int, sys.argv[1].split(","))
    causal = "--causal" in sys.argv
    n = int(sys.argv[sys.argv.index("--rotate") + 1]) if "--rotate" in sys.argv else 1
    sets = [
        [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        for _ in range(n)
    ]
    do = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def call():
        q, k, v = sets[i[0] % n]
        i[0] += 1
        out = attnkit.attention(q, k, v, causal=causal, backend="triton")
        return torch.autograd.grad(out, (q, k, v), do)

    call()
    ms = do_bench(call, warmup=25, rep=100, return_mode="median")
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0) * 3.5
    env = {k: v for k, v in os.environ.items() if k.startswith("ATTNKIT_TRITON")}
    print(json.dumps(dict(shape=sys.argv[1], causal=causal, rotate=n, env=env, ms=ms,
                          tflops=flops / ms * 1e-9, kernels=kernel_times(call))))  # fmt: skip


if __name__ == "__main__":
    main()
