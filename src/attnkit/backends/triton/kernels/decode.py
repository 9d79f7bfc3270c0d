"""Split-KV decode kernel (flash-decoding), pure ``@triton.jit``: contiguous and paged KV caches.

One program = one tile of BLOCK_M packed rows of one (batch row b, KV head hk), against the keys of one
split of the key range. The GQA heads of one KV head are packed into the tile: packed row ``r`` is query
token ``i = r // GROUP`` of query head ``hk * GROUP + r % GROUP``, so a tile holds ``Sq * GROUP`` rows and
every key block is read once for all of them. Split ``s`` covers logical keys ``[s * CHUNK, (s + 1) * CHUNK)``
(CHUNK is a host value, from the cache capacity: no device value decides the grid). Each split writes its
normalized partial output and its lse; the combine kernel (``combine.py``) merges the splits.

Row b attends its first ``Sk_b = cache_seqlens[b] + SQ_NEW`` logical keys; ``off = Sk_b - Sq`` aligns
causal, windows and ALiBi to the bottom right (docs/api.md §1, §4). Logical key ``j`` lives at
``K[b, j]`` (contiguous) or ``K[table[b, j // PS], j % PS]`` (paged, one page-table load per key, so pages
of any size work). Every index that comes from device data (the length, the table entries) is clamped into
the cache tensors before it forms an address: a poisoned table or length computes garbage, never faults.

HAS_SCORE_MOD inlines a ``score_mod`` compiled by :mod:`attnkit.compiler` (a mask arrives folded into it as
``where(mask, mod(s), -inf)``), called on each tile as ``(score, b, h, q_idx, kv_idx, off)`` with ``h`` the
query head of each packed row, ``q_idx`` the query token, ``kv_idx`` the logical key position and ``off``
as above: the convention of the prefill kernels. Out-of-range reads of its captured tensors are masked.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _key_slots(Table, stride_tb, b, j, cap, ps, num_pages, PAGED: tl.constexpr):
    """Where logical keys ``j`` (BLOCK_N,) of row ``b`` live, as int64 (dim-0 index, dim-1 index) of the
    caches: (b, j) contiguous, (page, j % PS) paged. One page-table load serves both K and V."""
    jc = tl.minimum(tl.maximum(j, 0), cap - 1)
    if PAGED:
        page = tl.load(Table + b * stride_tb + jc // ps)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1)
        return page.to(tl.int64), (jc % ps).to(tl.int64)
    else:
        return b.to(tl.int64), jc.to(tl.int64)


@triton.jit
def decode_fwd(
    Q,  # (B, Sq, Hq, D)
    K,  # (B, S_max, Hk, D) contiguous, or (num_pages, PS, Hk, D) paged
    V,  # (B, S_max, Hk, Dv) or (num_pages, PS, Hk, Dv)
    Seqlens,  # int32 (B,): keys in the cache before the new ones (any tensor, unread, with FULL)
    Table,  # int32 (B, max_pages) (paged; any int32 tensor otherwise)
    Slopes,  # float32 (Hq,) or (B, Hq) (ALiBi; any float32 tensor otherwise)
    SmC0,
    SmC1,
    SmC2,
    SmC3,
    SmMeta,  # score_mod: captured tensors and their int64 (4, 8) strides/sizes (attnkit.compiler)
    Out,  # (P, B, Sq, Hq, Dv): P = 1 writes the final output, P > 1 float32 partials
    Lse,  # float32 (P, B, Hq, Sq)
    stride_qb,
    stride_qs,
    stride_qh,
    stride_k0,
    stride_k1,
    stride_kh,
    stride_v0,
    stride_v1,
    stride_vh,
    stride_tb,
    stride_ab,
    stride_op,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lp,
    stride_lb,
    stride_lh,
    stride_ls,
    Hk,
    SQ,
    SQ_NEW,
    cap,  # logical capacity of a row: S_max, or max_pages * PS
    ps,  # page size (paged)
    num_pages,
    chunk,  # keys per split (a multiple of BLOCK_N)
    sm_scale,
    softcap,
    win_left,
    win_right,  # already capped by causal (0 when causal)
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr,  # 0 contiguous, 1 paged, 2 paged with BLOCK_N dividing the page size
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr,
    FULL: tl.constexpr,  # no Seqlens: every row's length is cap
    HAS_SCORE_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,  # the compiled score_mod(score, b, h, q_idx, kv_idx, off, SM) (or None)
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    mblk = tl.program_id(2)
    b = bh // Hk
    hk = bh % Hk

    r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows
    i = r // GROUP  # query token
    h = hk * GROUP + r % GROUP  # query head
    row_ok = i < SQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # (BLOCK_M, BLOCK_D) queries of the tile
    q_ptrs = Q + b.to(tl.int64) * stride_qb + i[:, None] * stride_qs + h[:, None] * stride_qh
    q_ptrs += offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    if FULL:  # every row holds the whole capacity (attention() through the triton_decode backend)
        seqlen_k = b * 0 + cap  # (a tensor even where Triton passes cap == 1 as a constant)
    else:
        seqlen_k = tl.load(Seqlens + b) + SQ_NEW
        seqlen_k = tl.minimum(tl.maximum(seqlen_k, 0), cap)
    off = seqlen_k - SQ

    # keys this tile can see, intersected with this split's range
    i_lo = (mblk * BLOCK_M) // GROUP
    i_hi = tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // GROUP, SQ - 1)
    s_lo = split * chunk
    kv_hi = tl.minimum(seqlen_k, s_lo + chunk)
    hi = kv_hi
    if HAS_RIGHT:
        hi = tl.minimum(hi, i_hi + off + win_right + 1)
    lo = s_lo
    if HAS_LEFT:
        lo = tl.maximum(lo, i_lo + off - win_left)
    lo = (lo // BLOCK_N) * BLOCK_N  # (>= 0; every tile start is < hi <= cap)

    if SOFTCAP:
        qk_scale = sm_scale / softcap
    else:
        qk_scale = sm_scale * LOG2E
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * stride_ab + h, mask=row_ok, other=0.0) * LOG2E  # (BLOCK_M,)
    pos = i + off  # key position of each query row
    smod = (SmC0, SmC1, SmC2, SmC3, SmMeta, b, h)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    k_head = hk.to(tl.int64) * stride_kh
    v_head = hk.to(tl.int64) * stride_vh
    for start_n in range(lo, hi, BLOCK_N):
        j = start_n + tl.arange(0, BLOCK_N)
        if PAGED == 2:  # the tile lies on one page (0 <= start_n, start_n + BLOCK_N <= cap: see above)
            page = tl.load(Table + b * stride_tb + start_n // ps)
            d0 = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
            d1 = (start_n % ps + tl.arange(0, BLOCK_N)).to(tl.int64)
        else:
            d0, d1 = _key_slots(Table, stride_tb, b, j, cap, ps, num_pages, PAGED)
        k_rows = d0 * stride_k0 + d1 * stride_k1
        v_rows = d0 * stride_v0 + d1 * stride_v1
        key_ok = j < kv_hi
        # K^T tile (BLOCK_D, BLOCK_N)
        kt = tl.load(
            K + k_head + k_rows[None, :] + offs_d[:, None],
            mask=key_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        qk = tl.dot(q, kt, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            x = qk * qk_scale
            s = (1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)) * (softcap * LOG2E)
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            s -= slope[:, None] * tl.abs(pos[:, None] - j[None, :]).to(tl.float32)
        if HAS_SCORE_MOD:  # step 4 in natural units: row b, the QUERY head, query token i, logical key j
            y, _ = SCORE_MOD(s * LN2, b, h[:, None], i[:, None], j[None, :], off, smod)
            s = y * LOG2E
        vis = key_ok[None, :] & row_ok[:, None]
        if HAS_RIGHT:
            vis = vis & (j[None, :] <= pos[:, None] + win_right)
        if HAS_LEFT:
            vis = vis & (j[None, :] >= pos[:, None] - win_left)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(
            V + v_head + v_rows[:, None] + offs_dv[None, :],
            mask=key_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )  # (BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new

    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
    o_ptrs = (
        Out
        + split.to(tl.int64) * stride_op
        + b.to(tl.int64) * stride_ob
        + i[:, None] * stride_os
        + h[:, None] * stride_oh
        + offs_dv[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    l_ptrs = Lse + split.to(tl.int64) * stride_lp + b.to(tl.int64) * stride_lb + h * stride_lh + i * stride_ls
    tl.store(l_ptrs, lse, mask=row_ok)
