"""One key tile of the Hopper Gluon forward (``fwd.py``): the online-softmax update with the masks it applies,
and the two ways a consumer warpgroup runs a tile (FA3's intra-warpgroup overlap, or the plain order).

Device code only (pure ``@gluon.jit``); see ``fwd.py`` for the partitions, the barrier protocol and the
schedule these steps run in.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def two_sum(a, b):
    """(hi, lo) with hi = fl(a + b) and hi + lo == a + b exactly (Knuth's TwoSum, as in ``_fwd.py``)."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    return hi, lo



@gluon.jit
def softmax_tile(s, m_i, l_i, mk, col0, c, BLOCK_N: gl.constexpr, MASK: gl.constexpr,
                  HAS_RIGHT: gl.constexpr):  # fmt: skip
    """Online-softmax update with the raw scores ``s`` (BLOCK_M, BLOCK_N) of the key tile at ``col0``.

    ``m_i`` (running max, log2 units) and ``l_i`` (running sum) are (BLOCK_M,) in the row slice of s's
    layout. MASK: 0 none; 1 causal, key j visible to row r iff ``j <= row_lim[r]`` (``i_r + off``); 2 a
    partial tile of a mask carried as data: hidden where row i_r lies in the column's masked intervals
    ``[a, b) U [c, d)`` (``iv`` points at the (Sk, 4) int32 bounds of this (batch, head)), and, with the
    causal flag or a right window bound (HAS_RIGHT), where ``j > row_lim[r]`` (``i_r + off + right``).
    ``mk`` = (rows, row_lim, iv). Returns (p fp32 (BLOCK_M, BLOCK_N), alpha =
    exp2(m_old - m_new) (BLOCK_M,), m_new, l_new).
    """
    rows, row_lim, iv = mk
    if MASK == 1:
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))  # (BLOCK_N,)
        s = gl.where(cols[None, :] <= row_lim[:, None], s, float("-inf"))
    if MASK == 2:
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))  # (BLOCK_N,)
        r = rows[:, None]
        # one interval at a time: two (BLOCK_N,) bound vectors live at once, not four
        lo_a = gl.load(iv + cols * 4)
        hi_a = gl.load(iv + cols * 4 + 1)
        s = gl.where((r >= lo_a[None, :]) & (r < hi_a[None, :]), float("-inf"), s)
        lo_b = gl.load(iv + cols * 4 + 2)
        hi_b = gl.load(iv + cols * 4 + 3)
        s = gl.where((r >= lo_b[None, :]) & (r < hi_b[None, :]), float("-inf"), s)
        if HAS_RIGHT:
            s = gl.where(cols[None, :] <= row_lim[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * c)  # c > 0: max of the scaled scores
    if MASK != 0:
        # a row with no visible key so far keeps m = -inf; subtract 0 there so exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new  # every row of an unmasked tile has a finite score
    p = gl.exp2(s * c - m_use[:, None])  # (BLOCK_M, BLOCK_N), one FMA + ex2 per score
    alpha = gl.exp2(m_i - m_use)  # (BLOCK_M,), 0 on the first visited tile (m_i = -inf)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def overlap_step(
    j,
    g0,
    o,
    p,
    m_i,
    l_i,
    mk,
    col_next,
    c,
    q_smem,
    k_smem,
    v_smem,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
    p_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    MASK: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
):
    """One FA3 iteration: S_{j+1} = Q K_{j+1}^T and O += P_j V_j in flight, softmax(S_{j+1}) under PV_j.

    In: O (BLOCK_M, D) and P_j (BLOCK_M, BLOCK_N) relative to the running max through tile j. Out: O
    including tile j and P_{j+1}, both relative to the max through tile j + 1. MASK applies to tile j + 1,
    whose first key is ``col_next``.
    The item's tile j sits in ring slot ``(g0 + j) % NUM_STAGES`` (``g0``: tiles before the item).
    """
    jn = j + 1
    sn = (g0 + jn) % NUM_STAGES
    sc = (g0 + j) % NUM_STAGES
    mbarrier.wait(k_ready.index(sn), ((g0 + jn) // NUM_STAGES) & 1)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q_smem, k_smem.index(sn).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(sc), ((g0 + j) // NUM_STAGES) & 1)
    o_tok = warpgroup_mma(p, v_smem.index(sc), o, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s_tok,))  # (BLOCK_M, BLOCK_N); groups retire in order: S done
    mbarrier.arrive(k_empty.index(sn))
    p_new, alpha, m_i, l_i = softmax_tile(
        s, m_i, l_i, mk, col_next, c, BLOCK_N, MASK, HAS_RIGHT
    )
    p_new = gl.convert_layout(p_new.to(q_smem.dtype), p_layout)  # registers: the next wgmma's A
    o, p = warpgroup_mma_wait(0, deps=(o_tok, p))  # P_j stays live until its wgmma is done
    mbarrier.arrive(v_empty.index(sc))
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    o = o * alpha_o[:, None]
    return o, p_new, m_i, l_i


@gluon.jit
def serial_step(
    j,
    g0,
    o,
    m_i,
    l_i,
    mk,
    col,
    c,
    q_smem,
    k_smem,
    v_smem,
    k_ready,
    k_empty,
    v_ready,
    v_empty,
    s_layout: gl.constexpr,
    o_layout: gl.constexpr,
    p_layout: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    MASK: gl.constexpr,
    HAS_RIGHT: gl.constexpr,
):
    """Tile j (ring slot ``(g0 + j) % NUM_STAGES``, first key ``col``) without overlap: S_j, softmax, O *=
    alpha, O += P_j V_j, each waited for."""
    sc = (g0 + j) % NUM_STAGES
    phase = ((g0 + j) // NUM_STAGES) & 1
    mbarrier.wait(k_ready.index(sc), phase)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q_smem, k_smem.index(sc).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s_tok,))  # (BLOCK_M, BLOCK_N)
    mbarrier.arrive(k_empty.index(sc))
    p, alpha, m_i, l_i = softmax_tile(s, m_i, l_i, mk, col, c, BLOCK_N, MASK, HAS_RIGHT)
    p = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    o = o * alpha_o[:, None]
    mbarrier.wait(v_ready.index(sc), phase)
    o_tok = warpgroup_mma(p, v_smem.index(sc), o, is_async=True)
    o, p = warpgroup_mma_wait(0, deps=(o_tok, p))
    mbarrier.arrive(v_empty.index(sc))
    return o, m_i, l_i
