"""Tile states of a mask evaluated on the device (pure ``@triton.jit``): block sparsity for masks that have
no interval lowering (``mask_mod`` callables, ``|``, ``~``, ``neighborhood_2d``, ...).

:func:`tile_states`: one program = one (BLOCK_M query rows) x (BLOCK_N keys) tile of one (batch element or
sequence, query head); it evaluates the compiled mask condition (``MASK_KEEP``, ``attnkit.compiler.masked``)
on the tile's in-sequence elements and writes one int8: 0 empty (nothing kept: the attention kernels skip the
tile), 1 partial (they apply the condition), 2 full (everything kept: they run the inner score mod alone).
O(BLOCK_M * BLOCK_N) work per tile in registers, nothing of size Sq x Sk in memory.

:func:`ts_state` / :func:`ts_apply` are what the attention kernels call per tile (constexpr HAS_TS).
"""

import triton
import triton.language as tl

from attnkit.backends.triton.kernels.common import seq_bounds

EMPTY = tl.constexpr(0)
PARTIAL = tl.constexpr(1)
FULL = tl.constexpr(2)


@triton.jit(do_not_specialize=["SQ", "SK", "n_m", "n_n", "stride_tb", "stride_th"])
def tile_states(
    St,
    CuQ,
    CuK,
    SmC0,
    SmC1,
    SmC2,
    SmC3,
    SmMeta,  # the mask's captured tensors and their int64 (4, 8) strides/sizes (attnkit.compiler)
    HS,  # heads of the states tensor (Hq, or 1 where the mask ignores the head)
    SQ,
    SK,
    n_m,
    n_n,  # query and key tiles per (batch, head): states (B', HS, n_m, n_n), int8, contiguous
    stride_tb,
    stride_th,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr,
    MASK_KEEP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HS
    h = bh % HS
    _, seqlen_q, _, seqlen_k = seq_bounds(CuQ, CuK, b, SQ, SK, VARLEN)
    off = seqlen_k - seqlen_q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    inside = (rows < seqlen_q) & (cols < seqlen_k)
    smod = (SmC0, SmC1, SmC2, SmC3, SmMeta, b, h)
    keep = MASK_KEEP(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), b, h, rows, cols, off, smod)
    kept = tl.sum(tl.sum((keep & inside).to(tl.int32), 1), 0)
    n_in = tl.sum(tl.sum(inside.to(tl.int32), 1), 0)
    state = tl.where(kept == 0, EMPTY, tl.where(kept == n_in, FULL, PARTIAL))
    tl.store(St + b * stride_tb + h * stride_th + pid_m * n_n + pid_n, state.to(tl.int8))


@triton.jit
def ts_state(ts_ptr):
    """(empty, full) of the tile whose state ``ts_ptr`` points at."""
    st = tl.load(ts_ptr)
    return st == EMPTY, st == FULL


@triton.jit
def ts_apply(s, rows, cols, off, smod, MASK_KEEP: tl.constexpr):
    """``s`` with -inf where the mask condition drops (row, col) (a partial tile; all broadcastable)."""
    return tl.where(MASK_KEEP(s, smod[5], smod[6], rows, cols, off, smod), s, float("-inf"))


@triton.jit
def ts_narrow(ts_ptr, stride, lo, hi, BLOCK: tl.constexpr):
    """The range ``[lo, hi)`` (``lo`` a multiple of BLOCK) cut to its first and last non-empty tile: a
    vectorized scan of the states (``ts_ptr`` tile 0's, ``stride`` between tiles), 64 tiles per step, so a
    loop over a band of tiles starts and ends on it (empty tiles inside are still skipped one by one)."""
    CH: tl.constexpr = 64
    t_lo = lo // BLOCK
    t_hi = (hi + BLOCK - 1) // BLOCK  # (exclusive)
    first = t_hi
    last = t_lo - 1
    for t0 in range(t_lo, t_hi, CH):
        idx = t0 + tl.arange(0, CH)
        ok = idx < t_hi
        seen = ok & (tl.load(ts_ptr + idx * stride, mask=ok, other=0) != EMPTY)
        first = tl.minimum(first, tl.min(tl.where(seen, idx, t_hi), 0))
        last = tl.maximum(last, tl.max(tl.where(seen, idx, -1), 0))
    lo2 = tl.where(last < first, hi, first * BLOCK)
    hi2 = tl.minimum((last + 1) * BLOCK, hi)
    return lo2, tl.maximum(hi2, lo2)
