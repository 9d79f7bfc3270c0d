"""Backward kernels (pure ``@triton.jit``):

* :func:`bwd_preprocess`: ``delta = rowsum(dO * O) - dLSE`` per query row, in the layout of lse.
* :func:`attn_bwd_dkdv`: one program = one tile of BLOCK_N key rows of one (batch, KV head); it loops over
  the GROUP query heads that read this KV head and over the query tiles that see the key tile, and writes
  dK, dV (and dBias, once per element) without atomics. (A fused backward, dQ by atomic adds in this
  kernel, measured slower than the separate pass since version 4, is gone; git keeps it.) Its tile loops
  take their arguments as named tuples built in the kernel body: :class:`KTileGeo` (per query head),
  ``common.ScoreParams`` and the constexprs ``common.Features`` and :class:`KTileCfg`.
* ``bwd_dq.attn_bwd_dq`` (the file beside this one): the separate dQ pass (the default, deterministic or
  not; no atomics): one program = one tile of BLOCK_M query rows of one (batch, query head), the same
  schedule as the forward. The host runs it on a side stream next to dK/dV.

All recompute ``p = exp2(s - lse2)`` in log2 units, where the forward saved lse2 = m + log2 l (row max plus
log2 of the row sum) as an unevaluated sum hi + lo (:func:`.fwd.two_sum`). float32
inputs subtract both parts (``s - hi - lo``: exact to fp32 rounding, unlike exp(s - lse) with a rounded lse);
16-bit inputs subtract hi alone (relative error in p about 2^-24 * |lse2|, far below their own rounding),
which saves a load per row and the registers of a third row vector in the dK/dV loop (measured offline for
sm_90: 188 bytes of spills at (64, 128, 8 warps, 3 stages) became 4). Rows with no visible key saved
hi = +inf, lo = 0, so p = 0 there and every gradient stays finite.
"""

from collections import namedtuple

import triton
import triton.language as tl

from attnkit.backends.triton.kernels.common import (
    ScoreParams,
    dropout_keep,
    dscore_dqk,
    dscore_mod,
    iv_apply,
    iv_bounds,
    iv_classify,
    iv_full_run,
    iv_load,
    iv_narrow_q,
    iv_segments,
    pending_scale,
    q_tiles,
    scores,
    seq_bounds,
)
from attnkit.backends.triton.kernels.fwd import load_tile
from attnkit.backends.triton.kernels.tiles import ts_apply, ts_narrow, ts_state

# what the dK/dV tile loops read, per (key tile, query head): the bases of Q, dO, the row statistics (lse hi /
# lo, delta) and dBias of this head at the sequence's first query and their row strides (dBias: both), the key
# tile's row and head-dim index ranges, the sequence lengths and ``off = Sk - Sq``, the interval summary, the
# sequence's first packed key, the key tile's first and last row, and its column of tile states (``ts_cols``
# apart)
KTileGeo = namedtuple(
    "KTileGeo",
    "q_base do_base hi_base lo_base d_base db_ptr stride_qs stride_dos stride_ls stride_ds stride_dbm "
    "stride_dbn offs_n offs_d offs_dv seqlen_q seqlen_k off sum_ptr k_start n0 n1 ts_ptr ts_cols",
)
# their constexprs besides the score features: head dims (true and padded), the inner query tile and the
# program's key tile, the interval branch, the tile states' mask condition, and the gradients of the bias and
# of the score mod's captured tensors (SCORE_MOD_BWD: the compiled backward of the mod)
KTileCfg = namedtuple(
    "KTileCfg", "D DV BLOCK_D BLOCK_DV BLOCK_M BLOCK_N IV_SKIP MASK_KEEP BIAS_GRAD SMOD_GRAD SCORE_MOD_BWD"
)


@triton.jit(do_not_specialize=["SQ", "stride_lb", "stride_lh", "stride_db", "stride_dh"])
def bwd_preprocess(
    Out,
    DO,
    DLse,
    Delta,
    CuQ,
    stride_ob,
    stride_oh,
    stride_os,
    stride_dob,
    stride_doh,
    stride_dos,
    stride_lb,
    stride_lh,
    stride_ls,  # dlse, the layout of lse
    stride_db,
    stride_dh,
    stride_ds,  # delta, the layout of lse
    Hq,
    SQ,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * Out[b, h, i, d] - dLSE[b, h, i] in fp32 (one read of each)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    q_start, seqlen_q, _, _ = seq_bounds(CuQ, CuQ, b, SQ, SQ, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = q_start + offs_m[:, None]
    mask = (offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < DV)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + rows * stride_os + offs_dv[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + rows * stride_dos + offs_dv[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(
            DLse + b * stride_lb + h * stride_lh + (q_start + offs_m) * stride_ls, mask=offs_m < seqlen_q
        )
    tl.store(
        Delta + b * stride_db + h * stride_dh + (q_start + offs_m) * stride_ds, delta, mask=offs_m < seqlen_q
    )


@triton.jit
def _load_row_stats(hi_base, lo_base, d_base, stride_ls, stride_ds, offs, seqlen_q, EXACT: tl.constexpr):
    """lse2 = hi + lo (+inf on rows without keys and outside the sequence; lo only when EXACT, else hi is
    returned in its place and unused) and delta."""
    hi = tl.load(hi_base + offs * stride_ls, mask=offs < seqlen_q, other=float("inf"))
    if EXACT:
        lo = tl.load(lo_base + offs * stride_ls, mask=offs < seqlen_q, other=0.0)
    else:
        lo = hi
    delta = tl.load(d_base + offs * stride_ds, mask=offs < seqlen_q, other=0.0)
    return hi, lo, delta


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, lo, hi, iv, geo, par, smod,
    CFG: tl.constexpr, FEAT: tl.constexpr, MASK: tl.constexpr, HAS_IV: tl.constexpr, HAS_TS: tl.constexpr,
):  # fmt: skip
    """The query tiles ``[lo, hi)`` of one segment of the schedule; ``iv``: this key tile's column intervals
    ``(ia, ib, ic, id_)`` (HAS_IV; else zeros)."""
    BLOCK_M: tl.constexpr = CFG.BLOCK_M
    c = pending_scale(par.sm_scale, FEAT.DEFER)
    # Transposed tiles: rows of these tiles are keys (offs_n), columns are queries (offs_m); in order.
    for start_m in range(lo, hi, BLOCK_M):
        empty = False
        full = True
        if HAS_IV:  # masks as data: the key tile's summary against these query rows
            r1 = tl.minimum(start_m + BLOCK_M, geo.seqlen_q) - 1
            p0 = geo.k_start + geo.n0  # (this key tile's packed columns)
            p1 = geo.k_start + geo.n1
            empty, full = iv_classify(geo.sum_ptr, p0, p1, start_m, r1, CFG.BLOCK_N)
            if not CFG.IV_SKIP:  # (no branch around the tile: the range was narrowed instead)
                empty = False
        if HAS_TS:  # tile states: this key tile's column of them (the forward's layout, transposed)
            empty, full = ts_state(geo.ts_ptr + (start_m // BLOCK_M) * geo.ts_cols)
        dk, dv = _dkdv_tile(
            dk, dv, k, v, start_m, c, empty, full, iv, geo, par, smod, CFG, FEAT, MASK, HAS_IV, HAS_TS
        )
    return dk, dv


@triton.jit
def _dkdv_listed(
    dk, dv, k, v, lst, n, iv, geo, par, smod, CFG: tl.constexpr, FEAT: tl.constexpr, PARTIAL: tl.constexpr
):  # fmt: skip
    """The query tiles of list ``lst`` (``n`` tile starts, the transposed lists of kernels/ivlists.py):
    PARTIAL ones masked (flags and this key tile's intervals ``iv``), full ones as the plain body."""
    c = pending_scale(par.sm_scale, FEAT.DEFER)
    start_m = tl.load(lst, mask=n > 0, other=0)
    for i in range(0, n):
        nxt = tl.load(lst + i + 1, mask=i + 1 < n, other=0)
        dk, dv = _dkdv_tile(
            dk, dv, k, v, start_m, c, False, False, iv, geo, par, smod, CFG, FEAT, PARTIAL, PARTIAL, False
        )
        start_m = nxt
    return dk, dv


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, start_m, c, empty, full, iv, geo, par, smod,
    CFG: tl.constexpr, FEAT: tl.constexpr, MASK: tl.constexpr, HAS_IV: tl.constexpr, HAS_TS: tl.constexpr,
):  # fmt: skip
    """One query tile of the dK/dV loop, transposed (``empty`` / ``full``: the interval classification or
    the tile state)."""
    if not empty:
        offs_n, offs_d, offs_dv = geo.offs_n, geo.offs_d, geo.offs_dv
        seqlen_q, seqlen_k, off = geo.seqlen_q, geo.seqlen_k, geo.off
        offs_m = start_m + tl.arange(0, CFG.BLOCK_M)
        q = load_tile(
            geo.q_base + offs_m[:, None] * geo.stride_qs + offs_d[None, :],
            offs_m[:, None],
            seqlen_q,
            offs_d[None, :],
            CFG.D,
            MASK,
            CFG.BLOCK_D != CFG.D,
        )  # (BM, BD)
        do = load_tile(
            geo.do_base + offs_m[:, None] * geo.stride_dos + offs_dv[None, :],
            offs_m[:, None],
            seqlen_q,
            offs_dv[None, :],
            CFG.DV,
            MASK,
            CFG.BLOCK_DV != CFG.DV,
        )  # (BM, BDV)
        exact: tl.constexpr = k.dtype == tl.float32
        lse_hi, lse_lo, delta = _load_row_stats(
            geo.hi_base, geo.lo_base, geo.d_base, geo.stride_ls, geo.stride_ds, offs_m, seqlen_q, exact
        )
        qkt = tl.dot(k, tl.trans(q), input_precision=FEAT.PRECISION)  # (BN, BM)
        st, tt, gt, xt = scores(
            qkt, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, off, par, smod, MASK, FEAT
        )
        if HAS_IV:  # noqa: SIM102 (constexpr, then a runtime branch)
            if not full:
                ia, ib, ic, id_ = iv
                st = iv_apply(st, offs_m[None, :], ia, ib, ic, id_)
        if HAS_TS:  # noqa: SIM102
            if not full:
                st = ts_apply(st, offs_m[None, :], offs_n[:, None], off, smod, CFG.MASK_KEEP)
        lg = st * c - lse_hi[None, :]
        if exact:
            lg -= lse_lo[None, :]
        pt = tl.exp2(lg)  # (BN, BM) softmax probabilities, transposed
        dpt = tl.dot(v, tl.trans(do), input_precision=FEAT.PRECISION)  # (BN, BM) = (dO V^T)^T
        if FEAT.DROPOUT:
            keep = dropout_keep(par.rng_ptr, par.bh, offs_m[None, :], offs_n[:, None], par.dropout_p)
            scale_keep = 1.0 / (1.0 - par.dropout_p)
            pdt = tl.where(keep, pt * scale_keep, 0.0)
            dpt = tl.where(keep, dpt * scale_keep, 0.0)
        else:
            pdt = pt
        dv += tl.dot(pdt.to(do.dtype), do, input_precision=FEAT.PRECISION)
        dst = pt * (dpt - delta[None, :])  # dL/ds (natural units), transposed
        if CFG.SMOD_GRAD:  # the captured tensors' gradients (atomic adds; this kernel visits each pair once)
            inside = (offs_m[None, :] < seqlen_q) & (offs_n[:, None] < seqlen_k)  # (unmasked tiles pad)
            dsx = tl.where(inside, dst, 0.0)
            CFG.SCORE_MOD_BWD(xt, smod[5], smod[6], offs_m[None, :], offs_n[:, None], off, smod, dsx)
        dst = dscore_mod(dst, pt, gt, FEAT.HAS_SCORE_MOD)  # (before the score mod: bias, softcap see this)
        if CFG.BIAS_GRAD:
            tl.store(
                geo.db_ptr + offs_m[None, :] * geo.stride_dbm + offs_n[:, None] * geo.stride_dbn,
                dst,
                mask=(offs_m[None, :] < seqlen_q) & (offs_n[:, None] < seqlen_k),
            )
        dqkt = dscore_dqk(dst, tt, par.sm_scale, FEAT.SOFTCAP).to(q.dtype)  # (BN, BM) dL/d(qk), transposed
        dk += tl.dot(dqkt, q, input_precision=FEAT.PRECISION)
    return dk, dv


@triton.jit(
    do_not_specialize=[
        "SQ",
        "SK",
        "stride_lb",
        "stride_lh",
        "stride_db",
        "stride_dh",
        "win_left",
        "win_right",
        "stride_ib",
        "stride_ih",
        "stride_sb",
        "stride_sh",
        "stride_tb",
        "stride_th",
        "ts_cols",
        "smg_stride",
        "smg_copies",
        "ivl_b",
        "ivl_h",
        "ivl_n",
    ]
)
def attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV_,
    LseHi,
    LseLo,
    Delta,
    Bias,
    DBias,
    Slopes,
    CuQ,
    CuK,
    Rng,
    stride_q,  # (batch, head, row) strides of q, k, v, do, dk, dv (see _fwd.attn_fwd)
    stride_k,
    stride_v,
    stride_do,
    stride_dk,
    stride_dv,
    stride_lb,
    stride_lh,
    stride_ls,  # LseHi / LseLo (the layout of lse)
    stride_db,
    stride_dh,
    stride_ds,
    stride_bias,  # (b, h, m, n) of the bias broadcast to (B, Hq, Sq, Sk)
    stride_dbias,  # (b, h, m, n) of dbias (B, Hq, Sq, Sk), dense
    stride_a,  # (b, h) of the ALiBi slopes
    Hq,
    Hk,
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
    stride_sh,  # mask intervals and their summary (see _fwd.attn_fwd)
    SmC0,
    SmC1,
    SmC2,
    SmC3,
    SmMeta,  # score_mod: captured tensors and their int64 (4, 8) strides/sizes (attnkit.compiler)
    SmG0,
    SmG1,
    SmG2,
    SmG3,  # float32 gradients of the captured tensors that want one (SMOD_GRAD; contiguous; in copy 0)
    smg_stride,
    smg_copies,  # copies of those gradients (ops/bwd.smod_grads): this program adds into its own
    Ts,
    stride_tb,
    stride_th,
    ts_cols,  # tile states int8 (B', H', query tiles, ts_cols) at this kernel's tiles (HAS_TS; see _fwd)
    IvL,
    IvC,
    ivl_b,
    ivl_h,
    ivl_n,  # IV_LIST: the transposed tile lists (rows of 2 x ivl_n query tile starts per key tile) and
    # counts; row b * ivl_b + h * ivl_h + key tile (0 = broadcast dim)
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FEAT: tl.constexpr,  # common.Features: the score pipeline's flags
    SCHED: tl.constexpr,  # common.Schedule: the tile loop's flags
    BIAS_GRAD: tl.constexpr,
    SMOD_GRAD: tl.constexpr = False,
    SCORE_MOD_BWD: tl.constexpr = None,
    ONE_LOOP: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hk
    hk = bhk % Hk
    q_start, seqlen_q, k_start, seqlen_k = seq_bounds(CuQ, CuK, b, SQ, SK, SCHED.VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_tile(
        K + b * stride_k[0] + hk * stride_k[1] + (k_start + offs_n[:, None]) * stride_k[2] + offs_d[None, :],
        offs_n[:, None],
        seqlen_k,
        offs_d[None, :],
        D,
        True,
        BLOCK_D != D,
    )  # (BN, BD)
    v = load_tile(
        V + b * stride_v[0] + hk * stride_v[1] + (k_start + offs_n[:, None]) * stride_v[2] + offs_dv[None, :],
        offs_n[:, None],
        seqlen_k,
        offs_dv[None, :],
        DV,
        True,
        BLOCK_DV != DV,
    )  # (BN, BDV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    n1 = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    lo, full_lo, full_hi, hi = q_tiles(
        n0, n1, seqlen_q, off, win_left, win_right, FEAT.HAS_LEFT, FEAT.HAS_RIGHT, BLOCK_M
    )
    BODY: tl.constexpr = SCHED.HAS_IV and SCHED.IV_BODY
    CFG: tl.constexpr = KTileCfg(D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, SCHED.IV_SKIP, SCHED.MASK_KEEP,
                                 BIAS_GRAD, SMOD_GRAD, SCORE_MOD_BWD)  # fmt: skip
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_q[0] + h * stride_q[1] + q_start * stride_q[2]
        do_base = DO + b * stride_do[0] + h * stride_do[1] + q_start * stride_do[2]
        hi_base = LseHi + b * stride_lb + h * stride_lh + q_start * stride_ls
        lo_base = LseLo + b * stride_lb + h * stride_lh + q_start * stride_ls
        d_base = Delta + b * stride_db + h * stride_dh + q_start * stride_ds
        bias_ptr = Bias + b * stride_bias[0] + h * stride_bias[1]
        db_ptr = DBias + b * stride_dbias[0] + h * stride_dbias[1]
        slope = 0.0
        if FEAT.HAS_ALIBI:
            slope = tl.load(Slopes + b * stride_a[0] + h * stride_a[1]).to(tl.float32)
        sum_ptr = IvSum + b * stride_sb + h * stride_sh
        g_at = ((bhk * tl.num_programs(0) + pid_n) % smg_copies).to(tl.int64) * smg_stride
        smod = (SmC0, SmC1, SmC2, SmC3, SmMeta, b, h, SmG0 + g_at, SmG1 + g_at, SmG2 + g_at, SmG3 + g_at)
        ts_ptr = Ts + b * stride_tb + h * stride_th + pid_n  # (this key tile's column of states)
        geo = KTileGeo(q_base, do_base, hi_base, lo_base, d_base, db_ptr, stride_q[2], stride_do[2],
                       stride_ls, stride_ds, stride_dbias[2], stride_dbias[3], offs_n, offs_d, offs_dv,
                       seqlen_q, seqlen_k, off, sum_ptr, k_start, n0, n1, ts_ptr, ts_cols)  # fmt: skip
        par = ScoreParams(sm_scale, softcap, win_left, win_right, bias_ptr, stride_bias[2], stride_bias[3],
                          slope, Rng, bh, dropout_p)  # fmt: skip
        if SCHED.IV_LIST:  # masks as data, listed: this key tile's partial query tiles (masked), then full
            iv_ptr = Iv + b * stride_ib + h * stride_ih + k_start * 4
            iv = iv_load(iv_ptr, offs_n[:, None], seqlen_k)
            row = b * ivl_b + h * ivl_h + pid_n
            for part in tl.static_range(2):
                n = tl.load(IvC + row * 2 + part)
                lst = IvL + (row * 2 + part) * ivl_n
                dk, dv = _dkdv_listed(dk, dv, k, v, lst, n, iv, geo, par, smod, CFG, FEAT, part == 0)
        else:
            iv = (0, 0, 0, 0)
            g_lo, g_full_lo, g_full_hi, g_hi = lo, full_lo, full_hi, hi
            if SCHED.HAS_IV:  # this key tile's column intervals, (BN, 1) each, and the query tiles seeing any
                iv_ptr = Iv + b * stride_ib + h * stride_ih + k_start * 4
                iv = iv_load(iv_ptr, offs_n[:, None], seqlen_k)
                lo2, hi2 = iv_narrow_q(
                    sum_ptr, k_start + n0, k_start + n1, lo, hi, seqlen_q, BLOCK_M, BLOCK_N
                )
                g_lo, g_full_lo, g_full_hi, g_hi = iv_segments(lo, full_lo, full_hi, hi, lo2, hi2)
            if SCHED.HAS_TS:  # the query tiles from the first to the last with a nonempty state (this column)
                lo2, hi2 = ts_narrow(ts_ptr, ts_cols, lo, hi, BLOCK_M)
                g_lo, g_full_lo, g_full_hi, g_hi = iv_segments(lo, full_lo, full_hi, hi, lo2, hi2)
            b0 = g_hi if ONE_LOOP else g_full_hi
            b1 = b0
            if BODY:  # the last run of query tiles full for this key tile's columns: no interval work there
                b0, b1 = iv_full_run(
                    sum_ptr, lo, g_full_lo, g_full_hi, k_start + n0, k_start + n1, 0, 0, seqlen_q, False,
                    BLOCK_M, BLOCK_N,
                )  # fmt: skip
                if ONE_LOOP:  # (no run: the one loop, as without a body)
                    none = b1 <= b0
                    b0 = tl.where(none, g_hi, b0)
                    b1 = tl.where(none, g_hi, b1)
            # the tile schedule's segments (iv_bounds): masked head, unmasked body, masked tail; ONE_LOOP:
            # every visited tile but the interval body in one masked loop, so the software pipeline runs
            # through the diagonal without draining and refilling (_tuning.one_loop_dkdv)
            for seg in tl.static_range(5):
                if ONE_LOOP:  # (segments 0 and 4 empty)
                    seg_lo, seg_hi = iv_bounds(seg, g_lo, g_lo, b0, b1, g_hi, g_hi)
                else:
                    seg_lo, seg_hi = iv_bounds(seg, g_lo, g_full_lo, b0, b1, g_full_hi, g_hi)
                # (which segments exist, a constexpr: no empty loops compiled)
                if (seg == 1 or (BODY and seg % 4 != 0)) if ONE_LOOP else (BODY or seg < 2 or seg == 4):
                    dk, dv = _dkdv_inner(
                        dk, dv, k, v, seg_lo, seg_hi, iv, geo, par, smod, CFG, FEAT,
                        (seg != 2) if ONE_LOOP else (seg == 0 or seg == 4), SCHED.HAS_IV and seg != 2,
                        SCHED.HAS_TS,
                    )  # fmt: skip
    row_mask = offs_n[:, None] < seqlen_k
    dk_ptrs = (
        DK
        + b * stride_dk[0]
        + hk * stride_dk[1]
        + (k_start + offs_n[:, None]) * stride_dk[2]
        + offs_d[None, :]
    )
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_mask & (offs_d[None, :] < D))
    dv_ptrs = (
        DV_
        + b * stride_dv[0]
        + hk * stride_dv[1]
        + (k_start + offs_n[:, None]) * stride_dv[2]
        + offs_dv[None, :]
    )
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=row_mask & (offs_dv[None, :] < DV))
