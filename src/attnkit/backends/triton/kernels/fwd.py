"""Forward kernel (pure ``@triton.jit``): FlashAttention-2 style online softmax in exp2, fp32 accumulation.

One program = one tile of BLOCK_M query rows of one (batch element or sequence, query head). Features are
constexpr flags of this one kernel; the score pipeline and tile schedule live in ``common.py``. The kernel
body builds the tile loops' arguments once, as named tuples (:class:`QTileGeo`, ``common.ScoreParams``, and
the constexprs ``common.Features`` and :class:`QTileCfg`); the helpers take them whole and read what they use.
"""

from collections import namedtuple

import triton
import triton.language as tl

from attnkit.backends.triton.kernels.common import (
    LN2,
    ScoreParams,
    dropout_keep,
    iv_apply,
    iv_bounds,
    iv_classify,
    iv_full_run,
    iv_load,
    iv_narrow_kv,
    iv_segments,
    kv_tiles,
    pending_scale,
    scores,
    seq_bounds,
)
from attnkit.backends.triton.kernels.tiles import ts_apply, ts_narrow, ts_state

# what the tile loops of a program over one query tile (forward, dQ) read: the K / V bases of its (batch, KV
# head) at the sequence's first key and their row strides, the tile's row and head-dim index ranges, the
# sequence lengths and ``off = Sk - Sq``, the mask data (intervals at the first key, their summary, this query
# tile's row of tile states), the sequence's first packed key and the tile's first and last row
QTileGeo = namedtuple(
    "QTileGeo",
    "k_base v_base stride_ks stride_vs offs_m offs_d offs_dv seqlen_q seqlen_k off "
    "iv_ptr sum_ptr ts_ptr k_start m0 m1",
)
# their constexprs besides the score features: head dims (true and padded), the key tile, the interval branch
# (IV_SKIP) and the compiled mask condition of the tile states (MASK_KEEP)
QTileCfg = namedtuple("QTileCfg", "D DV BLOCK_D BLOCK_DV BLOCK_N IV_SKIP MASK_KEEP")


@triton.jit
def two_sum(a, b):
    """(hi, lo) with hi = fl(a + b) and hi + lo == a + b exactly (Knuth's TwoSum; no ordering needed)."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    return hi, lo


@triton.jit
def load_tile(ptrs, idx, bound, cidx, CBOUND: tl.constexpr, CHECK_ROWS: tl.constexpr, PAD: tl.constexpr):
    """Load a (rows, cols) tile; rows checked against ``bound`` and columns against CBOUND only if asked."""
    if CHECK_ROWS:
        if PAD:
            return tl.load(ptrs, mask=(idx < bound) & (cidx < CBOUND), other=0.0)
        else:
            return tl.load(ptrs, mask=idx < bound, other=0.0)
    else:
        if PAD:
            return tl.load(ptrs, mask=cidx < CBOUND, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, lo, hi, geo, par, smod,
    CFG: tl.constexpr, FEAT: tl.constexpr, MASK: tl.constexpr, HAS_IV: tl.constexpr, HAS_TS: tl.constexpr,
):  # fmt: skip
    """The key tiles ``[lo, hi)`` of one segment of the schedule (MASK: the flags' mask; HAS_IV / HAS_TS: the
    intervals / tile states classify each tile)."""
    BLOCK_N: tl.constexpr = CFG.BLOCK_N
    c = pending_scale(par.sm_scale, FEAT.DEFER)  # scores * c = scores in log2 units
    for start_n in range(lo, hi, BLOCK_N):
        if HAS_IV:  # masks as data: full tiles skip the mask; IV_SKIP: empty tiles skip everything (a branch)
            last = tl.minimum(start_n + BLOCK_N, geo.seqlen_k) - 1
            empty, full = iv_classify(
                geo.sum_ptr, geo.k_start + start_n, geo.k_start + last, geo.m0, geo.m1, BLOCK_N
            )
            if not CFG.IV_SKIP:
                empty = False
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, start_n, c, empty, full, geo, par, smod, CFG, FEAT, MASK, True, False
            )
        elif HAS_TS:  # tile states (a mask evaluated per tile): empty tiles skipped, full ones unmasked
            empty, full = ts_state(geo.ts_ptr + start_n // BLOCK_N)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, start_n, c, empty, full, geo, par, smod, CFG, FEAT, MASK, False, True
            )
        else:
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, start_n, c, False, True, geo, par, smod, CFG, FEAT, MASK, False, False
            )
    return acc, l_i, m_i


@triton.jit
def _fwd_listed(
    acc, l_i, m_i, q, lst, n, geo, par, smod, CFG: tl.constexpr, FEAT: tl.constexpr, PARTIAL: tl.constexpr,
):  # fmt: skip
    """The key tiles of list ``lst`` (``n`` tile starts, kernels/ivlists.py): PARTIAL ones masked (flags and
    intervals), full ones as the plain body. The next start is loaded a tile ahead."""
    c = pending_scale(par.sm_scale, FEAT.DEFER)
    start_n = tl.load(lst, mask=n > 0, other=0)
    for i in range(0, n):
        nxt = tl.load(lst + i + 1, mask=i + 1 < n, other=0)
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, start_n, c, False, False, geo, par, smod, CFG, FEAT, PARTIAL, PARTIAL, False
        )
        start_n = nxt
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, start_n, c, empty, full, geo, par, smod,
    CFG: tl.constexpr, FEAT: tl.constexpr, MASK: tl.constexpr, HAS_IV: tl.constexpr, HAS_TS: tl.constexpr,
):  # fmt: skip
    """One key tile of the forward loop (``empty`` / ``full``: the interval classification (HAS_IV) or the
    tile's state (HAS_TS)); ``c``: :func:`pending_scale`."""
    if not empty:
        offs_m, offs_d, offs_dv = geo.offs_m, geo.offs_d, geo.offs_dv
        offs_n = start_n + tl.arange(0, CFG.BLOCK_N)
        # K^T tile (BLOCK_D, BLOCK_N), V tile (BLOCK_N, BLOCK_DV)
        kt = load_tile(
            geo.k_base + offs_n[None, :] * geo.stride_ks + offs_d[:, None],
            offs_n[None, :],
            geo.seqlen_k,
            offs_d[:, None],
            CFG.D,
            MASK,
            CFG.BLOCK_D != CFG.D,
        )
        qk = tl.dot(q, kt, input_precision=FEAT.PRECISION)  # (BLOCK_M, BLOCK_N)
        s, _, _, _ = scores(
            qk, offs_m[:, None], offs_n[None, :], geo.seqlen_q, geo.seqlen_k, geo.off, par, smod, MASK, FEAT
        )
        if HAS_IV:
            ia, ib, ic, id_ = iv_load(geo.iv_ptr, offs_n[None, :], geo.seqlen_k)  # (loads outside the branch)
            if not full:  # a partial tile: the masked rows of each column
                s = iv_apply(s, offs_m[:, None], ia, ib, ic, id_)
        if HAS_TS:  # noqa: SIM102 (constexpr, then a runtime branch)
            if not full:  # a partial tile: the mask condition per element
                s = ts_apply(s, offs_m[:, None], offs_n[None, :], geo.off, smod, CFG.MASK_KEEP)
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)  # log2 units (c > 0)
        # rows that have seen no visible key yet keep m = -inf; subtract 0 there so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * c - m_use[:, None])  # one FMA per score
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FEAT.DROPOUT:
            keep = dropout_keep(par.rng_ptr, par.bh, offs_m[:, None], offs_n[None, :], par.dropout_p)
            p = tl.where(keep, p, 0.0)
        v = load_tile(
            geo.v_base + offs_n[:, None] * geo.stride_vs + offs_dv[None, :],
            offs_n[:, None],
            geo.seqlen_k,
            offs_dv[None, :],
            CFG.DV,
            MASK,
            CFG.BLOCK_DV != CFG.DV,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=FEAT.PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def q_tile_segments(m0, m1, seqlen_k, off, win_left, win_right, sum_ptr, k_start, ts_ptr, FEAT: tl.constexpr,
                    SCHED: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The key tiles query rows ``m0..m1`` visit, as :func:`common.iv_bounds`' cut points (lo, full_lo, b0,
    b1, full_hi, hi): the window's tiles (``[full_lo, full_hi)`` fully visible), narrowed to the first and
    last tile a mask carried as data (HAS_IV) or the tile states (HAS_TS) leave non-empty, and with IV_BODY
    the last run of tiles full for every row as ``[b0, b1)`` (the plain body; else b0 = b1 = full_hi). The
    forward's and the dQ pass's schedule."""
    lo, full_lo, full_hi, hi = kv_tiles(
        m0, m1, seqlen_k, off, win_left, win_right, FEAT.HAS_LEFT, FEAT.HAS_RIGHT, BLOCK_N
    )
    if SCHED.HAS_IV:  # from the first to the last key tile the mask leaves non-empty for these rows
        lo2, hi2 = iv_narrow_kv(sum_ptr, k_start, lo, hi, seqlen_k, m0, m1, BLOCK_N)
        lo, full_lo, full_hi, hi = iv_segments(lo, full_lo, full_hi, hi, lo2, hi2)
    if SCHED.HAS_TS:  # from the first to the last key tile whose state is not empty
        lo2, hi2 = ts_narrow(ts_ptr, 1, lo, hi, BLOCK_N)
        lo, full_lo, full_hi, hi = iv_segments(lo, full_lo, full_hi, hi, lo2, hi2)
    b0 = full_hi
    b1 = full_hi
    if SCHED.HAS_IV and SCHED.IV_BODY:  # the last run of key tiles full for every row: no interval work
        b0, b1 = iv_full_run(sum_ptr, lo, full_lo, full_hi, k_start, 0, m0, m1, 0, True, BLOCK_N, BLOCK_N)
    return lo, full_lo, b0, b1, full_hi, hi


@triton.jit(
    do_not_specialize=[
        "SQ",
        "SK",
        "stride_lb",
        "stride_lh",
        "win_left",
        "win_right",
        "stride_ib",
        "stride_ih",
        "stride_sb",
        "stride_sh",
        "stride_tb",
        "stride_th",
        "ts_cols",
        "ivl_b",
        "ivl_h",
        "ivl_n",
    ]
)
def attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    LseHi,
    LseLo,
    Bias,
    Slopes,
    CuQ,
    CuK,
    Rng,
    stride_q,  # (batch, head, row) strides of q (B, Hq, S, D) in any layout; batch 0 for thd
    stride_k,
    stride_v,
    stride_o,  # the same of k, v and out
    stride_lb,
    stride_lh,
    stride_ls,  # lse (B, Hq, Sq) or (Hq, Tq); LseHi, LseLo alike
    stride_bias,  # (b, h, m, n) of the bias broadcast to (B, Hq, Sq, Sk); 0 = broadcast dim
    stride_a,  # (b, h) of the ALiBi slopes (B, Hq) or (Hq,)
    Hq,
    SQ,
    SK,
    sm_scale,
    softcap,
    win_left,
    win_right,
    dropout_p,
    Iv,
    IvSum,
    stride_ib,
    stride_ih,
    stride_sb,
    stride_sh,  # mask intervals (B', H', K, 4) and summary (B', H', K/16, 8), int32; 0 = broadcast dim
    SmC0,
    SmC1,
    SmC2,
    SmC3,
    SmMeta,  # score_mod: captured tensors and their int64 (4, 8) strides/sizes (attnkit.compiler)
    Ts,
    stride_tb,
    stride_th,
    ts_cols,  # tile states int8 (B', H', query tiles, ts_cols) (ops/tiles.py; HAS_TS); 0 = broadcast dim
    IvL,
    IvC,
    ivl_b,
    ivl_h,
    ivl_n,  # IV_LIST: tile lists (rows of 2 x ivl_n) and counts (rows of 2) of kernels/ivlists.py; row
    # b * ivl_b + h * ivl_h + query tile (0 = broadcast dim)
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FEAT: tl.constexpr,  # common.Features: the score pipeline's flags
    SCHED: tl.constexpr,  # common.Schedule: the tile loop's flags
):
    pid_m = tl.program_id(0)
    if SCHED.REVERSE:  # causal load balance: the longest rows (last tiles) start first
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(CuQ, CuK, b, SQ, SK, SCHED.VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    off = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q_ptrs = (
        Q + b * stride_q[0] + h * stride_q[1] + (q_start + offs_m[:, None]) * stride_q[2] + offs_d[None, :]
    )
    q = load_tile(q_ptrs, offs_m[:, None], seqlen_q, offs_d[None, :], D, True, BLOCK_D != D)  # (BM, BD)
    k_base = K + b * stride_k[0] + hk * stride_k[1] + k_start * stride_k[2]
    v_base = V + b * stride_v[0] + hk * stride_v[1] + k_start * stride_v[2]
    bias_ptr = Bias + b * stride_bias[0] + h * stride_bias[1]
    slope = 0.0
    if FEAT.HAS_ALIBI:
        slope = tl.load(Slopes + b * stride_a[0] + h * stride_a[1]).to(tl.float32)
    smod = (SmC0, SmC1, SmC2, SmC3, SmMeta, b, h)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    m1 = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    iv_ptr = Iv + b * stride_ib + h * stride_ih + k_start * 4
    sum_ptr = IvSum + b * stride_sb + h * stride_sh
    ts_ptr = Ts + b * stride_tb + h * stride_th + pid_m * ts_cols  # (this query tile's row of states)
    geo = QTileGeo(k_base, v_base, stride_k[2], stride_v[2], offs_m, offs_d, offs_dv, seqlen_q, seqlen_k, off,
                   iv_ptr, sum_ptr, ts_ptr, k_start, m0, m1)  # fmt: skip
    par = ScoreParams(sm_scale, softcap, win_left, win_right, bias_ptr, stride_bias[2], stride_bias[3], slope,
                      Rng, bh, dropout_p)  # fmt: skip
    CFG: tl.constexpr = QTileCfg(D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, SCHED.IV_SKIP, SCHED.MASK_KEEP)
    if SCHED.IV_LIST:  # masks as data, listed: the partial key tiles (masked), then the full ones (plain)
        row = b * ivl_b + h * ivl_h + pid_m
        for part in tl.static_range(2):
            n = tl.load(IvC + row * 2 + part)
            lst = IvL + (row * 2 + part) * ivl_n
            acc, l_i, m_i = _fwd_listed(acc, l_i, m_i, q, lst, n, geo, par, smod, CFG, FEAT, part == 0)
    else:
        lo, full_lo, b0, b1, full_hi, hi = q_tile_segments(
            m0, m1, seqlen_k, off, win_left, win_right, sum_ptr, k_start, ts_ptr, FEAT, SCHED, BLOCK_N
        )
        BODY: tl.constexpr = SCHED.HAS_IV and SCHED.IV_BODY
        # masked head, unmasked body, masked tail: the schedule decides, the pipeline applies (iv_bounds;
        # without a body segments 2 and 3 are empty and not compiled)
        for seg in tl.static_range(5):
            seg_lo, seg_hi = iv_bounds(seg, lo, full_lo, b0, b1, full_hi, hi)
            if BODY or (seg != 2 and seg != 3):
                acc, l_i, m_i = _fwd_inner(
                    acc,
                    l_i,
                    m_i,
                    q,
                    seg_lo,
                    seg_hi,
                    geo,
                    par,
                    smod,
                    CFG,
                    FEAT,
                    seg == 0 or seg == 4,
                    SCHED.HAS_IV and seg != 2,
                    SCHED.HAS_TS,
                )

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    inv = 1.0 / l_safe
    if FEAT.DROPOUT:
        inv = inv / (1.0 - dropout_p)
    out = tl.where(has_key[:, None], acc * inv[:, None], 0.0)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))  # natural log

    o_ptrs = (
        Out + b * stride_o[0] + h * stride_o[1] + (q_start + offs_m[:, None]) * stride_o[2] + offs_dv[None, :]
    )
    tl.store(
        o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < DV)
    )
    row = b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls
    tl.store(Lse + row, lse, mask=offs_m < seqlen_q)
    # backward recomputes p = exp2(s - lse2) (log2 units) with lse2 = m + log2(l) kept as hi + lo, exact
    # where a rounded lse would not be (float32 inputs use both parts; see _bwd's docstring)
    lse_hi, lse_lo = two_sum(m_i, tl.log2(l_safe))
    tl.store(LseHi + row, tl.where(has_key, lse_hi, float("inf")), mask=offs_m < seqlen_q)
    tl.store(LseLo + row, tl.where(has_key, lse_lo, 0.0), mask=offs_m < seqlen_q)


@triton.jit(do_not_specialize=["bh", "r0", "rows", "cols"])  # (new lengths: no new kernel)
def dropout_mask_kernel(Rng, Out, bh, r0, rows, cols, dropout_p, BLOCK: tl.constexpr):
    """Materialise the keep mask of (b, h) for rows r0..r0+rows-1, all ``cols`` keys (tests, debugging)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r * BLOCK + tl.arange(0, BLOCK)
    offs_c = pid_c * BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(Rng, bh, r0 + offs_r[:, None], offs_c[None, :], dropout_p)
    tl.store(
        Out + offs_r[:, None] * cols + offs_c[None, :],
        keep.to(tl.int8),
        mask=(offs_r[:, None] < rows) & (offs_c[None, :] < cols),
    )
