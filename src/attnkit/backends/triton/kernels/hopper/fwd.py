"""Hopper (sm_90a) attention forward in Triton's Gluon dialect: FlashAttention-3 style warp specialization.

A work item is BLOCK_M = 128 query rows of one (batch, query head) against every visible key tile. The
grid is 1-D over the items; CTA p takes items p, p + G, ... (G = the grid's size): one each, or, with
PERSISTENT, one CTA per multiprocessor streaming its items (the next item's loads run under the current
one's last tiles and epilogue; worth +30% at S = 512 on an H200, and +2-4% at D = 64 past 4K keys).
Compared with the plain-Triton kernel in ``_fwd.py`` (same outputs: ``out``, natural-log ``lse``, and the
exact log2 row statistics ``hi + lo == m + log2(l)``), it spells out what the compiler would otherwise
have to discover.

Partitions (``gl.warp_specialize``)
    * producer (worker, 1 warp, 24 registers): issues every TMA load. Per item, its Q tile, then K_j and
      V_j of each visited key tile j into a NUM_STAGES-deep shared-memory ring (slot ``g % NUM_STAGES``,
      g counting the CTA's key tiles across its items; the formulas below write g as j).
    * consumers: wgmma and the online softmax, 240 registers a thread. Warpgroup w owns query rows
      ``64 w .. 64 w + 63`` of the tile. P feeds the second wgmma from registers (DotOperandLayout,
      k_width=2), never through shared memory.
      - SPLIT=False: one consumer, the default partition of 8 warps (num_warps=8); the accumulators use
        ``NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1])``.
      - SPLIT=True (the default): two consumers of 4 warps each (num_warps=4), the default partition for
        rows 0..63 and a worker for rows 64..127, each on its own 64-row slice of the Q tile. They meet
        only at the ring's mbarriers, so the compiler's partition-wide ``bar.sync`` (before every
        mbarrier arrive and after it, before the next wait) spans one warpgroup instead of coupling
        both: one warpgroup's softmax then runs under the other's wgmma (the effect FA3 gets from its
        explicit ping-pong), worth +10-20% on an H200 at long sequences.

Barrier protocol (``CONSUMERS`` = 2 with SPLIT, else 1)
    * ``q_ready[b]`` / ``q_empty[b]`` (Q_BUFS = 2 buffers when PERSISTENT, else 1; item i uses buffer
      ``i % Q_BUFS``): the producer's ``expect`` + TMA completes ``q_ready``, consumers wait parity
      ``(i // Q_BUFS) & 1``; each consumer arrives on ``q_empty`` (count CONSUMERS) after its epilogue,
      which stages O through the buffer (generic-proxy writes, hence a ``fence_async_shared`` first),
      and the producer waits for that before the buffer's next TMA.
    * ``k_ready[s]`` / ``v_ready[s]`` (count 1): the producer arrives (``expect`` with the tile's byte
      count) and the TMA's transaction bytes complete the phase; consumers wait parity ``(j // NS) & 1``.
      K and V have separate barriers so that Q K_j^T can start before V_j has landed.
    * ``k_empty[s]`` / ``v_empty[s]`` (count CONSUMERS): each consumer arrives once the wgmma that read
      the slot has been waited for (Triton puts a barrier over the partition's warps before its
      single-thread arrive, so every warpgroup of that partition is done with it); the producer waits
      parity ``((j // NS) & 1) ^ 1`` before it refills the slot (a fresh barrier counts its phase "-1"
      as complete, so the first round passes).
    Every TMA the producer issues is waited for by the consumer (Q included, even when the tile has no
    visible key), so no copy is in flight when the CTA exits. The ring is only ever read by wgmma and
    written by TMA (both async proxy), so it needs no proxy fence.

Intra-warpgroup overlap (OVERLAP=True, FA3 section 3.2)
    Iteration j issues ``S_{j+1} = Q K_{j+1}^T`` and then ``O += P_j V_j``, both async; waits for
    ``S_{j+1}`` only (``warpgroup_mma_wait(1)``: groups retire in order), runs the softmax of
    ``S_{j+1}`` while ``P_j V_j`` is still on the tensor cores, then waits for everything, rescales O by
    ``alpha_{j+1}`` and releases the slots. Invariant: when ``P_j V_j`` is issued, O and P_j are both
    relative to the running max through tile j. OVERLAP=False is the plain order (S_j, softmax, O *=
    alpha, P_j V_j, wait) for comparison.

Tile schedule
    Causal masking is bottom-right aligned (``off = Sk - Sq``; row i sees key j iff ``j <= i + off``).
    Only tiles with a visible key for some row are visited: ``n_tiles`` of them, the first ``n_full``
    fully visible (no mask arithmetic at all) and the rest, last in the loop, masked. Rows that see no
    key end with ``m = -inf``, ``l = 0``: out 0, lse -inf, hi +inf, lo 0. Sk is a multiple of BLOCK_N, so
    a K/V tile never crosses a sequence end; rows past Sq are computed (on whatever Q rows the TMA box
    covers, zero past the tensor's end) and never stored.

LISTED (a mask carried as data, ``ops/gluon_fwd.try_listed``): an item's tiles are those of its row of tile
lists (``kernels/ivlists.py``, built at this kernel's tiles): the full ones first (no mask arithmetic), then
the partial ones with the mask's column intervals and the causal / right window bound applied per score;
the producer loads K/V at each listed tile's start. Never persistent (items differ in length).

Softmax in log2 units: ``p = exp2(s * c - m)`` with ``c = scale * log2(e)`` (one FMA per score), fp32
statistics and accumulators. One key tile's steps (softmax, FA3 overlap, plain order) are ``fwd_tile.py``.

Device code only: the host side (descriptors, support checks, launches) is ``ops/gluon_fwd.py``.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from attnkit.backends.triton.kernels.hopper.fwd_tile import overlap_step, serial_step, softmax_tile, two_sum

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)
PRODUCER_REGS: gl.constexpr = gl.constexpr(24)  # the TMA warp needs only scalars
CONSUMER_REGS: gl.constexpr = gl.constexpr(240)  # the second consumer warpgroup when SPLIT


@gluon.jit
def _item(t, sched, lists, CAUSAL: gl.constexpr, LISTED: gl.constexpr, BSHD: gl.constexpr,
          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr):  # fmt: skip
    """Work item ``t``: query tile ``t % n_m`` of (batch, query head) ``t // n_m``. Returns (bh, b, h, m0,
    n_tiles, n_full, lst, (q_row, q_col, k_row, k_col)): the item visits n_tiles key tiles, the first
    n_full fully visible; the 2D TMA coordinates of its Q tile and of key 0. Unlisted, tile j starts at key
    j * BLOCK_N; LISTED (a mask carried as data, ``kernels/ivlists.py``), tile j is entry j of the full list
    ``lst + ivl_n`` for j < n_full, else entry j - n_full of the partial list ``lst`` (``_tile_start``)."""
    n_m, Hq, Hk, GROUP, SQ, SK = sched
    pid_m = t % n_m
    if CAUSAL:  # load balance: a head's longest rows (last query tiles) start first
        pid_m = n_m - 1 - pid_m
    bh = t // n_m
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    off = SK - SQ
    if LISTED:
        IvL, IvC, ivl_b, ivl_h, ivl_n = lists
        row = b * ivl_b + h * ivl_h + pid_m  # the item's row of lists (B', H', query tiles, 2, key tiles)
        n_part = gl.load(IvC + row * 2)
        n_full = gl.load(IvC + row * 2 + 1)
        n_tiles = n_full + n_part
        lst = IvL + row.to(gl.int64) * 2 * ivl_n
    elif CAUSAL:
        m1 = gl.minimum(m0 + BLOCK_M, SQ) - 1  # last real row of the tile
        hi = gl.minimum(gl.maximum(m1 + off + 1, 0), SK)
        n_tiles = (hi + BLOCK_N - 1) // BLOCK_N
        n_full = gl.minimum(gl.maximum(m0 + off + 1, 0) // BLOCK_N, n_tiles)
        lst = lists[0]
    else:
        n_tiles = SK // BLOCK_N
        n_full = n_tiles
        lst = lists[0]
    # 2D TMA coordinates: bhsd flattens to (B*H*S, D) rows, bshd to (B*S, H*D) with column h*D
    if BSHD:
        coords = (b * SQ + m0, h * HEAD_D, b * SK, hk * HEAD_D)
    else:
        coords = (bh * SQ + m0, 0, (b * Hk + hk) * SK, 0)
    return bh, b, h, m0, n_tiles, n_full, lst, coords


@gluon.jit
def _tile_start(j, n_full, lst, ivl_n, BLOCK_N: gl.constexpr, LISTED: gl.constexpr):
    """The first key of the item's tile j (see :func:`_item`)."""
    if LISTED:
        if j < n_full:
            start = gl.load(lst + ivl_n + j)
        else:
            start = gl.load(lst + (j - n_full))
    else:
        start = j * BLOCK_N
    return start


@gluon.jit
def _produce_item(descs, bufs, coords, tiles, i, g0, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                  Q_BUFS: gl.constexpr, LISTED: gl.constexpr):  # fmt: skip
    """The TMA loads of one work item: its Q tile into Q buffer ``i % Q_BUFS`` once the consumers have
    released it, then K_j and V_j into ring slot ``(g0 + j) % NUM_STAGES`` (``g0``: key tiles this CTA
    loaded before the item); ``tiles`` = (n_tiles, n_full, lst, ivl_n) as :func:`_item` gave them."""
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bufs
    q_row, q_col, k_row, k_col = coords
    n_tiles, n_full, lst, ivl_n = tiles
    qb = i % Q_BUFS
    mbarrier.wait(q_empty.index(qb), ((i // Q_BUFS) & 1) ^ 1)
    mbarrier.expect(q_ready.index(qb), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, q_col], q_ready.index(qb), q_smem.index(qb))
    for j in range(n_tiles):
        s = (g0 + j) % NUM_STAGES
        phase = ((g0 + j) // NUM_STAGES) & 1
        row = k_row + _tile_start(j, n_full, lst, ivl_n, BLOCK_N, LISTED)
        # the slot's previous tile must have been released by the consumers
        mbarrier.wait(k_empty.index(s), phase ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, k_col], k_ready.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), phase ^ 1)
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, k_col], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _producer(descs, bufs, items, sched, lists, CAUSAL: gl.constexpr, LISTED: gl.constexpr,
              BSHD: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
              NUM_STAGES: gl.constexpr, Q_BUFS: gl.constexpr, PERSISTENT: gl.constexpr):  # fmt: skip
    """1 warp: every TMA load, item after item (one item unless PERSISTENT)."""
    t0, total, step = items
    ivl_n = lists[4]
    if PERSISTENT:
        g0 = 0
        for t in range(t0, total, step):
            _, _, _, _, n_tiles, n_full, lst, coords = _item(
                t, sched, lists, CAUSAL, LISTED, BSHD, BLOCK_M, BLOCK_N, HEAD_D
            )
            i = (t - t0) // step  # the item's number in this CTA
            _produce_item(descs, bufs, coords, (n_tiles, n_full, lst, ivl_n), i, g0, BLOCK_N, NUM_STAGES,
                          Q_BUFS, LISTED)  # fmt: skip
            g0 += n_tiles
    else:
        _, _, _, _, n_tiles, n_full, lst, coords = _item(
            t0, sched, lists, CAUSAL, LISTED, BSHD, BLOCK_M, BLOCK_N, HEAD_D
        )
        _produce_item(descs, bufs, coords, (n_tiles, n_full, lst, ivl_n), 0, 0, BLOCK_N, NUM_STAGES, Q_BUFS,
                      LISTED)  # fmt: skip


@gluon.jit
def _consume_item(
    bufs,
    out,
    item,
    masks,
    i,
    g0,
    c,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    Q_BUFS: gl.constexpr,
    OVERLAP: gl.constexpr,
    LISTED: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
    WG: gl.constexpr,
    WARPS: gl.constexpr,
):
    """wgmma + online softmax over one work item's visited key tiles, then its epilogue (masked stores);
    ``i``: the item's number in this CTA (its Q buffer is ``i % Q_BUFS``), ``g0``: key tiles before it.
    The first ``n_full`` tiles run unmasked; the rest are masked: causal (unlisted), or LISTED the partial
    tiles of a mask carried as data (``masks`` = (Iv, stride_ib, stride_ih, ivl_n, right)).

    WARPS = 8: the only consumer, all BLOCK_M rows (each warpgroup 64 of them). WARPS = 4 (SPLIT): one of
    two consumer partitions, rows ``64 WG .. 64 WG + 63`` of the tile, synchronised with the other only
    through the mbarriers (the compiler's partition-wide barriers then span one warpgroup, not two).
    """
    q_bufs, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty = bufs
    Out, Lse, Stats, stride_ob, stride_oh, stride_os, stats_stride, SQ, SK = out
    bh, b, h, m0, n_tiles, n_full, lst = item
    Iv, stride_ib, stride_ih, ivl_n, win_right = masks
    off = SK - SQ
    o_base = b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh
    row_base = bh.to(gl.int64) * SQ  # lse (B, Hq, Sq) and stats (2, B, Hq, Sq), contiguous
    ROWS: gl.constexpr = 16 * WARPS  # rows this partition owns: 16 per warp
    # each warpgroup owns 64 rows; the wgmma N is the whole tile (BLOCK_N for S, HEAD_D for O)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEAD_D, 16]
    )
    qb = i % Q_BUFS
    q_smem = q_bufs.index(qb)  # (BLOCK_M, HEAD_D)
    if ROWS < BLOCK_M:
        q_smem = q_smem.slice(WG * ROWS, ROWS)  # (ROWS, HEAD_D): this warpgroup's query rows
    m0 = m0 + WG * ROWS
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)

    o = gl.zeros([ROWS, HEAD_D], gl.float32, o_layout)  # (ROWS, HEAD_D)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)  # (ROWS,) log2 units
    l_i = gl.zeros([ROWS], gl.float32, row_s)  # (ROWS,)
    rows = m0 + gl.arange(0, ROWS, layout=row_s)  # (ROWS,) query rows in the sequence
    # the last key each query row sees (causal; LISTED with HAS_RIGHT, ``right`` past the diagonal) and the
    # mask's column intervals of this (batch, head)
    if LISTED:
        iv = Iv + b.to(gl.int64) * stride_ib + h.to(gl.int64) * stride_ih
        mk = (rows, rows + off + win_right, iv)
        MASKED: gl.constexpr = 2
    else:
        mk = (rows, rows + off, Iv)
        MASKED: gl.constexpr = 1

    mbarrier.wait(q_ready.index(qb), (i // Q_BUFS) & 1)  # always: no TMA may be in flight at exit
    if OVERLAP:
        if n_tiles > 0:
            # prologue: S_0 and its softmax, nothing to overlap with yet
            s0 = g0 % NUM_STAGES
            mbarrier.wait(k_ready.index(s0), (g0 // NUM_STAGES) & 1)
            s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
            s_tok = warpgroup_mma(
                q_smem, k_smem.index(s0).permute((1, 0)), s_zero, use_acc=False, is_async=True
            )
            s = warpgroup_mma_wait(0, deps=(s_tok,))  # (ROWS, BLOCK_N)
            mbarrier.arrive(k_empty.index(s0))
            if n_full > 0:
                p, alpha, m_i, l_i = softmax_tile(s, m_i, l_i, mk, 0, c, BLOCK_N, 0, HAS_RIGHT)
            else:
                col = _tile_start(0, n_full, lst, ivl_n, BLOCK_N, LISTED)
                p, alpha, m_i, l_i = softmax_tile(s, m_i, l_i, mk, col, c, BLOCK_N, MASKED, HAS_RIGHT)
            p = gl.convert_layout(p.to(q_smem.dtype), p_layout)  # (ROWS, BLOCK_N) wgmma A operand
            # steady state: iteration j computes S_{j+1}; tiles 1 .. n_full - 1 unmasked, the rest masked
            split = gl.maximum(n_full - 1, 0)
            for j in range(0, split):
                o, p, m_i, l_i = overlap_step(
                    j, g0, o, p, m_i, l_i, mk, 0, c, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
                    v_empty, s_layout, o_layout, p_layout, ROWS, BLOCK_N, NUM_STAGES, 0, HAS_RIGHT,
                )  # fmt: skip
            for j in range(split, n_tiles - 1):
                col = _tile_start(j + 1, n_full, lst, ivl_n, BLOCK_N, LISTED)
                o, p, m_i, l_i = overlap_step(
                    j, g0, o, p, m_i, l_i, mk, col, c, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready,
                    v_empty, s_layout, o_layout, p_layout, ROWS, BLOCK_N, NUM_STAGES, MASKED, HAS_RIGHT,
                )  # fmt: skip
            # drain: O += P_last V_last
            g_last = g0 + n_tiles - 1
            sl = g_last % NUM_STAGES
            mbarrier.wait(v_ready.index(sl), (g_last // NUM_STAGES) & 1)
            o_tok = warpgroup_mma(p, v_smem.index(sl), o, is_async=True)
            o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
            mbarrier.arrive(v_empty.index(sl))
    else:
        for j in range(0, n_full):
            o, m_i, l_i = serial_step(
                j, g0, o, m_i, l_i, mk, 0, c, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                s_layout, o_layout, p_layout, ROWS, BLOCK_N, NUM_STAGES, 0, HAS_RIGHT,
            )  # fmt: skip
        for j in range(n_full, n_tiles):
            col = _tile_start(j, n_full, lst, ivl_n, BLOCK_N, LISTED)
            o, m_i, l_i = serial_step(
                j, g0, o, m_i, l_i, mk, col, c, q_smem, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty,
                s_layout, o_layout, p_layout, ROWS, BLOCK_N, NUM_STAGES, MASKED, HAS_RIGHT,
            )  # fmt: skip

    # ---- epilogue: normalise, stage O through Q's (now dead) shared tile for 16-byte row stores
    has_key = l_i > 0.0  # (BLOCK_M,)
    l_safe = gl.where(has_key, l_i, 1.0)
    log2_l = gl.log2(l_safe)
    inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
    o = o * inv[:, None]  # rows without a visible key accumulated exact zeros
    q_smem.store(o.to(q_smem.dtype))
    VEC: gl.constexpr = 8  # 16 bytes of a 16-bit type per thread
    TPW_N: gl.constexpr = HEAD_D // VEC if HEAD_D // VEC < 32 else 32
    st_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_N, TPW_N], [WARPS, 1], [1, 0])
    o_st = q_smem.load(st_layout)  # (ROWS, HEAD_D)
    # the Q buffer is free again (its next TMA write must follow these generic-proxy accesses)
    fence_async_shared()
    mbarrier.arrive(q_empty.index(qb))
    rows_st = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, st_layout))
    cols_st = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, st_layout))
    o_ptrs = Out + o_base + rows_st.to(gl.int64)[:, None] * stride_os + cols_st[None, :]
    gl.store(o_ptrs, o_st, mask=rows_st[:, None] < SQ)

    lse = gl.where(has_key, (m_i + log2_l) * LN2, float("-inf"))  # natural log
    hi, lo = two_sum(m_i, log2_l)  # log2 units, exact: the backward recomputes p = exp2(s - hi - lo)
    row_mask = rows < SQ
    gl.store(Lse + row_base + rows, lse, mask=row_mask)
    gl.store(Stats + row_base + rows, gl.where(has_key, hi, float("inf")), mask=row_mask)
    gl.store(Stats + stats_stride + row_base + rows, gl.where(has_key, lo, 0.0), mask=row_mask)


@gluon.jit
def _consumer(
    bufs,
    out,
    items,
    sched,
    lists,
    masks,
    c,
    CAUSAL: gl.constexpr,
    LISTED: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
    BSHD: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    Q_BUFS: gl.constexpr,
    OVERLAP: gl.constexpr,
    PERSISTENT: gl.constexpr,
    WG: gl.constexpr,
    WARPS: gl.constexpr,
):
    """:func:`_consume_item` for each of the CTA's work items (one unless PERSISTENT)."""
    t0, total, step = items
    if PERSISTENT:
        g0 = 0
        for t in range(t0, total, step):
            bh, b, h, m0, n_tiles, n_full, lst, _ = _item(
                t, sched, lists, CAUSAL, LISTED, BSHD, BLOCK_M, BLOCK_N, HEAD_D
            )
            i = (t - t0) // step  # the item's number in this CTA
            _consume_item(
                bufs, out, (bh, b, h, m0, n_tiles, n_full, lst), masks, i, g0, c, BLOCK_M, BLOCK_N, HEAD_D,
                NUM_STAGES, Q_BUFS, OVERLAP, LISTED, HAS_RIGHT, WG, WARPS,
            )  # fmt: skip
            g0 += n_tiles
    else:
        bh, b, h, m0, n_tiles, n_full, lst, _ = _item(
            t0, sched, lists, CAUSAL, LISTED, BSHD, BLOCK_M, BLOCK_N, HEAD_D
        )
        _consume_item(
            bufs, out, (bh, b, h, m0, n_tiles, n_full, lst), masks, 0, 0, c, BLOCK_M, BLOCK_N, HEAD_D,
            NUM_STAGES, Q_BUFS, OVERLAP, LISTED, HAS_RIGHT, WG, WARPS,
        )  # fmt: skip


@gluon.jit(do_not_specialize=["Hq", "Hk", "GROUP", "SQ", "SK", "BH", "ivl_b", "ivl_h", "ivl_n", "stride_ib",
                              "stride_ih", "win_right"])  # one compile serves every shape
def _attn_fwd_ws(
    q_desc,
    k_desc,
    v_desc,
    Out,
    Lse,
    Stats,
    stride_ob,
    stride_oh,
    stride_os,
    Hq,
    Hk,
    GROUP,
    SQ,
    SK,
    BH,
    c,
    IvL,  # LISTED: the tile lists (B', H', query tiles, 2, key tiles) int32 and counts (..., 2) of
    IvC,  # kernels/ivlists.py at (BLOCK_M, BLOCK_N); list row of (b, h, tile) = b * ivl_b + h * ivl_h + tile
    ivl_b,
    ivl_h,
    ivl_n,
    Iv,  # LISTED: the mask's masked-row intervals (B', H', Sk, 4) int32 (0 strides on broadcast dims)
    stride_ib,
    stride_ih,
    win_right,  # LISTED: the right window bound (causal: HAS_RIGHT with right = 0; no left bound here)
    BSHD: gl.constexpr,
    CAUSAL: gl.constexpr,
    LISTED: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    HEAD_D: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    OVERLAP: gl.constexpr,
    SPLIT: gl.constexpr,
    PERSISTENT: gl.constexpr,
):
    """A 1-D grid over the work items (query tile, (batch, query head)); CTA ``p`` takes items ``p``,
    ``p + G``, ... (G = the grid's size): one each, or, PERSISTENT, as many CTAs as the GPU runs at once,
    each streaming its items through one ring (the next item's loads under this one's epilogue). LISTED: a
    mask carried as data, each item's key tiles from its lists (full ones unmasked, partial ones with the
    intervals and flags applied per score) instead of the causal or full range."""
    n_m = (SQ + BLOCK_M - 1) // BLOCK_M
    items = (gl.program_id(0), n_m * BH, gl.num_programs(0))
    sched = (n_m, Hq, Hk, GROUP, SQ, SK)
    lists = (IvL, IvC, ivl_b, ivl_h, ivl_n)
    masks = (Iv, stride_ib, stride_ih, ivl_n, win_right)
    Q_BUFS: gl.constexpr = 2 if PERSISTENT else 1  # the next item's Q lands while this one's O drains

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [Q_BUFS, BLOCK_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_D], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_BUFS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    CONSUMERS: gl.constexpr = 2 if SPLIT else 1  # arrivals that free a ring slot or a Q buffer
    for i in gl.static_range(Q_BUFS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=CONSUMERS)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)

    bufs = (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty)
    out = (Out, Lse, Stats, stride_ob, stride_oh, stride_os, BH.to(gl.int64) * SQ, SQ, SK)
    descs = (q_desc, k_desc, v_desc)
    # (the Gluon frontend builds no tuple by concatenation: each partition's arguments are spelled out)
    if SPLIT:  # two 4-warp consumers (launched with num_warps=4) + the TMA warp
        gl.warp_specialize(
            [
                (_consumer, (bufs, out, items, sched, lists, masks, c, CAUSAL, LISTED, HAS_RIGHT,
                             BSHD, BLOCK_M, BLOCK_N, HEAD_D, NUM_STAGES, Q_BUFS, OVERLAP, PERSISTENT, 0, 4)),
                (_consumer, (bufs, out, items, sched, lists, masks, c, CAUSAL, LISTED, HAS_RIGHT,
                             BSHD, BLOCK_M, BLOCK_N, HEAD_D, NUM_STAGES, Q_BUFS, OVERLAP, PERSISTENT, 1, 4)),
                (_producer, (descs, bufs, items, sched, lists, CAUSAL, LISTED, BSHD, BLOCK_M, BLOCK_N,
                             HEAD_D, NUM_STAGES, Q_BUFS, PERSISTENT)),
            ],
            [4, 1],
            [CONSUMER_REGS, PRODUCER_REGS],
        )  # fmt: skip
    else:  # one 8-warp consumer (num_warps=8) + the TMA warp
        gl.warp_specialize(
            [
                (_consumer, (bufs, out, items, sched, lists, masks, c, CAUSAL, LISTED, HAS_RIGHT,
                             BSHD, BLOCK_M, BLOCK_N, HEAD_D, NUM_STAGES, Q_BUFS, OVERLAP, PERSISTENT, 0, 8)),
                (_producer, (descs, bufs, items, sched, lists, CAUSAL, LISTED, BSHD, BLOCK_M, BLOCK_N,
                             HEAD_D, NUM_STAGES, Q_BUFS, PERSISTENT)),
            ],
            [1],
            [PRODUCER_REGS],
        )  # fmt: skip
