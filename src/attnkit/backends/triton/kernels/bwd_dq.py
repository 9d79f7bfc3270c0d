"""The dQ kernel of the backward (pure ``@triton.jit``): :func:`attn_bwd_dq`, one program = one tile of
BLOCK_M query rows of one (batch, query head), the same schedule as the forward; no atomics. The lse and
delta conventions are those of ``bwd.py`` (its docstring), whose row-statistics loader it shares. The tile
loops take the forward's argument tuples (``fwd.QTileGeo``, ``fwd.QTileCfg``, ``common.ScoreParams``,
``common.Features``) and the program's query rows ``qrow``."""

import triton
import triton.language as tl

from attnkit.backends.triton.kernels.bwd import _load_row_stats
from attnkit.backends.triton.kernels.common import (
    ScoreParams,
    dropout_keep,
    dscore_dqk,
    dscore_mod,
    iv_apply,
    iv_bounds,
    iv_classify,
    iv_load,
    pending_scale,
    scores,
    seq_bounds,
)
from attnkit.backends.triton.kernels.fwd import QTileCfg, QTileGeo, load_tile, q_tile_segments
from attnkit.backends.triton.kernels.tiles import ts_apply, ts_state


@triton.jit
def _dq_inner(
    dq, qrow, lo, hi, geo, par, smod,
    CFG: tl.constexpr, FEAT: tl.constexpr, MASK: tl.constexpr, HAS_IV: tl.constexpr, HAS_TS: tl.constexpr,
):  # fmt: skip
    """The key tiles ``[lo, hi)`` of one segment of the schedule (as the forward's ``_fwd_inner``)."""
    BLOCK_N: tl.constexpr = CFG.BLOCK_N
    c = pending_scale(par.sm_scale, FEAT.DEFER)
    for start_n in range(lo, hi, BLOCK_N):
        empty = False
        full = True
        if HAS_IV:  # masks as data: skip empty key tiles, no mask work on full ones
            last = tl.minimum(start_n + BLOCK_N, geo.seqlen_k) - 1
            empty, full = iv_classify(
                geo.sum_ptr, geo.k_start + start_n, geo.k_start + last, geo.m0, geo.m1, BLOCK_N
            )
            if not CFG.IV_SKIP:
                empty = False
        if HAS_TS:  # tile states: skip empty key tiles, no mask work on full ones
            empty, full = ts_state(geo.ts_ptr + start_n // BLOCK_N)
        dq = _dq_tile(dq, qrow, start_n, c, empty, full, geo, par, smod, CFG, FEAT, MASK, HAS_IV, HAS_TS)
    return dq


@triton.jit
def _dq_listed(
    dq, qrow, lst, n, geo, par, smod, CFG: tl.constexpr, FEAT: tl.constexpr, PARTIAL: tl.constexpr
):  # fmt: skip
    """The key tiles of list ``lst`` (``n`` tile starts, kernels/ivlists.py, at this kernel's tiles): PARTIAL
    ones masked (flags and intervals), full ones as the plain body (as the forward's ``_fwd_listed``)."""
    c = pending_scale(par.sm_scale, FEAT.DEFER)
    start_n = tl.load(lst, mask=n > 0, other=0)
    for i in range(0, n):
        nxt = tl.load(lst + i + 1, mask=i + 1 < n, other=0)
        dq = _dq_tile(dq, qrow, start_n, c, False, False, geo, par, smod, CFG, FEAT, PARTIAL, PARTIAL, False)
        start_n = nxt
    return dq


@triton.jit
def _dq_tile(
    dq, qrow, start_n, c, empty, full, geo, par, smod,
    CFG: tl.constexpr, FEAT: tl.constexpr, MASK: tl.constexpr, HAS_IV: tl.constexpr, HAS_TS: tl.constexpr,
):  # fmt: skip
    """One key tile of the dQ loop (``empty`` / ``full``: the interval classification or the tile state);
    ``qrow = (q, do, lse_hi, lse_lo, delta)``: the program's query rows, loaded once."""
    if not empty:
        q, do, lse_hi, lse_lo, delta = qrow
        offs_m, offs_d, offs_dv = geo.offs_m, geo.offs_d, geo.offs_dv
        offs_n = start_n + tl.arange(0, CFG.BLOCK_N)
        kt = load_tile(
            geo.k_base + offs_n[None, :] * geo.stride_ks + offs_d[:, None],
            offs_n[None, :],
            geo.seqlen_k,
            offs_d[:, None],
            CFG.D,
            MASK,
            CFG.BLOCK_D != CFG.D,
        )  # (BD, BN)
        vt = load_tile(
            geo.v_base + offs_n[None, :] * geo.stride_vs + offs_dv[:, None],
            offs_n[None, :],
            geo.seqlen_k,
            offs_dv[:, None],
            CFG.DV,
            MASK,
            CFG.BLOCK_DV != CFG.DV,
        )  # (BDV, BN)
        qk = tl.dot(q, kt, input_precision=FEAT.PRECISION)
        s, t, g, _ = scores(
            qk, offs_m[:, None], offs_n[None, :], geo.seqlen_q, geo.seqlen_k, geo.off, par, smod, MASK, FEAT
        )
        if HAS_IV:
            ia, ib, ic, id_ = iv_load(geo.iv_ptr, offs_n[None, :], geo.seqlen_k)
            if not full:
                s = iv_apply(s, offs_m[:, None], ia, ib, ic, id_)
        if HAS_TS:  # noqa: SIM102
            if not full:
                s = ts_apply(s, offs_m[:, None], offs_n[None, :], geo.off, smod, CFG.MASK_KEEP)
        lg = s * c - lse_hi[:, None]
        if q.dtype == tl.float32:
            lg -= lse_lo[:, None]
        p = tl.exp2(lg)
        dp = tl.dot(do, vt, input_precision=FEAT.PRECISION)  # (BM, BN)
        if FEAT.DROPOUT:
            keep = dropout_keep(par.rng_ptr, par.bh, offs_m[:, None], offs_n[None, :], par.dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - par.dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        ds = dscore_mod(ds, p, g, FEAT.HAS_SCORE_MOD)
        dqk = dscore_dqk(ds, t, par.sm_scale, FEAT.SOFTCAP)
        dq += tl.dot(dqk.to(kt.dtype), tl.trans(kt), input_precision=FEAT.PRECISION)
    return dq


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
        "ivl_b",
        "ivl_h",
        "ivl_n",
    ]
)
def attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    LseHi,
    LseLo,
    Delta,
    Bias,
    Slopes,
    CuQ,
    CuK,
    Rng,
    stride_q,  # (batch, head, row) strides of q, k, v, do, dq (see _fwd.attn_fwd)
    stride_k,
    stride_v,
    stride_do,
    stride_dq,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_db,
    stride_dh,
    stride_ds,
    stride_bias,  # (b, h, m, n) of the bias broadcast to (B, Hq, Sq, Sk)
    stride_a,  # (b, h) of the ALiBi slopes
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
    stride_sh,  # mask intervals and their summary (see _fwd.attn_fwd)
    SmC0,
    SmC1,
    SmC2,
    SmC3,
    SmMeta,  # score_mod: captured tensors and their int64 (4, 8) strides/sizes (attnkit.compiler)
    Ts,
    stride_tb,
    stride_th,
    ts_cols,  # tile states int8 (B', H', query tiles, ts_cols) at this kernel's tiles (HAS_TS; see _fwd)
    IvL,
    IvC,
    ivl_b,
    ivl_h,
    ivl_n,  # IV_LIST: tile lists at this kernel's tiles (see _fwd.attn_fwd)
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
    if SCHED.REVERSE:
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
    q = load_tile(
        Q + b * stride_q[0] + h * stride_q[1] + (q_start + offs_m[:, None]) * stride_q[2] + offs_d[None, :],
        offs_m[:, None],
        seqlen_q,
        offs_d[None, :],
        D,
        True,
        BLOCK_D != D,
    )
    do = load_tile(
        DO
        + b * stride_do[0]
        + h * stride_do[1]
        + (q_start + offs_m[:, None]) * stride_do[2]
        + offs_dv[None, :],
        offs_m[:, None],
        seqlen_q,
        offs_dv[None, :],
        DV,
        True,
        BLOCK_DV != DV,
    )
    row0 = b * stride_lb + h * stride_lh + q_start * stride_ls
    lse_hi, lse_lo, delta = _load_row_stats(
        LseHi + row0,
        LseLo + row0,
        Delta + b * stride_db + h * stride_dh + q_start * stride_ds,
        stride_ls,
        stride_ds,
        offs_m,
        seqlen_q,
        q.dtype == tl.float32,
    )
    k_base = K + b * stride_k[0] + hk * stride_k[1] + k_start * stride_k[2]
    v_base = V + b * stride_v[0] + hk * stride_v[1] + k_start * stride_v[2]
    bias_ptr = Bias + b * stride_bias[0] + h * stride_bias[1]
    slope = 0.0
    if FEAT.HAS_ALIBI:
        slope = tl.load(Slopes + b * stride_a[0] + h * stride_a[1]).to(tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    smod = (SmC0, SmC1, SmC2, SmC3, SmMeta, b, h)
    m1 = tl.minimum(m0 + BLOCK_M, seqlen_q) - 1
    iv_ptr = Iv + b * stride_ib + h * stride_ih + k_start * 4
    sum_ptr = IvSum + b * stride_sb + h * stride_sh
    ts_ptr = Ts + b * stride_tb + h * stride_th + pid_m * ts_cols  # (this query tile's row of states)
    qrow = (q, do, lse_hi, lse_lo, delta)
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
            dq = _dq_listed(dq, qrow, lst, n, geo, par, smod, CFG, FEAT, part == 0)
    else:
        lo, full_lo, b0, b1, full_hi, hi = q_tile_segments(
            m0, m1, seqlen_k, off, win_left, win_right, sum_ptr, k_start, ts_ptr, FEAT, SCHED, BLOCK_N
        )
        BODY: tl.constexpr = SCHED.HAS_IV and SCHED.IV_BODY
        # the tile schedule's segments: masked head, unmasked body, masked tail (as the forward's)
        for seg in tl.static_range(5):
            seg_lo, seg_hi = iv_bounds(seg, lo, full_lo, b0, b1, full_hi, hi)
            if BODY or (seg != 2 and seg != 3):
                dq = _dq_inner(dq, qrow, seg_lo, seg_hi, geo, par, smod, CFG, FEAT, seg == 0 or seg == 4,
                               SCHED.HAS_IV and seg != 2, SCHED.HAS_TS)  # fmt: skip
    dq_ptrs = (
        DQ
        + b * stride_dq[0]
        + h * stride_dq[1]
        + (q_start + offs_m[:, None]) * stride_dq[2]
        + offs_d[None, :]
    )
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < D))
