"""A/B timings of Triton kernel variants on the GPU, one group per process (a hung or faulting variant
cannot take the others with it). Each row is checked against cuDNN SDPA on the same inputs.

    PYTHONPATH=src python3 scripts/gpu_variants.py GROUP OUT.jsonl

GROUP: fwd (attnkit's forward, per tile) | fwd_toy (the warp-specialized experiment below) | bwd (fused
against split tile pairs) | bwd_ref (backward alone: compiled flex, our backward under each environment of
AK_BWD, and with TOY=1 the FlexAttention-structure toy; rows carry per-kernel GPU times). Rows: shape, causal,
variant, tile, ms, TFLOP/s, relative error against cuDNN (forward output or the three gradients), and
cuDNN's own time in the same process. Results of 2026-11-21: docs/triton_notes.md, versions 3 and 4.
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
from attnkit.backends.triton.runtime import tuning as _tuning

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


@triton.jit
def toy_bwd(
    Q, K, V, DO, DQ, DK, DV, LSE2, DELTA, stride_s, SQ, SK, c, scale, D: tl.constexpr, BLOCK_M1: tl.constexpr,
    BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, CAUSAL: tl.constexpr,
    WHICH: tl.constexpr,
):  # fmt: skip
    """FlexAttention's sm90 backward structure, nothing else (bhsd contiguous, S % 128 == 0, GROUP 1): one
    grid of dK/dV programs (key tiles) and dQ programs (query tiles). WHICH: 0 both, 1 dK/dV, 2 dQ. LSE2 =
    row max + log2 row sum (log2 units). The bar for our kernels: same tiles, the simplest code."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    Q += bh * SQ * stride_s
    DO += bh * SQ * stride_s
    DQ += bh * SQ * stride_s
    K += bh * SK * stride_s
    V += bh * SK * stride_s
    DK += bh * SK * stride_s
    DV += bh * SK * stride_s
    LSE2 += bh * SQ
    DELTA += bh * SQ
    offs_d = tl.arange(0, D)
    n_kv = SK // BLOCK_N1 if WHICH != 2 else 0
    if pid >= n_kv:  # dQ
        m02 = (pid - n_kv) * BLOCK_M2
        offs_m2 = m02 + tl.arange(0, BLOCK_M2)
        q2 = tl.load(Q + offs_m2[:, None] * stride_s + offs_d[None, :])
        do2 = tl.load(DO + offs_m2[:, None] * stride_s + offs_d[None, :])
        lse2 = tl.load(LSE2 + offs_m2)
        di2 = tl.load(DELTA + offs_m2)
        dq2 = tl.zeros([BLOCK_M2, D], tl.float32)
        hi2 = tl.minimum(m02 + BLOCK_M2, SK) if CAUSAL else SK
        offs_n2 = tl.arange(0, BLOCK_N2)
        for start_n in range(0, hi2, BLOCK_N2):
            kt2 = tl.load(K + (start_n + offs_n2)[None, :] * stride_s + offs_d[:, None])
            vt2 = tl.load(V + (start_n + offs_n2)[None, :] * stride_s + offs_d[:, None])
            qk2 = tl.dot(q2, kt2)
            if CAUSAL:
                qk2 = tl.where((start_n + offs_n2)[None, :] <= offs_m2[:, None], qk2, float("-inf"))
            p2 = tl.exp2(qk2 * c - lse2[:, None])
            dp2 = tl.dot(do2, vt2)
            ds2 = p2 * (dp2 - di2[:, None])
            dq2 += tl.dot(ds2.to(kt2.dtype), tl.trans(kt2))
        tl.store(DQ + offs_m2[:, None] * stride_s + offs_d[None, :], (dq2 * scale).to(DQ.dtype.element_ty))
    else:  # dK, dV
        n0 = pid * BLOCK_N1
        offs_n = n0 + tl.arange(0, BLOCK_N1)
        k = tl.load(K + offs_n[:, None] * stride_s + offs_d[None, :])
        v = tl.load(V + offs_n[:, None] * stride_s + offs_d[None, :])
        dk = tl.zeros([BLOCK_N1, D], tl.float32)
        dv = tl.zeros([BLOCK_N1, D], tl.float32)
        lo = (n0 // BLOCK_M1) * BLOCK_M1 if CAUSAL else 0
        offs_m = tl.arange(0, BLOCK_M1)
        for start_m in range(lo, SQ, BLOCK_M1):
            qt = tl.load(Q + (start_m + offs_m)[None, :] * stride_s + offs_d[:, None])
            lse = tl.load(LSE2 + start_m + offs_m)
            qkt = tl.dot(k, qt)
            if CAUSAL:
                qkt = tl.where(offs_n[:, None] <= (start_m + offs_m)[None, :], qkt, float("-inf"))
            pt = tl.exp2(qkt * c - lse[None, :])
            do = tl.load(DO + (start_m + offs_m)[:, None] * stride_s + offs_d[None, :])
            dv += tl.dot(pt.to(do.dtype), do)
            di = tl.load(DELTA + start_m + offs_m)
            dpt = tl.dot(v, tl.trans(do))
            dst = pt * (dpt - di[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
        tl.store(DK + offs_n[:, None] * stride_s + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty))
        tl.store(DV + offs_n[:, None] * stride_s + offs_d[None, :], dv.to(DV.dtype.element_ty))


def toy_backward(q, k, v, o, do, lse2, causal, cfg, which=0):
    """dq, dk, dv from toy_bwd (delta by torch, as its own op)."""
    B, H, S, D = q.shape
    BM1, BN1, BM2, BN2, w, st = cfg
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = (o.float() * do.float()).sum(-1)
    scale = D**-0.5
    args = (q, k, v, do, dq, dk, dv, lse2, delta, q.stride(2), S, S, scale * 1.4426950408889634, scale)
    kw = dict(
        D=D, BLOCK_M1=BM1, BLOCK_N1=BN1, BLOCK_M2=BM2, BLOCK_N2=BN2, CAUSAL=causal, num_warps=w, num_stages=st
    )
    if which == 0:
        toy_bwd[(S // BN1 + S // BM2, B * H)](*args, WHICH=0, **kw)
    else:
        toy_bwd[(S // BN1, B * H)](*args, WHICH=1, **kw)
        toy_bwd[(S // BM2, B * H)](*args, WHICH=2, **kw)
    return dq, dk, dv


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


# our backward: label -> environment (the _tuning overrides; version 4's A/B also had a tile-major grid,
# measured slower everywhere and removed)
AK_BWD = {
    "default": {},
    "no_side_stream": dict(ATTNKIT_TRITON_BWD_STREAMS="0"),
    "three_loops": dict(ATTNKIT_TRITON_BWD_LOOP="three"),
    "one_loop": dict(ATTNKIT_TRITON_BWD_LOOP="one"),
    "fused": dict(ATTNKIT_TRITON_BWD="fused"),
}
AK_ENV = ["ATTNKIT_TRITON_BWD", "ATTNKIT_TRITON_BWD_LOOP", "ATTNKIT_TRITON_BWD_STREAMS"]
TOY_BWD = [(64, 128, 128, 64, 8, 3)]


def bwd_ref_rows(q, k, v, causal, row0):
    """Backward only: cuDNN, compiled flex, our backward under each AK_BWD environment, our forward, and
    (TOY=1) toy_bwd (flex's structure) in one grid and in two launches: how far ours are from the simplest
    code."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, S, D = q.shape
    do = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(True)
    oref = cudnn(q, k, v, causal)
    gref = torch.autograd.grad(oref, (q, k, v), do, retain_graph=True)
    t_ref = ms(lambda: torch.autograd.grad(oref, (q, k, v), do, retain_graph=True))
    t_fwd = ms(lambda: cudnn(q, k, v, causal))
    flex = torch.compile(flex_attention, dynamic=False)
    bm = create_block_mask(lambda b, h, i, j: i >= j, None, None, S, S) if causal else None
    o_flex = flex(q, k, v, block_mask=bm)
    o_ak = attnkit.attention(q, k, v, causal=causal, backend="triton")
    x = (q.detach(), k.detach(), v.detach())
    o_det, lse = attnkit.attention(*x, causal=causal, backend="triton", return_lse=True)
    lse2 = (lse * 1.4426950408889634).contiguous()
    calls = [("flex", None, lambda: torch.autograd.grad(o_flex, (q, k, v), do, retain_graph=True))]
    for name, env in AK_BWD.items():
        calls.append((name, None, lambda env=env: _ak_grad(env, o_ak, q, k, v, do)))
    calls.append(("fwd", None, lambda: _ak_fwd({}, *x, causal)))
    for cfg in TOY_BWD if os.environ.get("TOY") else ():
        for which in (0, 1):
            calls.append(
                ("toy_grid" if which == 0 else "toy_2launch", cfg,
                 lambda cfg=cfg, which=which: toy_backward(*x, o_det, do, lse2, causal, cfg, which))
            )  # fmt: skip
    for name, cfg, call in calls:
        row = dict(row0, variant=name, tile=cfg, cudnn_ms=t_ref)
        fwd = name.startswith("fwd")
        if fwd:
            row["cudnn_ms"] = t_fwd
        try:
            g = call()
            row["err"] = max(rel(a, b) for a, b in zip(g, (oref,) if fwd else gref))
            row["ms"] = ms(call)
            row["tflops"] = flops(B, H, S, D, causal, "fwd" if fwd else "bwd") / row["ms"] * 1e-9
            row["vs_cudnn"] = row["cudnn_ms"] / row["ms"]
            row["kernels"] = kernel_times(call)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[-300:]}"
        yield row


def kernel_times(call, n=5):
    """GPU time per kernel name (microseconds per call, largest first) of ``n`` calls under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            call()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            times[e.key[:60]] = round(t / n, 1)
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:8])


def _set_env(env):
    for key in AK_ENV:
        os.environ.pop(key, None)
    os.environ.update(env)


def _ak_grad(env, o, q, k, v, do):
    _set_env(env)
    return torch.autograd.grad(o, (q, k, v), do, retain_graph=True)


def _ak_fwd(env, q, k, v, causal):
    _set_env(env)
    return (attnkit.attention(q, k, v, causal=causal, backend="triton"),)


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
                if group.startswith("fwd"):
                    rows = fwd_rows(group, q, k, v, causal, row0)
                elif group == "bwd_ref":
                    rows = bwd_ref_rows(q, k, v, causal, row0)
                else:
                    rows = bwd_rows(q, k, v, causal, row0)
                for row in rows:
                    print(json.dumps(row), file=out, flush=True)
                    print(row, flush=True)


if __name__ == "__main__":
    main()
