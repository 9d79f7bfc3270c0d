"""Split-KV decode kernel (flash-decoding), pure ``@triton.jit``: contiguous and paged KV caches.

One program = one tile of BLOCK_M packed rows of one (batch row b, KV head hk), against the keys of one
split of the key range. The GQA heads of one KV head are packed into the tile: packed row ``r`` is query
token ``i = r // GROUP`` of query head ``hk * GROUP + r % GROUP``, so a tile holds ``Sq * GROUP`` rows and
every key block is read once for all of them. Split ``s`` covers logical keys ``[s * CHUNK, (s + 1) * CHUNK)``
(CHUNK is a host value, from the cache capacity: no device value decides the grid). Each split writes its
normalized partial output and its lse; the combine kernel (``combine.py``) merges the splits.

Row b attends its first ``Sk_b = cache_seqlens[b] + SQ_NEW`` logical keys; ``off = Sk_b - Sq`` aligns
causal, windows and ALiBi to the bottom right (docs/api.md §1, §4). Logical key ``j`` lives at
``K[b, j]`` (contiguous) or ``K[table[b, j // PS], j % PS]`` (paged: one table entry per key tile where the
tile lies on one page, PAGED == 2; the tile's ``BLOCK_N // PS`` entries as one vector where it holds whole
pages, PAGED == 3; else one per key, so pages of any size work). Every index that comes from device data
(the length, the table entries) is clamped into the cache tensors before it forms an address: a poisoned
table or length computes garbage, never faults.

The key loop runs in two parts: the tiles whose every key is visible to every row of the tile (below the
row's length, inside a right window; no left window) without building a mask (TAIL), then the rest with
one. With PREFETCH a paged cache's table entries are loaded one step before the step that reads their keys
(H200 run J: paged B=1 128k 0.154 ms against 0.167 without; two steps ahead, tried and dropped, 0.209).

HAS_SCORE_MOD inlines a ``score_mod`` compiled by :mod:`attnkit.compiler` (a mask arrives folded into it as
``where(mask, mod(s), -inf)``), called on each tile as ``(score, b, h, q_idx, kv_idx, off)`` with ``h`` the
query head of each packed row, ``q_idx`` the query token, ``kv_idx`` the logical key position and ``off``
as above: the convention of the prefill kernels. Out-of-range reads of its captured tensors are masked.
"""

from collections import namedtuple

import triton
import triton.language as tl

from attnkit.backends.triton.kernels.common import Features, ScoreParams

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# where one (batch row, KV head)'s keys are: its head's offsets into K and V, the caches' two leading strides
# (row or page, key in it) and the head-dim index ranges
KeyGeo = namedtuple("KeyGeo", "k_head v_head stride_k0 stride_k1 stride_v0 stride_v1 offs_d offs_dv")


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
def _tile_pages(Table, stride_tb, b, start_n, cap, ps, num_pages, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
                PS: tl.constexpr):  # fmt: skip
    """The page-table entries of the key tile at ``start_n`` (clamped into the table and the pool): one
    scalar (PAGED 2: the tile lies on one page), BLOCK_N // PS (PAGED 3: the tile holds whole pages of the
    constexpr size PS), one per key (PAGED 1), or 0 (contiguous, no table)."""
    if PAGED == 2:
        page = tl.load(Table + b * stride_tb + tl.minimum(start_n, cap - 1) // ps)
        return tl.minimum(tl.maximum(page, 0), num_pages - 1)
    elif PAGED == 3:
        n = tl.minimum(start_n // PS + tl.arange(0, BLOCK_N // PS), (cap - 1) // PS)
        page = tl.load(Table + b * stride_tb + n)
        return tl.minimum(tl.maximum(page, 0), num_pages - 1)
    elif PAGED == 1:
        jc = tl.minimum(tl.maximum(start_n + tl.arange(0, BLOCK_N), 0), cap - 1)
        page = tl.load(Table + b * stride_tb + jc // ps)
        return tl.minimum(tl.maximum(page, 0), num_pages - 1)
    else:
        return 0


@triton.jit
def _tile_slots(page, b, start_n, cap, ps, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PS: tl.constexpr):
    """(dim-0, dim-1) int64 indices of the tile's keys in the caches, from its :func:`_tile_pages`."""
    j = start_n + tl.arange(0, BLOCK_N)
    if PAGED == 2:  # (start_n + BLOCK_N <= cap: tile starts are below cap and multiples of BLOCK_N)
        return page.to(tl.int64), (start_n % ps + tl.arange(0, BLOCK_N)).to(tl.int64)
    elif PAGED == 3:  # each entry repeated for its PS keys (tile starts are multiples of BLOCK_N, so of PS)
        pages = tl.reshape(tl.broadcast_to(page[:, None], (BLOCK_N // PS, PS)), (BLOCK_N,))
        return pages.to(tl.int64), (tl.arange(0, BLOCK_N) % PS).to(tl.int64)
    elif PAGED == 1:
        jc = tl.minimum(tl.maximum(j, 0), cap - 1)
        return page.to(tl.int64), (jc % ps).to(tl.int64)
    else:
        return b.to(tl.int64), tl.minimum(j, cap - 1).to(tl.int64)


@triton.jit
def _tile_step(nxt, Table, stride_tb, b, start_n, cap, ps, num_pages, BLOCK_N: tl.constexpr,
               PAGED: tl.constexpr, PS: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """The key tile at ``start_n``: its slots (:func:`_tile_slots`) and the page entries carried to the next
    step. With PREFETCH, ``nxt`` holds this tile's entries, loaded a step ahead; the next tile's are loaded
    here (without, each step loads its own)."""
    if PREFETCH:
        page = nxt
        nxt = _tile_pages(Table, stride_tb, b, start_n + BLOCK_N, cap, ps, num_pages, BLOCK_N, PAGED, PS)
    else:
        page = _tile_pages(Table, stride_tb, b, start_n, cap, ps, num_pages, BLOCK_N, PAGED, PS)
    d0, d1 = _tile_slots(page, b, start_n, cap, ps, BLOCK_N, PAGED, PS)
    return d0, d1, nxt


@triton.jit
def _attend_tile(acc, m_i, l_i, q, K, V, d0, d1, start_n, kv_hi, row_ok, pos, i, h, b, off, slope, smod, geo,
                 par, D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, FEAT: tl.constexpr,
                 MASK: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax (``geo``: :data:`KeyGeo`, ``par``: ``common.ScoreParams`` with the
    qk scale in ``sm_scale``, ``FEAT``: ``common.Features``). MASK: the tile may hold keys past ``kv_hi`` or
    outside a row's window; without it every key of the tile is visible to every row and no mask is built
    (rows past SQ compute what is never stored)."""
    j = start_n + tl.arange(0, BLOCK_N)
    key_ok = j < kv_hi
    # K^T tile (BLOCK_D, BLOCK_N): addresses are always inside the cache (clamped slots), so only V needs
    # its keys masked (garbage K scores are replaced by -inf below; garbage V could hold NaN)
    kt = tl.load(
        K + geo.k_head + (d0 * geo.stride_k0 + d1 * geo.stride_k1)[None, :] + geo.offs_d[:, None],
        mask=geo.offs_d[:, None] < D,
        other=0.0,
    )
    qk = tl.dot(q, kt, input_precision=FEAT.PRECISION)  # (BLOCK_M, BLOCK_N)
    if FEAT.SOFTCAP:
        x = qk * par.sm_scale
        s = (1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)) * (par.softcap * LOG2E)
    else:
        s = qk * par.sm_scale
    if FEAT.HAS_ALIBI:
        s -= slope[:, None] * tl.abs(pos[:, None] - j[None, :]).to(tl.float32)
    if FEAT.HAS_SCORE_MOD:  # step 4 in natural units: row b, the QUERY head, query token i, logical key j
        y, _ = FEAT.SCORE_MOD(s * LN2, b, h[:, None], i[:, None], j[None, :], off, smod)
        s = y * LOG2E
    if MASK:
        vis = key_ok[None, :] & row_ok[:, None]
        if FEAT.HAS_RIGHT:
            vis = vis & (j[None, :] <= pos[:, None] + par.win_right)
        if FEAT.HAS_LEFT:
            vis = vis & (j[None, :] >= pos[:, None] - par.win_left)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_rows = d0 * geo.stride_v0 + d1 * geo.stride_v1
    if MASK:
        vmask = key_ok[:, None] & (geo.offs_dv[None, :] < DV)
    else:
        vmask = geo.offs_dv[None, :] < DV
    vt = tl.load(V + geo.v_head + v_rows[:, None] + geo.offs_dv[None, :], mask=vmask, other=0.0)  # (BN, BDV)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=FEAT.PRECISION)
    return acc, m_new, l_i


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
    PAGED: tl.constexpr,  # 0 contiguous, 1 paged, 2 BLOCK_N divides the page size, 3 PS divides BLOCK_N
    PS: tl.constexpr,  # the page size with PAGED 3 (1 otherwise)
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    PRECISION: tl.constexpr,
    FULL: tl.constexpr,  # no Seqlens: every row's length is cap
    HAS_SCORE_MOD: tl.constexpr,
    SCORE_MOD: tl.constexpr,  # the compiled score_mod(score, b, h, q_idx, kv_idx, off, SM) (or None)
    TAIL: tl.constexpr,  # whole key tiles without masks, the rest with them
    PREFETCH: tl.constexpr,  # paged: page-table entries loaded a tile ahead
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
    geo = KeyGeo(hk.to(tl.int64) * stride_kh, hk.to(tl.int64) * stride_vh, stride_k0, stride_k1, stride_v0,
                 stride_v1, offs_d, offs_dv)  # fmt: skip
    # (sm_scale: the qk scale of the step below; no bias or dropout: their pointers are unread placeholders;
    # the ALiBi slope is a per-row vector here, passed on its own)
    par = ScoreParams(qk_scale, softcap, win_left, win_right, Q, 0, 0, 0.0, Q, 0, 0.0)
    FEAT: tl.constexpr = Features(SOFTCAP, False, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, False, False, PRECISION,
                                  HAS_SCORE_MOD, SCORE_MOD)  # fmt: skip
    if not HAS_ALIBI:
        slope = 0.0
    # Tiles [lo, mid) are whole: every key below kv_hi and (right window) at or left of the first row's
    # limit, and no left window. They go without masks; [mid, hi) with them.
    mid = lo
    if TAIL and not HAS_LEFT:
        full_hi = kv_hi
        if HAS_RIGHT:
            full_hi = tl.minimum(full_hi, i_lo + off + win_right + 1)
        mid = tl.maximum(lo + ((full_hi - lo) // BLOCK_N) * BLOCK_N, lo)
    # with PREFETCH a tile's page-table entries are loaded one step before its keys, so no step waits for a
    # table load before it can address its keys
    nxt = _tile_pages(Table, stride_tb, b, lo, cap, ps, num_pages, BLOCK_N, PAGED, PS)
    for part in tl.static_range(2):  # the whole tiles [lo, mid) unmasked, then [mid, hi) masked
        for start_n in range(lo if part == 0 else mid, mid if part == 0 else hi, BLOCK_N):
            d0, d1, nxt = _tile_step(
                nxt, Table, stride_tb, b, start_n, cap, ps, num_pages, BLOCK_N, PAGED, PS, PREFETCH
            )
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, K, V, d0, d1, start_n, kv_hi, row_ok, pos, i, h, b, off, slope, smod, geo,
                par, D, DV, BLOCK_N, FEAT, part == 1,
            )  # fmt: skip

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
