"""Is ``backend="auto"`` as fast as the backend it picks? (GPU machine.)

When to run: after a change to ``dispatch.py``, a backend's ``cost()`` or ``data/triton_rates.json``, and as
part of ``scripts/gpu/final.sh``: the kernel table's "auto / best" column says where auto loses, this says
whether the loss is the choice or the timing. For each shape it prints auto's choice and times raw cuDNN
SDPA, attnkit ``auto``, attnkit pinned to ``sdpa_cudnn`` and to ``triton`` on the same inputs, in rounds
whose order changes each time (``attnkit.bench.kernels.round_order``: clock drift and the GPU's power cap
fall on every candidate alike), with the benchmarks' own step (``prepare``) and timer.

    PYTHONPATH=src python3 scripts/gpu/auto_check.py [fwd_bwd] [nc] [d64] [rounds=5]

``fwd_bwd`` times forward+backward, ``nc`` drops the causal mask, ``d64`` takes the head-dim-64 shapes.
"""

import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkit
from attnkit.bench._timing import median_ms
from attnkit.bench.kernels import prepare, round_order


def check(B, H, S, D, causal, mode, rounds):
    q = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=mode == "fwd_bwd")
    chosen = attnkit.explain(q, q, q, causal=causal).chosen
    print(f"{B},{H},{S},{D} causal={causal} {mode}: auto picks {chosen}")

    def raw(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    fns = {
        "raw_cudnn": raw,
        "auto": lambda q, k, v: attnkit.attention(q, k, v, causal=causal),
        "ak_cudnn": lambda q, k, v: attnkit.attention(q, k, v, causal=causal, backend="sdpa_cudnn"),
        "ak_triton": lambda q, k, v: attnkit.attention(q, k, v, causal=causal, backend="triton"),
    }
    steps = {n: prepare(f, B, H, S, D, mode, torch.bfloat16, "cuda", True) for n, f in fns.items()}
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(rounds):
        for i in round_order(len(names), r):
            times[names[i]].append(median_ms(steps[names[i]], True))
    med = {n: statistics.median(t) for n, t in times.items()}
    spread = {n: (max(t) - min(t)) / med[n] for n, t in times.items()}
    print("  median ms", {n: round(x, 4) for n, x in med.items()})
    print("  spread   ", {n: f"{x:.0%}" for n, x in spread.items()})
    print("  raw_cudnn / auto", round(med["raw_cudnn"] / med["auto"], 3))


def main():
    args = sys.argv[1:]
    rounds = next((int(a.split("=")[1]) for a in args if a.startswith("rounds=")), 5)
    d = 64 if "d64" in args else 128
    shapes = [(4, 2048 // d, 4096, d), (1, 2048 // d, 16384, d)]  # H=32 at D=64, 16 at D=128
    for shape in shapes:
        check(*shape, causal="nc" not in args, mode="fwd_bwd" if "fwd_bwd" in args else "fwd", rounds=rounds)


if __name__ == "__main__":
    main()
