"""A/B timings of Triton kernel variants on the GPU, one group per process (a hung or faulting variant
cannot take the others with it). Each row is checked against cuDNN SDPA on the same inputs.

    PYTHONPATH=src python3 scripts/gpu_variants.py GROUP OUT.jsonl

GROUP: fwd (attnkit's forward, per tile) | fwd_toy (the warp-specialized experiment below) | bwd. Rows:
shape, causal, variant, tile, ms, TFLOP/s, relative error against cuDNN (forward output or the three
gradients), and cuDNN's own time in the same process. Results of 2026-11-21: docs/triton_notes.md, version 3.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit
from attnkit.backends.triton import _tuning

SHAPES = [(4, 16, 4096, 128), (1, 16, 16384, 128), (32, 16, 512, 128), (4, 32, 4096, 64), (32, 32, 512, 64)]
FWD = {
    "fwd": {128: [(128, 128, 8, 3), (128, 64, 8, 3)], 64: [(64, 64, 4, 3), (128, 64, 4, 3)]},
    "fwd_toy": {
        128: [(128, 128, 4, 2), (128, 64, 4, 3), (128, 128, 4, 3), (128, 128, 4, 2, 1), (128, 64, 4, 3, 1)],
        64: [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 4, 3, 1), (128, 64, 4, 3, 1)],
    },
}
DKDV = {
    128: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3)],
    64: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
}
DQ = {
    128: [(128, 64, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3)],
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3)],
}


@triton.jit
def toy_ws_fwd(
    Q, K, V, Out, stride_b, stride_h, stride_s, H, SQ, SK, c, D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The simplest warp-specialized forward: how far WS + TMA go on this GPU. Triton 3.6's Hopper pass
    specializes only a kernel's single loop, so masking (MASKED) is branch-free on every tile."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    off = (bh // H) * stride_b + (bh % H) * stride_h
    qd = tl.make_tensor_descriptor(Q + off, [SQ, D], [stride_s, 1], [BLOCK_M, D])
    kd = tl.make_tensor_descriptor(K + off, [SK, D], [stride_s, 1], [BLOCK_N, D])
    vd = tl.make_tensor_descriptor(V + off, [SK, D], [stride_s, 1], [BLOCK_N, D])
    m0 = pid_m * BLOCK_M
    q = qd.load([m0, 0])
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum(m0 + BLOCK_M, SK) if CAUSAL else SK
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = kd.load([start_n, 0])
        v = vd.load([start_n, 0])
        qk = tl.dot(q, k.T)
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            vis = offs_n[None, :] < SK
            if CAUSAL:
                vis = vis & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
        p = tl.exp2(qk * c - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    od = tl.make_tensor_descriptor(Out + off, [SQ, D], [stride_s, 1], [BLOCK_M, D])
    od.store([m0, 0], (acc / l_i[:, None]).to(Out.dtype.element_ty))


def toy(q, k, v, causal, cfg, masked=True):
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    BM, BN, w, st = cfg
    c = D**-0.5 * 1.4426950408889634
    toy_ws_fwd[(triton.cdiv(S, BM), B * H)](
        q, k, v, o, *q.stride()[:3], H, S, S, c, D=D, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal,
        MASKED=masked or causal, num_warps=w, num_stages=st,
    )  # fmt: skip
    return o


def flops(B, H, S, D, causal, mode):
    f = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
    return f * (2.5 if mode == "bwd" else 1.0)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cudnn(q, k, v, causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _alloc(size, alignment, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def fwd_rows(group, q, k, v, causal, row0):
    B, H, S, D = q.shape
    ref = cudnn(q, k, v, causal)
    t_ref = ms(lambda: cudnn(q, k, v, causal))
    for cfg in FWD[group][D]:
        _tuning.FORCE["fwd"] = cfg[:4]
        row = dict(row0, variant=group, tile=cfg, cudnn_ms=t_ref)
        if group == "fwd_toy":  # a fifth tile entry = mask every tile
            masked = len(cfg) > 4
            row["variant"] = "toy_masked" if masked or causal else "toy"

            def call(cfg=cfg, masked=masked):
                return toy(q, k, v, causal, cfg[:4], masked)
        else:

            def call():
                return attnkit.attention(q, k, v, causal=causal, backend="triton")

        t0 = time.time()
        try:
            o = call()
            torch.cuda.synchronize()
            row["compile_s"] = time.time() - t0
            row["err"] = rel(o, ref)
            row["ms"] = ms(call)
            row["tflops"] = flops(B, H, S, D, causal, "fwd") / row["ms"] * 1e-9
            row["vs_cudnn"] = t_ref / row["ms"]
        except Exception as e:  # noqa: BLE001 - record and go on (compile refusals)
            row["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
            if "illegal" in str(e) or "CUDA error" in str(e):
                yield row
                raise
        yield row


def bwd_rows(q, k, v, causal, row0):
    """Backward only, forward output fixed: the fused kernel against the split pass with each tile pair."""
    B, H, S, D = q.shape
    do = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(True)
    oref = cudnn(q, k, v, causal)
    gref = torch.autograd.grad(oref, (q, k, v), do, retain_graph=True)
    t_ref = ms(lambda: torch.autograd.grad(oref, (q, k, v), do, retain_graph=True))
    o = attnkit.attention(q, k, v, causal=causal, backend="triton")
    variants = [("fused", None, None)] + [("split", a, b) for a in DKDV[D] for b in DQ[D]]
    for name, a, b in variants:
        os.environ["ATTNKIT_TRITON_BWD"] = name
        _tuning.FORCE.pop("dkdv", None)
        _tuning.FORCE.pop("dq", None)
        if a:
            _tuning.FORCE["dkdv"], _tuning.FORCE["dq"] = a, b
        row = dict(row0, variant=name, tile=(a, b), cudnn_ms=t_ref)
        try:
            g = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
            row["err"] = max(rel(x, y) for x, y in zip(g, gref))
            row["ms"] = ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            row["tflops"] = flops(B, H, S, D, causal, "bwd") / row["ms"] * 1e-9
            row["vs_cudnn"] = t_ref / row["ms"]
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
            if "illegal" in str(e) or "CUDA error" in str(e):
                yield row
                raise
        yield row


def main():
    group, path = sys.argv[1], sys.argv[2]
    only = os.environ.get("SHAPES")
    shapes = [s for s in SHAPES if not only or ",".join(map(str, s)) in only.split(";")]
    triton.set_allocator(_alloc)  # the toy's device-side tensor descriptors need scratch memory
    torch.manual_seed(0)
    with open(path, "a") as out:
        for B, H, S, D in shapes:
            for causal in (False, True):
                q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                row0 = dict(group=group, B=B, H=H, S=S, D=D, causal=causal)
                rows = (
                    fwd_rows(group, q, k, v, causal, row0)
                    if group.startswith("fwd")
                    else bwd_rows(q, k, v, causal, row0)
                )
                for row in rows:
                    print(json.dumps(row), file=out, flush=True)
                    print(row, flush=True)


if __name__ == "__main__":
    main()
