"""Combine kernel, pure ``@triton.jit``: merge P partial attention results over disjoint key sets.

``lse = logsumexp_p lse_p``, ``out = sum_p exp(lse_p - lse) * out_p`` (docs/api.md §4). Rows are addressed by
three index dimensions (d0, d1, d2) with arbitrary strides for each tensor, so one kernel serves the
split-KV partials (b, h, i) and ``merge_attention`` in every layout. A part with ``lse = -inf`` contributes
nothing (not even a NaN in its output); a row where every part is ``-inf`` gets 0 and ``-inf``.
One program = BLOCK_R rows of one (d0, d1), all Dv columns.
"""

import triton
import triton.language as tl


@triton.jit
def combine(
    Parts,  # (P, d0, d1, d2, Dv) by strides
    PartLse,  # (P, d0, d1, d2) by strides
    Out,  # (d0, d1, d2, Dv) by strides
    Lse,  # float32 (d0, d1, d2) by strides
    P,
    N2,
    stride_pp,
    stride_p0,
    stride_p1,
    stride_p2,
    stride_lp,
    stride_l0,
    stride_l1,
    stride_l2,
    stride_o0,
    stride_o1,
    stride_o2,
    stride_m0,
    stride_m1,
    stride_m2,
    DV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    rblk = tl.program_id(0)
    i1 = tl.program_id(1).to(tl.int64)
    i0 = tl.program_id(2).to(tl.int64)
    rows = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N2
    offs_dv = tl.arange(0, BLOCK_DV)
    lse_base = PartLse + i0 * stride_l0 + i1 * stride_l1 + rows * stride_l2
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for p in range(0, P):
        s = tl.load(lse_base + p * stride_lp, mask=row_ok, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, s)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    part_base = Parts + i0 * stride_p0 + i1 * stride_p1 + rows[:, None] * stride_p2 + offs_dv[None, :]
    col_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
    for p in range(0, P):
        s = tl.load(lse_base + p * stride_lp, mask=row_ok, other=float("-inf")).to(tl.float32)
        w = tl.exp(s - m_safe)  # 0 for empty parts
        o = tl.load(part_base + p * stride_pp, mask=col_ok & (w[:, None] > 0), other=0.0).to(tl.float32)
        total += w
        acc += w[:, None] * o
    has = total > 0
    safe = tl.where(has, total, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(has, m_safe + tl.log(safe), float("-inf"))
    o_ptrs = Out + i0 * stride_o0 + i1 * stride_o1 + rows[:, None] * stride_o2 + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=col_ok)
    tl.store(Lse + i0 * stride_m0 + i1 * stride_m1 + rows * stride_m2, lse, mask=row_ok)
