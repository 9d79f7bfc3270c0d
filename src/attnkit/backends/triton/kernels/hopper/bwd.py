"""Hopper (sm_90a) attention backward, dK and dV, in Triton's Gluon dialect: FlashAttention-3 style warp
specialization.

One CTA owns BLOCK_N = 128 key rows of one (batch, KV head) and walks every query tile (BLOCK_M rows) of
every query head of its group that sees them, accumulating dK and dV in registers; it writes them once, with
no atomics. dQ is computed here only with FUSED_DQ (below); without it the plain-Triton dQ pass
(``_bwd.attn_bwd_dq``) runs beside it on a side stream, as after the Triton dK/dV kernel. Inputs are those
of ``_bwd.attn_bwd_dkdv``: the forward's log2 row statistic ``hi`` (16-bit inputs subtract it alone, as the
Triton kernel does; rows with no visible key saved +inf, so p = 0 there) and ``delta = rowsum(dO * O) -
dLSE``.

Partitions (``gl.warp_specialize``; launched with num_warps=4)
    * producer (worker, 1 warp, 24 registers): the TMA loads. K and V of the CTA once, then Q_t and dO_t of
      each visited query tile into a NUM_STAGES-deep ring (slot ``it % NUM_STAGES``, ``it`` counting the
      visited (head, tile) pairs in order).
    * two consumers of 4 warps (240 registers a thread): warpgroup w owns key rows ``64 w .. 64 w + 63`` of
      the CTA's tile, so every product has the key rows as its M dimension (FA3's swapped S and dP):
        S^T  = K_w Q_t^T       (64, BLOCK_M)  A = K_w (shared), B = Q_t^T (shared, permuted)
        dP^T = V_w dO_t^T      (64, BLOCK_M)  A = V_w, B = dO_t^T
        P^T  = exp2(c S^T - hi)               c = scale * log2(e), one FMA + ex2 a score
        dV  += P^T dO_t        (64, D)        A = P^T from registers, B = dO_t (shared)
        dS^T = P^T (dP^T - delta)
        dK  += dS^T Q_t        (64, D)        A = dS^T from registers, B = Q_t
      so P^T and dS^T feed the wgmma from registers, never through shared memory; dK is scaled once at the
      end. The two warpgroups meet only at the ring's mbarriers (the compiler's partition-wide barriers then
      span one warpgroup), so one's exponentials run under the other's wgmmas.

Barrier protocol
    * ``kv_bar`` (count 1): the producer's ``expect`` of both tiles' bytes and the two TMAs complete it;
      both consumers wait phase 0 (always, so that no TMA is in flight when the CTA exits).
    * ``q_ready[s]`` / ``do_ready[s]`` (count 1): ``expect`` + TMA; consumers wait parity
      ``(it // NS) & 1``. Q and dO have separate barriers so that S^T can start before dO has landed.
    * ``q_empty[s]`` / ``do_empty[s]`` (count 2): each consumer arrives once its last wgmma reading the slot
      has been waited for; the producer waits parity ``((it // NS) & 1) ^ 1`` (a fresh barrier passes).

Schedule (causal masking bottom-right aligned: off = Sk - Sq, query i sees key j iff j <= i + off)
    The query tiles of a head are ``[t0, n_m)``: t0 is the first with a row that sees the CTA's first key;
    ``[t0, t_full)`` hold the diagonal and get the mask, ``[t_full, n_m)`` see every key of the CTA and get
    no mask arithmetic. Query rows past Sq (the TMA box reads the next head's rows, or zeros at the end of
    the tensor) load hi = +inf and delta = 0, so they add exact zeros; key rows past Sk are computed and
    never stored.

LISTED (a mask carried as data, ``ops/gluon_bwd.listed_args``): a head's query tiles are those of the CTA's
row of the transposed tile lists (``kernels/ivlists.iv_lists_t`` at BLOCK_M x 128): the partial ones first
(entry j of ``lst``), masked by the masked-row intervals of each of the CTA's keys (``[a, b) U [c, d)``,
loaded once per head, not per tile) and the window flags, then the full ones (entry j - n_part of
``lst + ivl_n``) with no mask arithmetic. Tiles the lists leave out (empty) are never loaded.

FUSED_DQ (``runtime/capability.gluon_fused_dq``: D = 64 from 4k rows, never ``deterministic``)
    Each tile also gives dQ_t = dS K (FA3's way). Each warpgroup stores its 64 rows of dS^T (bf16, the values
    its dK product uses, which then reads them from there) into slot ``it % 2`` of a (2, 128, BLOCK_M) ring
    and arrives on ``ds_ready[slot]`` (count 2). Once both halves are in, warpgroup w computes columns
    ``w D/2 .. (w + 1) D/2`` of dQ_t over all 128 keys: A = the slot transposed (shared, M-major), B = K's
    column half (shared), a (BLOCK_M, D/2) float32 accumulator. That goes through its own staging tile to a
    TMA reduce-add into the float32 buffer ``dqa`` (q's 2D view; the host scales it into dq after). A slot is
    rewritten two tiles later; the other warpgroup has then arrived for the tile between, so it is done
    reading. K rows past Sk are zeroed once (bhsd reads the next head's keys there). dK is staged through V's
    rows in the epilogue, since the other warpgroup's last dQ may still read all of K. Rows past Sq add
    exact zeros (p = 0) into the next head's or batch row's rows, or fall outside the tensor.
    Measured (H200, run L): 1.04-1.11x forward+backward at D = 64 from S = 4k (B=1 H=32 S=16k, B=2 S=8k,
    B=4 S=4k, documents), but 0.71x at B=16 S=1k and 0.87-0.99x at D = 128, where ptxas spills 760 bytes
    against 212 without it.

Device code only: the host side (support check, TMA views, launch) is ``ops/gluon_bwd.py``.
"""

from __future__ import annotations

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

WG_ROWS: gl.constexpr = gl.constexpr(64)
PRODUCER_REGS: gl.constexpr = gl.constexpr(24)
CONSUMER_REGS: gl.constexpr = gl.constexpr(240)


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """``cp.reduce.async.bulk.tensor`` add of shared tile ``src`` into ``tensor_desc`` at ``coord`` (Triton
    3.6's Gluon has the op but no Python wrapper); ``tma.store_wait`` waits for it to have read ``src``."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    add = ir.DESCRIPTOR_REDUCE_KIND.ADD
    _semantic.builder.create_async_tma_reduce(add, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _head_tiles(g, sched, lists, LISTED: gl.constexpr):
    """(n_masked, n_tiles, lst) of query head g of the CTA's group: the head visits n_tiles query tiles, the
    first n_masked with the mask (``_row_start`` gives tile j's first row); ``lst`` its list row (LISTED)."""
    t0, t_full, n_m = sched
    if LISTED:
        IvL, IvC, ivl_h, ivl_n, row0 = lists
        row = row0 + g * ivl_h  # the head's row of lists (B', H', key tiles, 2, query tiles)
        n_part = gl.load(IvC + row * 2)
        n_tiles = n_part + gl.load(IvC + row * 2 + 1)
        lst = IvL + row.to(gl.int64) * 2 * ivl_n
    else:
        n_part = t_full - t0
        n_tiles = n_m - t0
        lst = lists[0]
    return n_part, n_tiles, lst


@gluon.jit
def _row_start(j, t0, n_part, lst, ivl_n, BLOCK_M: gl.constexpr, LISTED: gl.constexpr, PART: gl.constexpr):
    """The first query row of the head's tile j (:func:`_head_tiles`); PART: 1 if j < n_part, 0 if not, -1
    unknown (the producer's single loop)."""
    if LISTED:
        if PART == 1:
            start = gl.load(lst + j)
        elif PART == 0:
            start = gl.load(lst + ivl_n + (j - n_part))
        elif j < n_part:
            start = gl.load(lst + j)
        else:
            start = gl.load(lst + ivl_n + (j - n_part))
    else:
        start = (t0 + j) * BLOCK_M
    return start


@gluon.jit
def _producer(descs, bufs, coords, sched, lists, stats, GROUP, BLOCK_M: gl.constexpr,
              NUM_STAGES: gl.constexpr, LISTED: gl.constexpr, FUSED_DQ: gl.constexpr):  # fmt: skip
    """1 warp: TMA loads of K, V (once) and of Q_t, dO_t into ring slot it % NUM_STAGES (FUSED_DQ: with the
    tile's rows of hi and delta, on the same barriers)."""
    q_desc, do_desc, k_desc, v_desc = descs
    hi_desc, dl_desc, hi_smem, dl_smem, stat_row0 = stats
    k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready, q_empty, do_ready, do_empty = bufs
    q_row0, q_head_rows, q_col0, q_head_cols, k_row, k_col = coords
    t0 = sched[0]
    ivl_n = lists[3]
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [k_row, k_col], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [k_row, k_col], kv_bar, v_smem)
    it = 0
    for g in range(GROUP):
        row0 = q_row0 + g * q_head_rows  # bhsd: the next head's rows; bshd: the same rows
        col = q_col0 + g * q_head_cols  # bshd: the next head's columns
        n_part, n_tiles, lst = _head_tiles(g, sched, lists, LISTED)
        for j in range(n_tiles):
            s = it % NUM_STAGES
            phase = (it // NUM_STAGES) & 1
            start = _row_start(j, t0, n_part, lst, ivl_n, BLOCK_M, LISTED, -1)
            row = row0 + start
            mbarrier.wait(q_empty.index(s), phase ^ 1)  # both consumers are done with tile it - NS
            if FUSED_DQ:
                mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes + hi_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(hi_desc, [stat_row0 + g, start], q_ready.index(s),
                                                hi_smem.index(s))  # fmt: skip
            else:
                mbarrier.expect(q_ready.index(s), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [row, col], q_ready.index(s), q_smem.index(s))
            mbarrier.wait(do_empty.index(s), phase ^ 1)
            if FUSED_DQ:
                mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes + dl_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(dl_desc, [stat_row0 + g, start], do_ready.index(s),
                                                dl_smem.index(s))  # fmt: skip
            else:
                mbarrier.expect(do_ready.index(s), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [row, col], do_ready.index(s), do_smem.index(s))
            it += 1


@gluon.jit
def _tile(
    it,
    m0,
    dk,
    dv,
    k_w,
    v_w,
    mk,
    hi_base,
    d_base,
    SQ,
    off,
    c,
    q_smem,
    do_smem,
    q_ready,
    q_empty,
    do_ready,
    do_empty,
    dq_ctx,
    s_layout: gl.constexpr,
    op_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    MASK: gl.constexpr,
    HAS_LEFT: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
    WG: gl.constexpr,
    FUSED_DQ: gl.constexpr,
):
    """The query tile at row ``m0`` (ring slot of visit ``it``) against this warpgroup's 64 keys: dK, dV
    updated. MASK: 0 none; 1 causal (``mk`` = (keys,)); 2 a partial tile of a mask carried as data, ``mk`` =
    (a, b, c, d, lim_r, lim_l) per key (64,): hidden where the row lies in ``[a, b) U [c, d)``, before
    ``lim_r`` (HAS_RIGHT: key - off - right) or after ``lim_l`` (HAS_LEFT: key - off + left)."""
    s = it % NUM_STAGES
    phase = (it // NUM_STAGES) & 1
    cols = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))  # (BLOCK_M,) query rows
    inside = cols < SQ
    if not FUSED_DQ:  # (FUSED_DQ: from the ring where they are used, not held in registers over the products)
        hi = gl.load(hi_base + cols, mask=inside, other=float("inf"))  # (BLOCK_M,) rows past Sq: p = 0
        delta = gl.load(d_base + cols, mask=inside, other=0.0)  # (BLOCK_M,)
    zero = gl.zeros([WG_ROWS, BLOCK_M], gl.float32, s_layout)
    mbarrier.wait(q_ready.index(s), phase)
    q_t = q_smem.index(s)  # (BLOCK_M, D)
    s_tok = warpgroup_mma(k_w, q_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    mbarrier.wait(do_ready.index(s), phase)
    do_t = do_smem.index(s)  # (BLOCK_M, D)
    dp_tok = warpgroup_mma(v_w, do_t.permute((1, 0)), zero, use_acc=False, is_async=True)
    st = warpgroup_mma_wait(1, deps=(s_tok,))  # (64, BLOCK_M) S^T; dP^T may still run
    if FUSED_DQ:  # (1, BLOCK_M) rows of hi and delta in the ring slot; rows past Sq: the next head's
        hi_smem, dl_smem = dq_ctx[7], dq_ctx[8]
        hi = gl.where(inside[None, :], hi_smem.index(s).load(s_layout), float("inf"))  # (1, BLOCK_M)
    else:
        hi = hi[None, :]
    pt = gl.exp2(st * c - hi)  # (64, BLOCK_M) P^T
    if MASK == 1:  # key <= query + off, as (key - off - m0) <= local query index: one value per row
        lim = mk[0] - off - m0  # (64,)
        local = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))  # (BLOCK_M,)
        pt = gl.where(lim[:, None] <= local[None, :], pt, 0.0)
    if MASK == 2:
        lo_a, hi_a, lo_b, hi_b, lim_r, lim_l = mk  # (as local rows of this tile: one subtraction a key)
        r = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))[None, :]  # (1, BLOCK_M)
        pt = gl.where((r >= (lo_a - m0)[:, None]) & (r < (hi_a - m0)[:, None]), 0.0, pt)
        pt = gl.where((r >= (lo_b - m0)[:, None]) & (r < (hi_b - m0)[:, None]), 0.0, pt)
        if HAS_RIGHT:
            pt = gl.where(r >= (lim_r - m0)[:, None], pt, 0.0)
        if HAS_LEFT:
            pt = gl.where(r <= (lim_l - m0)[:, None], pt, 0.0)
    p_op = gl.convert_layout(pt.to(q_smem.dtype), op_layout)
    dv = warpgroup_mma(p_op, do_t, dv, is_async=True)
    dpt = warpgroup_mma_wait(1, deps=(dp_tok,))  # (64, BLOCK_M) dP^T; dV may still run
    if FUSED_DQ:
        delta = gl.where(inside[None, :], dl_smem.index(s).load(s_layout), 0.0)  # (1, BLOCK_M)
    else:
        delta = delta[None, :]
    dst = pt * (dpt - delta)  # (64, BLOCK_M) dS^T (unscaled)
    ds16 = dst.to(q_smem.dtype)
    if FUSED_DQ:  # this warpgroup's 64 key rows of dS^T into the tile's slot, for both warpgroups' dQ
        ds_smem, ds_ready, dq_stage, dqa_desc, k_half, dq_row, dq_col = dq_ctx[:7]
        ds_slot = ds_smem.index(it % 2)  # (BLOCK_N, BLOCK_M)
        ds_slot.slice(WG * WG_ROWS, WG_ROWS).store(ds16)
        fence_async_shared()
        mbarrier.arrive(ds_ready.index(it % 2))
        ds_op = ds_slot.slice(WG * WG_ROWS, WG_ROWS)  # (dK's A from there: no registers held for it)
    else:
        ds_op = gl.convert_layout(ds16, op_layout)
    dk = warpgroup_mma(ds_op, q_t, dk, is_async=True)
    if FUSED_DQ:  # dQ[:, half WG] = dS (BLOCK_M, BLOCK_N) K[:, half WG] once both halves of dS^T are in
        mbarrier.wait(ds_ready.index(it % 2), (it // 2) & 1)
        HALF: gl.constexpr = k_half.shape[1]
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16]
        )
        dq = warpgroup_mma(
            ds_slot.permute((1, 0)), k_half, gl.zeros([BLOCK_M, HALF], gl.float32, dq_layout), use_acc=False,
            is_async=True,
        )  # fmt: skip
        dv, dk, p_op, dq = warpgroup_mma_wait(0, deps=(dv, dk, p_op, dq))
    else:
        dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))
    mbarrier.arrive(q_empty.index(s))
    mbarrier.arrive(do_empty.index(s))
    if FUSED_DQ:  # staged, then added into the float32 dQ by TMA (after the previous add has read the stage)
        tma.store_wait(0)
        gl.thread_barrier()
        stage = dq_stage.index(WG)
        stage.store(dq)
        fence_async_shared()
        _tma_reduce_add(dqa_desc, [dq_row + m0, dq_col], stage)
    return dk, dv


@gluon.jit
def _consumer(
    bufs,
    work,
    fused,
    lists,
    masks,
    GROUP,
    BLOCK_M: gl.constexpr,
    HEAD_D: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    WG: gl.constexpr,
    LISTED: gl.constexpr,
    HAS_LEFT: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
    FUSED_DQ: gl.constexpr,
):
    """Warpgroup WG: key rows 64 WG .. 64 WG + 63 of the CTA's tile; every visited query tile, then dK, dV."""
    k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready, q_empty, do_ready, do_empty = bufs
    DK, DV, Hi, Delta, dk_base, dv_base, stride_ks, stat_base, SQ, SK, n0, off, c, scale, sched = work
    Iv, stride_ih, win_left, win_right = masks  # (Iv: this batch row's intervals, head h0)
    ds_smem, ds_ready, dq_stage, dqa_desc, q_row0, q_head_rows, q_col0, q_head_cols, stats = fused
    t0 = sched[0]
    ivl_n = lists[3]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16]
    )
    a_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16]
    )
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout, k_width=2)
    k_w = k_smem.slice(WG * WG_ROWS, WG_ROWS)  # (64, D)
    v_w = v_smem.slice(WG * WG_ROWS, WG_ROWS)  # (64, D)
    keys = n0 + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, s_layout))  # (64,)
    HALF: gl.constexpr = HEAD_D // 2  # FUSED_DQ: warpgroup WG's columns of dQ
    k_half = k_smem.slice(WG * HALF, HALF, dim=1)  # (BLOCK_N, HALF)

    dk = gl.zeros([WG_ROWS, HEAD_D], gl.float32, a_layout)  # (64, D)
    dv = gl.zeros([WG_ROWS, HEAD_D], gl.float32, a_layout)  # (64, D)
    mbarrier.wait(kv_bar, 0)
    # FUSED_DQ: K rows past Sk (the next head's keys, in bhsd) would add dS K to dQ: zeroed here, once
    if FUSED_DQ and n0 + (WG + 1) * WG_ROWS > SK:
        VEC0: gl.constexpr = 8
        TPW0: gl.constexpr = HEAD_D // VEC0 if HEAD_D // VEC0 < 32 else 32
        z_layout: gl.constexpr = gl.BlockedLayout([1, VEC0], [32 // TPW0, TPW0], [4, 1], [1, 0])
        rows = n0 + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, z_layout))
        k_w.store(gl.where(rows[:, None] < SK, k_w.load(z_layout), 0.0).to(k_w.dtype))
        fence_async_shared()  # (before this warpgroup's wgmmas and its first ds_ready arrive)
    it = 0
    for g in range(GROUP):
        hi_base = Hi + stat_base + g * SQ  # this query head's row statistics (B, Hq, Sq) contiguous
        d_base = Delta + stat_base + g * SQ
        n_part, n_tiles, lst = _head_tiles(g, sched, lists, LISTED)
        dq_ctx = (ds_smem, ds_ready, dq_stage, dqa_desc, k_half, q_row0 + g * q_head_rows,
                  q_col0 + g * q_head_cols + WG * HALF, stats[2], stats[3])  # fmt: skip
        if LISTED:  # the masked-row intervals of this warpgroup's keys, for head g (keys past Sk: none)
            iv = Iv + (g * stride_ih).to(gl.int64) + keys * 4
            inside = keys < SK
            mk = (
                gl.load(iv, mask=inside, other=0),
                gl.load(iv + 1, mask=inside, other=0),
                gl.load(iv + 2, mask=inside, other=0),
                gl.load(iv + 3, mask=inside, other=0),
                keys - off - win_right,
                keys - off + win_left,
            )
            MASKED: gl.constexpr = 2
        else:
            mk = (keys,)
            MASKED: gl.constexpr = 1
        for j in range(n_part):  # the diagonal (causal) or the partial tiles (LISTED): masked
            m0 = _row_start(j, t0, n_part, lst, ivl_n, BLOCK_M, LISTED, 1)
            dk, dv = _tile(
                it, m0, dk, dv, k_w, v_w, mk, hi_base, d_base, SQ, off, c, q_smem, do_smem, q_ready,
                q_empty, do_ready, do_empty, dq_ctx, s_layout, op_layout, BLOCK_M, NUM_STAGES, MASKED,
                HAS_LEFT, HAS_RIGHT, WG, FUSED_DQ,
            )  # fmt: skip
            it += 1
        for j in range(n_part, n_tiles):  # every key visible to every row
            m0 = _row_start(j, t0, n_part, lst, ivl_n, BLOCK_M, LISTED, 0)
            dk, dv = _tile(
                it, m0, dk, dv, k_w, v_w, mk, hi_base, d_base, SQ, off, c, q_smem, do_smem, q_ready,
                q_empty, do_ready, do_empty, dq_ctx, s_layout, op_layout, BLOCK_M, NUM_STAGES, 0, HAS_LEFT,
                HAS_RIGHT, WG, FUSED_DQ,
            )  # fmt: skip
            it += 1

    # ---- epilogue: stage through this warpgroup's K and V rows (dead now) for 16-byte row stores
    VEC: gl.constexpr = 8  # 16 bytes of a 16-bit type per thread
    TPW_N: gl.constexpr = HEAD_D // VEC if HEAD_D // VEC < 32 else 32
    st_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_N, TPW_N], [4, 1], [1, 0])
    keys_st = n0 + WG * WG_ROWS + gl.arange(0, WG_ROWS, layout=gl.SliceLayout(1, st_layout))
    cols_st = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, st_layout))
    offs = keys_st.to(gl.int64)[:, None] * stride_ks + cols_st[None, :]  # (64, D)
    row_ok = keys_st[:, None] < SK
    if FUSED_DQ:  # dK through V's rows too: the other warpgroup's last dQ may still read all of K
        v_w.store(dv.to(v_w.dtype))
        gl.store(DV + dv_base + offs, v_w.load(st_layout), mask=row_ok)
        gl.thread_barrier()
        v_w.store((dk * scale).to(v_w.dtype))
        gl.store(DK + dk_base + offs, v_w.load(st_layout), mask=row_ok)
        tma.store_wait(0)  # no add in flight reading the stage when the CTA exits
    else:
        k_w.store((dk * scale).to(k_w.dtype))
        gl.store(DK + dk_base + offs, k_w.load(st_layout), mask=row_ok)
        v_w.store(dv.to(v_w.dtype))
        gl.store(DV + dv_base + offs, v_w.load(st_layout), mask=row_ok)


_RUNTIME = ["Hq", "Hk", "GROUP", "SQ", "SK", "ivl_b", "ivl_h", "ivl_n", "stride_ib", "stride_ih", "win_left",
            "win_right"]  # fmt: skip


@gluon.jit(do_not_specialize=_RUNTIME)  # one compile serves every shape
def _attn_bwd_dkdv_ws(
    q_desc,
    do_desc,
    k_desc,
    v_desc,
    DK,
    DV,
    Hi,
    Delta,
    stride_kb,
    stride_kh,
    stride_ks,
    Hq,
    Hk,
    GROUP,
    SQ,
    SK,
    c,
    scale,
    IvL,  # LISTED: the transposed tile lists (B', H', key tiles, 2, query tiles) int32 and counts (..., 2) of
    IvC,  # kernels/ivlists.py at (BLOCK_M, 128); list row of (b, h, key tile) = b ivl_b + h ivl_h + tile
    ivl_b,
    ivl_h,
    ivl_n,
    Iv,  # LISTED: the mask's masked-row intervals (B', H', Sk, 4) int32 (0 strides on broadcast dims)
    stride_ib,
    stride_ih,
    win_left,  # LISTED: the window bounds (causal: HAS_RIGHT with right = 0)
    win_right,
    dqa_desc,  # FUSED_DQ: TMA view of the float32 dQ accumulator (q's 2D view, boxes (BLOCK_M, D / 2))
    hi_desc,  # FUSED_DQ: TMA views of Hi and Delta as (B Hq, Sq), boxes (1, BLOCK_M) (Sq % 4 == 0)
    dl_desc,
    BSHD: gl.constexpr,
    CAUSAL: gl.constexpr,
    BLOCK_M: gl.constexpr,
    HEAD_D: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    LISTED: gl.constexpr,
    HAS_LEFT: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
    FUSED_DQ: gl.constexpr,
):
    BLOCK_N: gl.constexpr = 2 * WG_ROWS
    pid_n = gl.program_id(0)  # key tile: tile 0 has the most query tiles under causal, and starts first
    bhk = gl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    n0 = pid_n * BLOCK_N
    off = SK - SQ
    n_m = (SQ + BLOCK_M - 1) // BLOCK_M
    if CAUSAL:
        # first row that sees key n0 is n0 - off; every row from n0 + BLOCK_N - 1 - off on sees the whole tile
        t0 = gl.minimum(gl.maximum(n0 - off, 0) // BLOCK_M, n_m)
        t_full = gl.minimum((gl.maximum(n0 + BLOCK_N - 1 - off, 0) + BLOCK_M - 1) // BLOCK_M, n_m)
    else:
        t0 = 0
        t_full = 0

    h0 = hk * GROUP  # the group's first query head
    if BSHD:  # (B*S, H*D): rows b*S + s, head h at column h*D
        q_row0 = b * SQ
        q_head_rows = 0
        q_col0 = h0 * HEAD_D
        q_head_cols = HEAD_D
        k_row = b * SK + n0
        k_col = hk * HEAD_D
    else:  # (B*H*S, D)
        q_row0 = (b * Hq + h0) * SQ
        q_head_rows = SQ
        q_col0 = 0
        q_head_cols = 0
        k_row = bhk * SK + n0
        k_col = 0
    dk_base = b.to(gl.int64) * stride_kb + hk.to(gl.int64) * stride_kh  # dK and dV share k's layout
    stat_base = (b * Hq + h0).to(gl.int64) * SQ  # hi, delta: (B, Hq, Sq) contiguous

    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], k_desc.layout)  # (BLOCK_N, D)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_D], v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_D], do_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    if FUSED_DQ:
        ds_smem = gl.allocate_shared_memory(
            dtype, [2, BLOCK_N, BLOCK_M], gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        )  # (slot, key, query) dS^T of the last two tiles
        dq_stage = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, HEAD_D // 2], dqa_desc.layout)  # (WG)
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)
        # the tile's rows of hi (beside Q in the ring) and delta (beside dO)
        hi_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 1, BLOCK_M], hi_desc.layout)
        dl_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 1, BLOCK_M], dl_desc.layout)
    else:
        ds_smem = k_smem
        dq_stage = k_smem
        ds_ready = kv_bar
        hi_smem = k_smem
        dl_smem = k_smem
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(do_empty.index(i), count=2)

    sched = (t0, t_full, n_m)
    lists = (IvL, IvC, ivl_h, ivl_n, b * ivl_b + h0 * ivl_h + pid_n)
    masks = (Iv + b.to(gl.int64) * stride_ib + h0.to(gl.int64) * stride_ih, stride_ih, win_left, win_right)
    bufs = (k_smem, v_smem, q_smem, do_smem, kv_bar, q_ready, q_empty, do_ready, do_empty)
    work = (DK, DV, Hi, Delta, dk_base, dk_base, stride_ks, stat_base, SQ, SK, n0, off, c, scale, sched)
    descs = (q_desc, do_desc, k_desc, v_desc)
    coords = (q_row0, q_head_rows, q_col0, q_head_cols, k_row, k_col)
    stats = (hi_desc, dl_desc, hi_smem, dl_smem, b * Hq + h0)
    fused = (ds_smem, ds_ready, dq_stage, dqa_desc, q_row0, q_head_rows, q_col0, q_head_cols, stats)
    gl.warp_specialize(
        [
            (_consumer, (bufs, work, fused, lists, masks, GROUP, BLOCK_M, HEAD_D, NUM_STAGES, 0, LISTED,
                         HAS_LEFT, HAS_RIGHT, FUSED_DQ)),
            (_consumer, (bufs, work, fused, lists, masks, GROUP, BLOCK_M, HEAD_D, NUM_STAGES, 1, LISTED,
                         HAS_LEFT, HAS_RIGHT, FUSED_DQ)),
            (_producer, (descs, bufs, coords, sched, lists, stats, GROUP, BLOCK_M, NUM_STAGES, LISTED,
                         FUSED_DQ)),
        ],
        [4, 1],
        [CONSUMER_REGS, PRODUCER_REGS],
    )
