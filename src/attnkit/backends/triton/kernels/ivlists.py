"""Tile lists of a mask carried as data (pure ``@triton.jit``): per query tile, the key tiles it must visit,
partial ones apart from full ones, so that the forward and dQ loop over two lists with no classification, no
branch and no interval loads in the full one (``ops/ivlists.py``); :func:`iv_lists_t` the transpose, per key
tile its query tiles, for dK/dV.

:func:`iv_lists`: one program = one query tile (BLOCK_M rows) of one (B', H') row of the mask's data. It takes
the tiles that the call's flags (causal, window) leave, narrows them to the mask's non-empty range
(``iv_narrow_kv``) and classifies CT key tiles per step from the 16-key summaries, each entry tested on its
own (``iv_state``'s tests, as ``iv_full_run``): a tile is full when the flags and every entry leave all of its
elements visible and it lies inside the keys, empty when every entry hides all of it; the rest are partial.
Lists (B', H', query tiles, 2, key tiles) int32 (tile starts; partial then full), counts (B', H', query tiles,
2) int32. O(tiles) work and memory.
"""

import triton
import triton.language as tl

from attnkit.backends.triton.kernels.common import (
    iv_narrow_kv,
    iv_narrow_q,
    iv_segments,
    iv_state,
    kv_tiles,
    q_tiles,
)


@triton.jit
def _entries(p, ok):
    """The 8 bounds (lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d) of the summary entries at ``p`` (any
    shape); entries outside (``ok`` False) are neutral: empty and full for every row."""
    big = 1 << 30
    lo_a = tl.load(p + 0, mask=ok, other=big)
    hi_a = tl.load(p + 1, mask=ok, other=-big)
    lo_b = tl.load(p + 2, mask=ok, other=big)
    hi_b = tl.load(p + 3, mask=ok, other=-big)
    lo_c = tl.load(p + 4, mask=ok, other=big)
    hi_c = tl.load(p + 5, mask=ok, other=-big)
    lo_d = tl.load(p + 6, mask=ok, other=big)
    hi_d = tl.load(p + 7, mask=ok, other=-big)
    return lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d


@triton.jit
def _tile_states(lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d, x0, x1):
    """(empty, full) per tile (CT,) from (CT, E) entries against rows x0..x1: each entry tested on its own
    (``iv_state``); a tile is empty / full iff its entries all are."""
    empty_e, full_e = iv_state(lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d, x0, x1)
    return tl.min(empty_e.to(tl.int32), 1) > 0, tl.min(full_e.to(tl.int32), 1) > 0


@triton.jit
def _append(part_ptr, full_ptr, n_part, n_full, tiles, is_part, is_full):
    """Append the tiles marked partial / full to their lists (compacted in order); the new counts."""
    pp = is_part.to(tl.int32)
    pf = is_full.to(tl.int32)
    tl.store(part_ptr + n_part + tl.cumsum(pp, 0) - pp, tiles, mask=is_part)
    tl.store(full_ptr + n_full + tl.cumsum(pf, 0) - pf, tiles, mask=is_full)
    return n_part + tl.sum(pp, 0), n_full + tl.sum(pf, 0)


@triton.jit(do_not_specialize=["SQ", "SK", "n_m", "n_n", "win_left", "win_right", "stride_sb", "stride_sh"])
def iv_lists(
    Lst,
    Cnt,
    IvSum,
    stride_sb,
    stride_sh,  # summary (B', H', K/16, 8) int32; 0 = broadcast dim
    HS,  # heads of the lists (H' of the mask's data)
    SQ,
    SK,
    n_m,
    n_n,  # query and key tiles
    win_left,
    win_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HS
    h = bh % HS
    m0 = pid_m * BLOCK_M
    m1 = tl.minimum(m0 + BLOCK_M, SQ) - 1
    off = SK - SQ
    sum_ptr = IvSum + b * stride_sb + h * stride_sh
    lo, full_lo, full_hi, hi = kv_tiles(m0, m1, SK, off, win_left, win_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    lo2, hi2 = iv_narrow_kv(sum_ptr, 0, lo, hi, SK, m0, m1, BLOCK_N)
    lo, full_lo, full_hi, hi = iv_segments(lo, full_lo, full_hi, hi, lo2, hi2)
    row = bh * n_m + pid_m
    part_ptr = Lst + row * 2 * n_n
    E: tl.constexpr = 2 * BLOCK_N // 16  # summary entries a key tile touches
    CT: tl.constexpr = 256 // E  # key tiles per step
    n_part = lo * 0
    n_full = lo * 0
    for t0 in range(lo, hi, CT * BLOCK_N):
        tiles = t0 + tl.arange(0, CT) * BLOCK_N  # (CT,)
        valid = tiles < hi
        last = tl.minimum(tiles + BLOCK_N, SK) - 1
        idx = tiles[:, None] // 16 + tl.arange(0, E)[None, :]  # (CT, E): each key tile's entries
        lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d = _entries(
            sum_ptr + idx * 8, (idx <= last[:, None] // 16) & valid[:, None]
        )
        empty, full = _tile_states(lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d, m0, m1)
        flags_full = (tiles >= full_lo) & (tiles + BLOCK_N <= full_hi)  # (inside the keys, unmasked)
        is_full = valid & (~empty) & full & flags_full
        is_part = valid & (~empty) & (~is_full)
        n_part, n_full = _append(part_ptr, part_ptr + n_n, n_part, n_full, tiles, is_part, is_full)
    tl.store(Cnt + row * 2, n_part)
    tl.store(Cnt + row * 2 + 1, n_full)


@triton.jit(do_not_specialize=["SQ", "SK", "n_m", "n_n", "win_left", "win_right", "stride_sb", "stride_sh"])
def iv_lists_t(
    Lst,
    Cnt,
    IvSum,
    stride_sb,
    stride_sh,
    HS,
    SQ,
    SK,
    n_m,
    n_n,
    win_left,
    win_right,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The transposed lists (dK/dV): one program = one key tile; its query tiles, partial then full, in lists
    (B', H', key tiles, 2, query tiles) and counts (B', H', key tiles, 2). The key tile's summary entries are
    read once; each entry is tested against each query tile's rows (as :func:`iv_lists`)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HS
    h = bh % HS
    n0 = pid_n * BLOCK_N
    n1 = tl.minimum(n0 + BLOCK_N, SK) - 1
    off = SK - SQ
    sum_ptr = IvSum + b * stride_sb + h * stride_sh
    lo, full_lo, full_hi, hi = q_tiles(n0, n1, SQ, off, win_left, win_right, HAS_LEFT, HAS_RIGHT, BLOCK_M)
    lo2, hi2 = iv_narrow_q(sum_ptr, n0, n1, lo, hi, SQ, BLOCK_M, BLOCK_N)
    lo, full_lo, full_hi, hi = iv_segments(lo, full_lo, full_hi, hi, lo2, hi2)
    row = bh * n_n + pid_n
    part_ptr = Lst + row * 2 * n_m
    E: tl.constexpr = 2 * BLOCK_N // 16
    CT: tl.constexpr = 256 // E  # query tiles per step
    idx = n0 // 16 + tl.arange(0, E)[None, :]  # (1, E): this key tile's entries
    lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d = _entries(sum_ptr + idx * 8, idx <= n1 // 16)
    n_part = lo * 0
    n_full = lo * 0
    for t0 in range(lo, hi, CT * BLOCK_M):
        tiles = t0 + tl.arange(0, CT) * BLOCK_M  # (CT,)
        valid = tiles < hi
        x1 = tl.minimum(tiles[:, None] + BLOCK_M, SQ) - 1
        empty, full = _tile_states(lo_a, hi_a, lo_b, hi_b, lo_c, hi_c, lo_d, hi_d, tiles[:, None], x1)
        flags_full = (tiles >= full_lo) & (tiles + BLOCK_M <= full_hi)  # (inside the queries, unmasked)
        is_full = valid & (~empty) & full & flags_full & (n0 + BLOCK_N <= SK)
        is_part = valid & (~empty) & (~is_full)
        n_part, n_full = _append(part_ptr, part_ptr + n_m, n_part, n_full, tiles, is_part, is_full)
    tl.store(Cnt + row * 2, n_part)
    tl.store(Cnt + row * 2 + 1, n_full)
