"""The two places every kernel of this family shares (pure ``@triton.jit`` code).

* :func:`tile_range` is the tile schedule: which tiles of the other dimension a tile visits, split into
  ``[lo, full_lo)`` (masked), ``[full_lo, full_hi)`` (every element visible: no mask work) and
  ``[full_hi, hi)`` (masked). Tiles outside ``[lo, hi)`` are fully masked and never visited. Block-sparse
  tile lists will replace this function.
* :func:`scores` is the score pipeline of docs/api.md (scale, softcap, bias, ALiBi, masking) on one tile, in
  log2 units (score * log2e), so the softmax is ``exp2(s - m)``. For a plain positive scale (DEFER) it
  returns the masked raw dot products and the caller folds ``scale * log2e`` into the FMA before exp2
  (:func:`pending_scale`): one FMA per score. User ``score_mod`` / ``mask_mod`` code will be compiled
  into this function.
* The arguments every kernel's tile loops share travel as named tuples: :class:`ScoreParams` (the runtime
  values of the score pipeline and of dropout, for one (batch, head), built in the kernel body) and
  :class:`Features` (its constexpr flags), which the attention kernels take from the host as one constexpr
  ``FEAT`` beside :class:`Schedule` (their tile loop's flags, ``SCHED``); the decode kernel builds its
  ``Features`` in its body. Each kernel adds its own geometry and configuration tuples (``fwd.QTileGeo`` and
  ``QTileCfg``, ``bwd.KTileGeo`` and ``KTileCfg``); the helpers read the fields they use by name.

* ``iv_*``: masks carried as data (``attnkit.masks._intervals``): per key column the masked query rows
  ``[a, b) U [c, d)``; 16-key summaries classify a tile pair as empty / full / partial, narrow each loop's
  range to its non-empty tiles, and partial tiles apply the intervals elementwise (constexpr HAS_IV). With
  IV_BODY, :func:`iv_full_run` finds the run of tiles that are full for the whole tile, and the kernels run
  it as the plain body (no mask, no interval loads or classification: the flag path's body loop).

Indices are positions inside the sequence (``i`` query row, ``j`` key row); ``off = Sk - Sq`` aligns
causal and windows to the bottom right. Row and column index arrays come in already shaped for
broadcasting, so the same code serves ``(rows, cols)`` tiles (forward, dQ) and transposed
``(cols, rows)`` tiles (dK/dV).
"""

from collections import namedtuple

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# the score pipeline's runtime values for one (batch, query head): scale, softcap, window bounds, the bias at
# bias[b, h, 0, 0] and its row / column strides, the ALiBi slope (0.0 without), and dropout's Philox state
# pointer, counter ``bh`` (b * Hq + h) and probability
ScoreParams = namedtuple(
    "ScoreParams",
    "sm_scale softcap win_left win_right bias_ptr stride_bm stride_bn slope rng_ptr bh dropout_p",
)
# the constexpr feature flags of the score pipeline (the attention kernels' ``FEAT``, built on the host by
# ops/common.kernel_constexprs; PRECISION is the dots' input_precision, SCORE_MOD the compiled mod or None)
Features = namedtuple(
    "Features",
    "SOFTCAP HAS_BIAS HAS_ALIBI HAS_LEFT HAS_RIGHT DROPOUT DEFER PRECISION HAS_SCORE_MOD SCORE_MOD",
)
# the constexpr flags of an attention kernel's tile loop (its ``SCHED``): packed sequences, the reversed
# (causal load-balanced) grid, a mask carried as intervals (HAS_IV) with its empty-tile branch (IV_SKIP) and
# full-tile body (IV_BODY), per-tile states (HAS_TS) with the mask evaluated in partial tiles (MASK_KEEP, a
# function or None), and tile lists (IV_LIST)
Schedule = namedtuple("Schedule", "VARLEN REVERSE HAS_IV IV_SKIP IV_BODY HAS_TS MASK_KEEP IV_LIST")


@triton.jit
def seq_bounds(CuQ, CuK, b, SQ, SK, VARLEN: tl.constexpr):
    """(first packed row of q, Sq, first packed row of k, Sk) of batch element / sequence ``b``."""
    if VARLEN:
        q_start = tl.load(CuQ + b)
        seqlen_q = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        seqlen_k = tl.load(CuK + b + 1) - k_start
    else:
        q_start = 0
        seqlen_q = SQ
        k_start = 0
        seqlen_k = SK
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def tile_range(
    x0, x1, n_other, lo_shift, hi_shift, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK: tl.constexpr
):
    """Schedule of the tiles (of size BLOCK, over ``[0, n_other)``) that rows ``x0..x1`` (inclusive) see.

    Element ``x`` sees ``y`` in ``[x + lo_shift, x + hi_shift]`` (a side without its flag is unbounded).
    Returns ``(lo, full_lo, full_hi, hi)``: visit ``[lo, hi)`` in steps of BLOCK, masking only outside
    ``[full_lo, full_hi)``. ``lo`` and both ``full_*`` are multiples of BLOCK.
    """
    if HAS_LO:
        any_lo = tl.maximum(x0 + lo_shift, 0)
        all_lo = tl.maximum(x1 + lo_shift, 0)
    else:
        any_lo = x0 * 0
        all_lo = x0 * 0
    if HAS_HI:
        any_hi = tl.minimum(x1 + hi_shift + 1, n_other)
        all_hi = tl.minimum(x0 + hi_shift + 1, n_other)
    else:
        any_hi = x0 * 0 + n_other
        all_hi = x0 * 0 + n_other
    lo = (any_lo // BLOCK) * BLOCK
    hi = tl.maximum(any_hi, lo)
    full_lo = tl.minimum(tl.maximum(((all_lo + BLOCK - 1) // BLOCK) * BLOCK, lo), hi)
    full_hi = tl.minimum(tl.maximum((all_hi // BLOCK) * BLOCK, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def kv_tiles(
    m0,
    m1,
    seqlen_k,
    off,
    win_left,
    win_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Key tiles that query rows ``m0..m1`` visit (forward, dQ). ``win_right`` is already capped by causal."""
    return tile_range(m0, m1, seqlen_k, off - win_left, off + win_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)


@triton.jit
def q_tiles(
    n0,
    n1,
    seqlen_q,
    off,
    win_left,
    win_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Query tiles that key rows ``n0..n1`` are seen by (dK/dV): the transpose of :func:`kv_tiles`."""
    return tile_range(n0, n1, seqlen_q, -off - win_right, -off + win_left, HAS_RIGHT, HAS_LEFT, BLOCK_M)


@triton.jit
def pending_scale(sm_scale, DEFER: tl.constexpr):
    """Factor the caller still applies to :func:`scores`' output to get log2 units (1 unless DEFER)."""
    if DEFER:
        return sm_scale * LOG2E
    else:
        return 1.0


@triton.jit
def scores(qk, rows, cols, seqlen_q, seqlen_k, off, par, smod, MASK: tl.constexpr, FEAT: tl.constexpr):
    """Steps 1-5 of the score pipeline on a tile of raw dot products ``qk``, in log2 units.

    ``rows``/``cols`` are the in-sequence indices i and j, broadcastable to ``qk``'s shape; ``par`` is the
    call's :class:`ScoreParams` (its ``bias_ptr`` points at bias[b, h, 0, 0]) and ``FEAT`` its
    :class:`Features`. Returns ``(s, t, g, x)`` with score * log2e = ``s * pending_scale(sm_scale, DEFER)``.
    DEFER (host: no softcap, bias or ALiBi, and scale > 0) leaves the scale to the caller's exp2 FMA, so ``s``
    is ``qk`` itself (masked); the row max of ``s`` times the positive factor is the row max of the scores.
    ``t`` is the softcap's tanh (for its derivative in backward), or ``qk``. Masked entries (only computed
    when MASK) are -inf.

    HAS_SCORE_MOD: step 4, the compiled ``SCORE_MOD(score, b, h, q_idx, kv_idx, off, SM)`` (natural units in
    and out; ``attnkit.compiler``) with ``smod = (C0, C1, C2, C3, META, b, h)``. ``g`` is its derivative
    d(mod)/d(score) where it runs (the backward's chain rule), else 1, and ``x`` its input (natural units;
    the captured tensors' gradients need it), else the score in log2 units.
    """
    if FEAT.SOFTCAP:
        x = qk * (par.sm_scale / par.softcap)
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no tanh intrinsic needed (interpreter too)
        t = 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)
        s = t * (par.softcap * LOG2E)
    else:
        t = qk
        if FEAT.DEFER:
            s = qk
        else:
            s = qk * (par.sm_scale * LOG2E)
    if FEAT.HAS_BIAS:
        bmask = (rows < seqlen_q) & (cols < seqlen_k)
        bias = tl.load(par.bias_ptr + rows * par.stride_bm + cols * par.stride_bn, mask=bmask, other=0.0)
        s += bias.to(tl.float32) * LOG2E
    if FEAT.HAS_ALIBI:
        s -= (par.slope * LOG2E) * tl.abs(rows + off - cols).to(tl.float32)
    g = 1.0
    x = s
    if FEAT.HAS_SCORE_MOD:  # (DEFER is off: s is in log2 units here)
        x = s * LN2
        y, g = FEAT.SCORE_MOD(x, smod[5], smod[6], rows, cols, off, smod)
        s = y * LOG2E
    if MASK:
        vis = (cols < seqlen_k) & (rows < seqlen_q)
        if FEAT.HAS_RIGHT:
            vis = vis & (cols <= rows + off + par.win_right)
        if FEAT.HAS_LEFT:
            vis = vis & (cols >= rows + off - par.win_left)
        s = tl.where(vis, s, float("-inf"))
    return s, t, g, x


@triton.jit
def dscore_mod(ds, p, g, HAS_SCORE_MOD: tl.constexpr):
    """dL/d(score before the score mod) from dL/d(score after it), ``g`` the mod's derivative; 0 where the
    probability ``p`` is 0 (masked or padding entries, where ``g`` may be anything)."""
    if HAS_SCORE_MOD:
        return tl.where(p == 0.0, 0.0, ds * g)
    else:
        return ds


@triton.jit
def dscore_dqk(ds, t, sm_scale, SOFTCAP: tl.constexpr):
    """Chain rule from the final score back to the raw dot product (the inverse path of :func:`scores`)."""
    if SOFTCAP:
        return ds * (sm_scale * (1.0 - t * t))
    else:
        return ds * sm_scale


@triton.jit
def dropout_keep(rng_ptr, bh, rows, cols, dropout_p):
    """Counter-based keep mask: Philox keyed by the call's seed, counters (j, i, b*Hq + h, offset).

    Depends only on (seed, offset, b, h, i, j), so forward, backward and the host-side
    :func:`attnkit.backends.triton.ops.dropout_keep_mask` draw the same bits for any tiling.
    """
    seed = tl.load(rng_ptr)
    offset = tl.load(rng_ptr + 1).to(tl.uint32)
    zero = rows * 0 + cols * 0  # int32 block of the tile's shape
    c0 = (cols + zero).to(tl.uint32)
    c1 = (rows + zero).to(tl.uint32)
    c2 = (zero + bh).to(tl.uint32)
    c3 = zero.to(tl.uint32) + offset
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c3)
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)  # 24 random bits -> [0, 1)
    return u >= dropout_p


# -- masks as data (``attnkit.masks._intervals``): masked query rows [a, b) U [c, d) per key column ----------
@triton.jit
def iv_summary(sum_ptr, p0, p1, BLOCK: tl.constexpr):
    """min/max of a, b, c, d over the packed key columns ``p0..p1`` (inclusive), from the 16-key summary at
    ``sum_ptr`` ((nblk, 8)); a tile of BLOCK keys spans at most 2 * BLOCK / 16 entries at any alignment."""
    idx = p0 // 16 + tl.arange(0, 2 * BLOCK // 16)
    ok = idx <= p1 // 16
    p = sum_ptr + idx * 8
    big = 1 << 30
    lo_a = tl.min(tl.load(p + 0, mask=ok, other=big), 0)
    hi_a = tl.max(tl.load(p + 1, mask=ok, other=-big), 0)
    lo_b = tl.min(tl.load(p + 2, mask=ok, other=big), 0)
    hi_b = tl.max(tl.load(p + 3, mask=ok, other=-big), 0)
    lo_c = tl.min(tl.load(p + 4, mask=ok, other=big), 0)
    hi_c = tl.max(tl.load(p + 5, mask=ok, other=-big), 0)
    lo_d = tl.min(tl.load(p + 6, mask=ok, other=big), 0)
    hi_d = tl.max(tl.load(p + 7, mask=ok, other=-big), 0)
    return lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d


@triton.jit
def iv_state(lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d, r0, r1):
    """(empty, full) of query rows ``r0..r1`` against columns with these bounds. Conservative: ``empty``
    means every column masks every row (skip), ``full`` that no column masks any row (no mask work)."""
    empty = ((hi_a <= r0) & (r1 < lo_b)) | ((hi_c <= r0) & (r1 < lo_d))
    full = ((hi_b <= r0) | (lo_a > r1)) & ((hi_d <= r0) | (lo_c > r1))
    return empty, full


@triton.jit
def iv_classify(sum_ptr, p0, p1, r0, r1, BLOCK: tl.constexpr):
    """(empty, full) of query rows ``r0..r1`` against the packed key columns ``p0..p1`` (see iv_state)."""
    lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d = iv_summary(sum_ptr, p0, p1, BLOCK)
    return iv_state(lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d, r0, r1)


@triton.jit
def iv_narrow_kv(sum_ptr, k_start, lo, hi, seqlen_k, r0, r1, BLOCK_N: tl.constexpr):
    """The key range ``[lo, hi)`` (tile starts on lo's grid) cut to the tiles from the first to the last
    16-key summary entry that is not empty for query rows ``r0..r1``: a vectorized scan of the summaries,
    1024 keys per step (no K/V loads), so the main loop needs no branch."""
    CH: tl.constexpr = 64
    e_lo = (k_start + lo) // 16
    e_hi = tl.where(hi > lo, (k_start + tl.minimum(hi, seqlen_k) - 1) // 16, e_lo - 1)  # (inclusive)
    first = e_hi + 1
    last = e_lo - 1
    for e0 in range(e_lo, e_hi + 1, CH):
        idx = e0 + tl.arange(0, CH)
        ok = idx <= e_hi
        p = sum_ptr + idx * 8
        big = 1 << 30
        hi_a = tl.load(p + 1, mask=ok, other=big)
        lo_b = tl.load(p + 2, mask=ok, other=-big)
        hi_c = tl.load(p + 5, mask=ok, other=big)
        lo_d = tl.load(p + 6, mask=ok, other=-big)
        seen = ok & ((hi_a > r0) | (r1 >= lo_b)) & ((hi_c > r0) | (r1 >= lo_d))  # (not empty)
        first = tl.minimum(first, tl.min(tl.where(seen, idx, big), 0))
        last = tl.maximum(last, tl.max(tl.where(seen, idx, -1), 0))
    # entries -> keys of this sequence -> tiles on lo's grid
    k_first = first * 16 - k_start
    lo2 = tl.maximum(lo + ((k_first - lo) // BLOCK_N) * BLOCK_N, lo)
    hi2 = tl.minimum((last + 1) * 16 - k_start, hi)
    lo2 = tl.where(last < first, hi, lo2)  # nothing visible: an empty range
    return lo2, tl.maximum(hi2, lo2)


@triton.jit
def iv_narrow_q(sum_ptr, p0, p1, lo, hi, seqlen_q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query range ``[lo, hi)`` of a key tile (packed columns ``p0..p1``) cut to its first and last
    non-empty query tile (dK/dV): the key tile's bounds are read once, then scalar tests per query tile."""
    lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d = iv_summary(sum_ptr, p0, p1, BLOCK_N)
    first = hi
    last = lo
    for start_m in range(lo, hi, BLOCK_M):
        r1 = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
        empty, _ = iv_state(lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d, start_m, r1)
        first = tl.where(empty, first, tl.minimum(first, start_m))
        last = tl.where(empty, last, start_m + BLOCK_M)
    return first, tl.maximum(tl.minimum(last, hi), first)


@triton.jit
def iv_segments(lo, full_lo, full_hi, hi, lo2, hi2):
    """The schedule ``(lo, full_lo, full_hi, hi)`` of :func:`tile_range` restricted to ``[lo2, hi2)``."""
    full_lo = tl.minimum(tl.maximum(full_lo, lo2), hi2)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi2)
    return lo2, full_lo, full_hi, hi2


@triton.jit
def iv_full_run(sum_ptr, grid0, s_lo, s_hi, p0, p1, r0, r1, seqlen_q, KEYS: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_E: tl.constexpr):  # fmt: skip
    """The last maximal run ``[b0, b1)`` of tiles (of BLOCK, on ``grid0``'s grid, inside ``[s_lo, s_hi)``,
    the start rounded up and the end down) that are FULL: no column of theirs masks any of their rows, each
    16-key summary entry tested on its own (:func:`iv_state`'s full test; a tile is full iff all the entries
    it touches are). ``(s_hi, s_hi)`` if there is none. The caller runs ``[b0, b1)`` with no interval work.

    KEYS: the tiles are key tiles (packed first column ``p0`` + the tile's start) against query rows
    ``r0..r1`` (forward, dQ); else query tiles (rows capped at ``seqlen_q``) against the packed key columns
    ``p0..p1`` of one key tile of BLOCK_E keys (dK/dV). "Last": for window- and causal-like masks the long
    run lies next to the diagonal. A vectorized scan of the summaries, CT tiles per step (no K/V loads)."""
    E: tl.constexpr = 2 * BLOCK_E // 16  # summary entries a tile of BLOCK_E keys touches, at any alignment
    CT: tl.constexpr = 256 // E  # tiles per step
    g0 = grid0 + ((s_lo - grid0 + BLOCK - 1) // BLOCK) * BLOCK
    g1 = grid0 + ((s_hi - grid0) // BLOCK) * BLOCK  # (tiles [t, t + BLOCK) with t + BLOCK <= g1)
    run_s = g0 * 0 - 1
    run_e = g0 * 0 - 1
    big = 1 << 30  # (the bounds of entries outside a tile: neutral, full)
    if not KEYS:  # one key tile: its entries, read once (1, E)
        e = p0 // 16 + tl.arange(0, E)[None, :]
        e_ok = e <= p1 // 16
        k_lo_a = tl.load(sum_ptr + e * 8 + 0, mask=e_ok, other=big)
        k_hi_b = tl.load(sum_ptr + e * 8 + 3, mask=e_ok, other=-big)
        k_lo_c = tl.load(sum_ptr + e * 8 + 4, mask=e_ok, other=big)
        k_hi_d = tl.load(sum_ptr + e * 8 + 7, mask=e_ok, other=-big)
    for t0 in range(g0, g1, CT * BLOCK):
        tiles = t0 + tl.arange(0, CT) * BLOCK  # (CT,) tile starts
        valid = tiles < g1
        if KEYS:  # each key tile's entries (CT, E) against the rows r0..r1
            c0 = p0 + tiles[:, None]
            idx = c0 // 16 + tl.arange(0, E)[None, :]
            ok = (idx <= (c0 + BLOCK - 1) // 16) & valid[:, None]
            lo_a = tl.load(sum_ptr + idx * 8 + 0, mask=ok, other=big)
            hi_b = tl.load(sum_ptr + idx * 8 + 3, mask=ok, other=-big)
            lo_c = tl.load(sum_ptr + idx * 8 + 4, mask=ok, other=big)
            hi_d = tl.load(sum_ptr + idx * 8 + 7, mask=ok, other=-big)
            x0 = r0
            x1 = r1
        else:  # the key tile's entries against each query tile's rows (CT, 1)
            lo_a, hi_b, lo_c, hi_d = k_lo_a, k_hi_b, k_lo_c, k_hi_d
            x0 = tiles[:, None]
            x1 = tl.minimum(tiles[:, None] + BLOCK, seqlen_q) - 1
        full_e = ((hi_b <= x0) | (lo_a > x1)) & ((hi_d <= x0) | (lo_c > x1))  # (CT, E)
        full_t = valid & (tl.min(full_e.to(tl.int32), 1) > 0)
        last_full = tl.max(tl.where(full_t, tiles, -1), 0)
        last_bad = tl.max(tl.where(full_t, -1, tl.where(valid & (tiles < last_full), tiles, -1)), 0)
        # the run ends at this step's last full tile; it starts after the last tile that is not full before
        # it, or continues the previous step's run if that ended right here
        start = tl.where(last_bad >= 0, last_bad + BLOCK, tl.where(run_e == t0, run_s, t0))
        run_s = tl.where(last_full >= 0, start, run_s)
        run_e = tl.where(last_full >= 0, last_full + BLOCK, run_e)
    none = run_e <= run_s
    return tl.where(none, s_hi, run_s), tl.where(none, s_hi, run_e)


@triton.jit
def iv_bounds(seg: tl.constexpr, lo, full_lo, b0, b1, full_hi, hi):
    """Segment ``seg`` (0..4) of the schedule with an interval body: masked head ``[lo, full_lo)``, unmasked
    ``[full_lo, b0)``, the body ``[b0, b1)`` (no mask, no interval work), unmasked ``[b1, full_hi)``, masked
    tail ``[full_hi, hi)``. Without a body (``b0 == b1 == full_hi``) segments 2 and 3 are empty."""
    if seg == 0:
        seg_lo, seg_hi = lo, full_lo
    elif seg == 1:
        seg_lo, seg_hi = full_lo, b0
    elif seg == 2:
        seg_lo, seg_hi = b0, b1
    elif seg == 3:
        seg_lo, seg_hi = b1, full_hi
    else:
        seg_lo, seg_hi = full_hi, hi
    return seg_lo, seg_hi


@triton.jit
def iv_load(iv_ptr, cols, seqlen_k):
    """The four bounds of key columns ``cols`` (any shape) from ``iv_ptr`` ((K, 4) int32 at this sequence's
    first key); columns past the sequence mask nothing (the bounds check masks them)."""
    ok = cols < seqlen_k
    a = tl.load(iv_ptr + cols * 4 + 0, mask=ok, other=0)
    b = tl.load(iv_ptr + cols * 4 + 1, mask=ok, other=0)
    c = tl.load(iv_ptr + cols * 4 + 2, mask=ok, other=0)
    d = tl.load(iv_ptr + cols * 4 + 3, mask=ok, other=0)
    return a, b, c, d


@triton.jit
def iv_apply(s, rows, a, b, c, d):
    """``s`` with -inf where row ``rows`` lies in its column's [a, b) or [c, d) (all broadcastable)."""
    hit = ((rows >= a) & (rows < b)) | ((rows >= c) & (rows < d))
    return tl.where(hit, float("-inf"), s)
