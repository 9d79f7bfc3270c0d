"""Host side of the Hopper Gluon dK/dV backward (``kernels/hopper/bwd.py``): the support check, TMA views
and the launch. What a call must be to come here is ``runtime/capability.py``'s ``GLUON_BWD`` row;
:func:`tma_views` then checks strides and alignment.
"""

from __future__ import annotations

import torch

from attnkit.backends.triton.kernels.hopper.bwd import _attn_bwd_dkdv_ws
from attnkit.backends.triton.ops.gluon_fwd import (
    DTYPES,
    LOG2E,
    descriptor,
    raw_descriptor,
    tma_reason,
    tma_rows,
)
from attnkit.backends.triton.runtime.capability import GLUON_BWD
from attnkit.backends.triton.runtime.launch import Launch

BLOCK_N = 128  # key rows per CTA: 64 per consumer warpgroup
MAXNREG = 168  # 12 warps (8 consumer + the producer's warpgroup) * 32 * 168 <= 64K: consumers get 240 each
HEAD_DIMS = GLUON_BWD.head_dims


def default_cfg(head_dim: int, seqlen_q: int, causal: bool) -> tuple[int, int]:
    """(BLOCK_M, NUM_STAGES): query rows per step and the depth of the Q/dO ring."""
    return 64, 2


def _smem_bytes(head_dim: int, block_m: int, stages: int, elem: int = 2) -> int:
    return (2 * BLOCK_N * head_dim + 2 * stages * block_m * head_dim) * elem + 1024


def supported(q, k, v, dout, dk, dv, layout, causal, cfg=None, scale=None) -> str | None:
    """None if :func:`gluon_backward_dkdv` can run these inputs (plain attention: the caller checks that
    no other feature is on), else a short reason."""
    if layout not in GLUON_BWD.layouts:
        return f"layout {layout!r} ({' or '.join(GLUON_BWD.layouts)} only)"
    if not all(t.is_cuda for t in (q, k, v, dout, dk, dv)):
        return "needs CUDA tensors"
    if torch.cuda.get_device_capability(q.device) not in GLUON_BWD.capabilities:
        return "needs sm_90 (H100/H200): wgmma, TMA and setmaxnreg"
    if q.dtype not in DTYPES or any(t.dtype != q.dtype for t in (k, v, dout, dk, dv)):
        return "dtype must be bf16 or fp16, the same for q, k, v, dout, dk, dv"
    if scale is not None and not scale > 0:
        return "scale must be > 0"
    hd = 1 if layout == "bhsd" else 2
    B, Hq, Sq, D = q.shape[0], q.shape[hd], q.shape[3 - hd], q.shape[3]
    Hk, Sk = k.shape[hd], k.shape[3 - hd]
    if k.shape != v.shape or k.shape[0] != B or dout.shape != q.shape:
        return "k and v must have the same shape and batch as q, dout the shape of q"
    if dk.shape != k.shape or dv.shape != k.shape or dk.stride() != dv.stride():
        return "dk and dv must have k's shape and the same strides"
    if D not in HEAD_DIMS or k.shape[3] != D:
        return f"head dim {D} (q) / {v.shape[3]} (v): needs D == Dv in {HEAD_DIMS}"
    if Hk == 0 or Hq % Hk:
        return "Hq must be a multiple of Hk"
    if Sq < 1 or Sk < 1:
        return "empty sequence"
    if B * Hk > 65535:
        return "B * Hk > 65535 (grid dimension 1)"
    block_m, stages = cfg if cfg is not None else default_cfg(D, Sq, causal)
    if _smem_bytes(D, block_m, stages) > 227 * 1024:
        return f"cfg {cfg} needs more shared memory than sm_90 has"
    if dk.stride(3) != 1:
        return "dk's last dim must have unit stride"
    return tma_reason((("q", q), ("k", k), ("v", v), ("dout", dout)), layout)


def tma_views(q, k, v, dout, dk, dv, layout: str):
    """For a call the caller has found eligible (``runtime/capability.gluon_backward_eligible``: sm_90,
    bhsd/bshd, 16-bit, D == Dv in HEAD_DIMS, no other feature): the 2D views the TMA descriptors of q, dout,
    k, v walk, or None where the strides, alignment or grid do not fit (then the Triton kernel runs).
    Cheaper than :func:`supported`, which the library's per-call path does not need. Each view is
    :func:`tma_rows`' (rows, cols, row stride); no tensor view is made."""
    hd = 1 if layout == "bhsd" else 2
    if k.shape[0] * k.shape[hd] > 65535 or q.shape[3 - hd] < 1 or k.shape[3 - hd] < 1:
        return None
    if dk.stride() != dv.stride() or dk.stride(3) != 1:
        return None
    rows = (tma_rows(q, layout), tma_rows(dout, layout), tma_rows(k, layout), tma_rows(v, layout))
    return None if None in rows else rows


def launch_dkdv(q, k, v, dout, hi, delta, dk, dv, layout: str, scale: float, causal: bool, views,
                listed=None, dqa=None):  # fmt: skip
    """:func:`gluon_backward_dkdv` with the default cfg on views :func:`tma_views` returned; ``listed``: what
    :func:`listed_args` gave for a mask carried as data (then ``causal`` is in its flags); ``dqa``: a zeroed
    float32 tensor of q's shape, contiguous, into which the kernel adds dQ / scale (then no dQ pass runs)."""
    cfg = default_cfg(q.shape[3], q.shape[2 if layout == "bhsd" else 1], causal)
    _launch(q, k, v, dout, hi, delta, dk, dv, layout, scale, causal, cfg, views, listed, dqa)


def listed_args(p):
    """(runtime arguments, HAS_LEFT, HAS_RIGHT) of the listed launch for a call whose only features are a mask
    carried as data and the causal / window flags (``runtime/capability.gluon_listed_backward_eligible`` has
    judged the call): the arguments are the transposed tile lists and counts of ``ops/ivlists.py`` at this
    kernel's tiles, their batch / head row strides and length, the intervals, their batch / head strides,
    and the left and right window bounds (causal folded into the right one). None where the lists are not
    made (then the Triton kernel runs dK/dV)."""
    from attnkit.backends.triton.ops import common as c
    from attnkit.backends.triton.ops import ivlists

    block_m = default_cfg(p.q.shape[3], p.max_seqlen_q, p.causal)[0]
    got = ivlists.lists(p, block_m, BLOCK_N, transposed=True)
    if got is None:
        return None
    lst, cnt = got
    sib, sih = c.iv_args(p, lst)[2:4]
    has_left, has_right, wl, wr = p.window()
    return (lst, cnt, *ivlists.row_strides(lst), p.startend, sib, sih, wl, wr), has_left, has_right


def gluon_backward_dkdv(q, k, v, dout, hi, delta, dk, dv, layout: str, scale: float, causal: bool, cfg=None):
    """dK and dV of plain attention on Hopper, written into ``dk`` and ``dv`` (k's shape and layout).

    ``hi`` (B, Hq, Sq) float32 contiguous: the forward's log2 row statistic (``stats[0]``; +inf for rows
    with no visible key); ``delta`` (B, Hq, Sq) float32 contiguous: rowsum(dO * O) - dLSE. ``cfg`` =
    (BLOCK_M, NUM_STAGES) or None for :func:`default_cfg`."""
    why = supported(q, k, v, dout, dk, dv, layout, causal, cfg=cfg, scale=scale)
    if why is not None:
        raise ValueError(f"gluon_backward_dkdv: {why}")
    hd = 1 if layout == "bhsd" else 2
    B, Hq, Sq = q.shape[0], q.shape[hd], q.shape[3 - hd]
    for name, t in (("hi", hi), ("delta", delta)):
        if t.shape != (B, Hq, Sq) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"gluon_backward_dkdv: {name} must be a contiguous float32 (B, Hq, Sq) tensor")
    cfg = tuple(cfg) if cfg is not None else default_cfg(q.shape[3], Sq, causal)
    rows = tuple(tma_rows(t, layout) for t in (q, dout, k, v))
    _launch(q, k, v, dout, hi, delta, dk, dv, layout, scale, causal, cfg, rows)


def _launch(q, k, v, dout, hi, delta, dk, dv, layout, scale, causal, cfg, rows, listed=None, dqa=None):
    hd = 1 if layout == "bhsd" else 2
    B, Hq, Sq, D = q.shape[0], q.shape[hd], q.shape[3 - hd], q.shape[3]
    Hk, Sk = k.shape[hd], k.shape[3 - hd]
    block_m, stages = cfg
    sk = dk.stride()
    stride_kb, stride_kh, stride_ks = (sk[0], sk[1], sk[2]) if layout == "bhsd" else (sk[0], sk[2], sk[1])
    q_desc = descriptor(q, rows[0], block_m)
    do_desc = descriptor(dout, rows[1], block_m)
    k_desc = descriptor(k, rows[2], BLOCK_N)
    v_desc = descriptor(v, rows[3], BLOCK_N)
    grid = (-(-Sk // BLOCK_N), B * Hk)
    dqa_desc = hi_desc = dl_desc = None
    if dqa is not None:
        dqa_desc = accumulator_descriptor(dqa, rows[0][:2], block_m)
        hi_desc, dl_desc = stat_descriptor(hi, block_m), stat_descriptor(delta, block_m)
    _DKDV_LAUNCH[grid](
        q_desc,
        do_desc,
        k_desc,
        v_desc,
        dk,
        dv,
        hi,
        delta,
        stride_kb,
        stride_kh,
        stride_ks,
        Hq,
        Hk,
        Hq // Hk,
        Sq,
        Sk,
        scale * LOG2E,
        scale,
        *(listed[0] if listed is not None else (hi, hi, 0, 0, 0, hi, 0, 0, 0, 0)),
        dqa_desc,
        hi_desc,
        dl_desc,
        BSHD=layout == "bshd",
        CAUSAL=bool(causal) and listed is None,
        BLOCK_M=block_m,
        HEAD_D=D,
        NUM_STAGES=stages,
        LISTED=listed is not None,
        HAS_LEFT=listed is not None and listed[1],
        HAS_RIGHT=listed is not None and listed[2],
        FUSED_DQ=dqa is not None,
        num_warps=4,
        maxnreg=MAXNREG,
    )


_LAYOUTS: dict = {}


def _f32_layout(block: tuple[int, int]):
    if block not in _LAYOUTS:
        from triton.experimental.gluon import language as gl

        _LAYOUTS[block] = gl.NVMMASharedLayout.get_default_for(list(block), gl.float32)
    return _LAYOUTS[block]


def accumulator_descriptor(dqa: torch.Tensor, rows_cols: tuple[int, int], block_m: int):
    """The TMA descriptor the fused dQ adds into: ``dqa`` float32, contiguous in q's shape, walked as q's 2D
    view (``rows_cols``), boxes of (block_m, D / 2): one consumer warpgroup's columns."""
    block = (block_m, dqa.shape[3] // 2)
    return raw_descriptor(dqa, rows_cols, rows_cols[1], block, _f32_layout(block))


def stat_descriptor(stat: torch.Tensor, block_m: int):
    """The TMA descriptor of a row statistic (hi or delta: float32 (B, Hq, Sq) contiguous) walked as
    (B Hq, Sq), boxes of one head's ``block_m`` rows. Its row stride is 16-byte aligned only when Sq % 4 == 0,
    which ``runtime/capability.gluon_fused_dq`` requires."""
    B, Hq, Sq = stat.shape
    return raw_descriptor(stat, (B * Hq, Sq), Sq, (1, block_m), _f32_layout((1, block_m)))


_DKDV_LAUNCH = Launch(_attn_bwd_dkdv_ws)  # the compiled kernel looked up without Triton's per-launch binding

__all__ = ["default_cfg", "gluon_backward_dkdv", "launch_dkdv", "listed_args", "supported", "tma_views"]
