"""Host side of the Hopper Gluon forward (``kernels/hopper/fwd.py``): TMA descriptors, the support check,
configurations and the launch. What a call must be to come here at all is ``runtime/capability.py``'s
``GLUON_FWD`` row; :func:`try_forward` then checks what only the tensors can say (strides, alignment).
"""

from __future__ import annotations

import torch
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from attnkit.backends.triton.kernels.hopper.fwd import _attn_fwd_ws
from attnkit.backends.triton.runtime.capability import GLUON_FWD
from attnkit.backends.triton.runtime.launch import Launch

LOG2E = 1.4426950408889634
BLOCK_M = 128
NUM_WARPS = 8  # the consumer: two warpgroups of 64 query rows each (one partition, or two when SPLIT)
MAXNREG = 168  # 12 warps (8 consumer + the producer's warpgroup) * 32 * 168 <= 64K: consumers get 240 each
HEAD_DIMS = GLUON_FWD.head_dims
SMEM_LIMIT = 227 * 1024  # shared memory a CTA may use on sm_90
DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def default_cfg(head_dim: int, seqlen_k: int, causal: bool) -> tuple[int, int, bool, bool, bool]:
    """(BLOCK_N, NUM_STAGES, OVERLAP, SPLIT, PERSISTENT): the widest key tile Sk allows, a 3-deep ring past
    1K keys, the FA3 overlap, two consumer partitions (the best or within noise of it on an H200 for
    D in {64, 128}, S in {512, 4K, 16K}, causal or not); persistent without a causal mask where the
    second Q buffer fits (its items are all alike, so a static schedule balances them)."""
    block_n = 128 if seqlen_k % 128 == 0 else 64
    stages = 3 if seqlen_k > 1024 else 2
    persistent = not causal and _smem_bytes(head_dim, block_n, stages, persistent=True) <= SMEM_LIMIT
    return block_n, stages, True, True, persistent


def listed_cfg(seqlen_k: int, holes: bool) -> tuple[int, int, bool, bool, bool]:
    """(BLOCK_N, NUM_STAGES, OVERLAP, SPLIT, PERSISTENT) of the listed forward (never persistent: its items
    differ in length). 64-key tiles 4 deep, or 128-key tiles 2 deep where the mask leaves holes inside a
    row's range (``iv_skip``). H200, bf16, B=2 H=16 S=8k D=128, 2026-12-03 (run F's probe), ms at (64, 4)
    against (128, 2): causal documents 0.453 / 0.540, prefix-LM 1.045 / 1.038, a shared prefix (holes: the
    other responses) 0.671 / 0.621; (128, 3) 0.546 / 1.048 / 0.627, (64, 3) 0.457 / 1.156 / 0.669."""
    if holes and seqlen_k % 128 == 0:
        return 128, 2, True, True, False
    return 64, 4, True, True, False


def _full_cfg(cfg, head_dim: int, seqlen_k: int, causal: bool) -> tuple[int, int, bool, bool, bool]:
    """A cfg of 3 (BLOCK_N, NUM_STAGES, OVERLAP), 4 (+ SPLIT) or 5 (+ PERSISTENT) entries, or None for the
    default."""
    if cfg is None:
        return default_cfg(head_dim, seqlen_k, causal)
    cfg = tuple(cfg) + (False,) * (5 - len(cfg))
    return (int(cfg[0]), int(cfg[1]), bool(cfg[2]), bool(cfg[3]), bool(cfg[4]))


def _smem_bytes(head_dim: int, block_n: int, stages: int, elem: int = 2, persistent: bool = False) -> int:
    q_bufs = 2 if persistent else 1
    return (q_bufs * BLOCK_M * head_dim + 2 * stages * block_n * head_dim) * elem + 1024


PERSISTENT_CTAS: int | None = None  # CTAs of a persistent launch; None: one per multiprocessor (tests set it)
_SMS: dict = {}


def _persistent_ctas(device: torch.device) -> int:
    """One CTA per multiprocessor (the consumers' 240 registers a thread leave room for one CTA an SM)."""
    if PERSISTENT_CTAS is not None:
        return PERSISTENT_CTAS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def tma_rows(t: torch.Tensor, layout: str) -> tuple[int, int, int] | None:
    """(rows, cols, row stride) of the 2D matrix the TMA descriptors walk: bhsd (B, H, S, D) as
    (B*H*S, D), bshd (B, S, H, D) as (B*S, H*D); or None where the strides do not flatten so (the rules of
    ``t.view``: size-1 dims are free), the last dim is not unit-stride, or the base or row stride is not
    16-byte aligned. The one place these rules live: every Gluon launch and support check asks here, and
    no view is made."""
    B, d1, d2, D = t.shape
    s0, s1, s2, s3 = t.stride()
    if s3 != 1 and D != 1:
        return None
    if layout == "bhsd":
        row_dims, cols = ((B, s0), (d1, s1), (d2, s2)), D
    else:  # bshd: heads and head dim merge into the columns
        if d2 != 1 and D != 1 and s2 != D:
            return None
        row_dims, cols = ((B, s0), (d1, s1)), d2 * D
    rows, stride = 1, None
    for n, s in reversed(row_dims):  # innermost first, as view merges
        if n == 1:
            continue
        if stride is not None and s != rows * stride:
            return None
        stride = s if stride is None else stride
        rows *= n
    stride = cols if stride is None else stride  # a single row: any stride will do
    if t.data_ptr() % 16 or (stride * t.element_size()) % 16:
        return None
    return rows, cols, stride


def supported(q, k, v, layout, causal, **unsupported_features) -> str | None:
    """None if :func:`gluon_forward` can run these inputs, else a short reason.

    Keyword arguments: ``cfg`` (checked against Sk and shared memory), ``scale`` (must be > 0), and any
    feature (bias, softcap, dropout_p, window, ...) which must be absent (None / False / 0).
    """
    cfg = unsupported_features.pop("cfg", None)
    scale = unsupported_features.pop("scale", None)
    for name, val in unsupported_features.items():
        absent = val is None or val is False or (isinstance(val, (int, float)) and val == 0)
        if not absent and not (isinstance(val, (tuple, list)) and all(x in (None, -1) for x in val)):
            return f"gluon forward does not support {name}"
    if layout not in GLUON_FWD.layouts:
        return f"layout {layout!r} ({' or '.join(GLUON_FWD.layouts)} only)"
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "needs CUDA tensors"
    if torch.cuda.get_device_capability(q.device) not in GLUON_FWD.capabilities:
        return "needs sm_90 (H100/H200): wgmma, TMA and setmaxnreg"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return "dtype must be bf16 or fp16, the same for q, k, v"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "needs 4-d q, k, v"
    if scale is not None and not scale > 0:
        return "scale must be > 0"
    hd = 1 if layout == "bhsd" else 2
    sd = 3 - hd
    B, Hq, Sq, D = q.shape[0], q.shape[hd], q.shape[sd], q.shape[3]
    Hk, Sk = k.shape[hd], k.shape[sd]
    if k.shape != v.shape or k.shape[0] != B:
        return "k and v must have the same shape and batch as q"
    if D not in HEAD_DIMS or v.shape[3] != D or k.shape[3] != D:
        return f"head dim {D} (q) / {v.shape[3]} (v): needs D == Dv in {HEAD_DIMS}"
    if Hk == 0 or Hq % Hk:
        return "Hq must be a multiple of Hk"
    if Sq < 1 or Sk < 1:
        return "empty sequence"
    block_n, stages, overlap, split, persistent = _full_cfg(cfg, D, Sk, causal)
    if persistent and split and not overlap:
        # wrong rows on an H200 (rows 128-191 of each head at Sq=640, Sk=512, causal; every other
        # (OVERLAP, SPLIT) pair exact): not found, so not offered (docs/triton_notes.md version 8)
        return "PERSISTENT with SPLIT needs OVERLAP"
    if Sk % block_n:
        return f"Sk = {Sk} is not a multiple of BLOCK_N = {block_n}"
    if _smem_bytes(D, block_n, stages, persistent=persistent) > SMEM_LIMIT:
        return f"cfg {cfg} needs more shared memory than sm_90 has"
    return tma_reason((("q", q), ("k", k), ("v", v)), layout)


def tma_reason(named, layout: str) -> str | None:
    """Why one of the (name, tensor) pairs cannot be walked by a TMA descriptor (:func:`tma_rows`), or
    None."""
    for name, t in named:
        if tma_rows(t, layout) is None:
            return (
                f"{name}'s strides do not flatten to 2D rows with a unit-stride last dim and a 16-byte "
                "aligned base and row stride (TMA)"
            )
    return None


_SMEM_LAYOUTS: dict = {}


def _smem_layout(block_rows: int, D: int, dtype: torch.dtype):
    key = (block_rows, D, dtype)
    if key not in _SMEM_LAYOUTS:  # building one costs ~6 us: once per tile shape
        _SMEM_LAYOUTS[key] = gl.NVMMASharedLayout.get_default_for([block_rows, D], DTYPES[dtype])
    return _SMEM_LAYOUTS[key]


def descriptor(t: torch.Tensor, rows_cols_stride: tuple[int, int, int], block_rows: int):
    """The host TMA descriptor of ``t`` as :func:`tma_rows` flattened it, boxes of (block_rows, head dim).

    Built without ``TensorDescriptor.__post_init__``: its checks (16-byte base and strides, unit last
    stride) are :func:`tma_rows`' own, which every caller has passed, and they cost ~7 us of host time a
    descriptor on the H200 machine (seven a forward+backward)."""
    rows, cols, stride = rows_cols_stride
    D = t.shape[3]
    return raw_descriptor(t, (rows, cols), stride, (block_rows, D), _smem_layout(block_rows, D, t.dtype))


def raw_descriptor(t: torch.Tensor, rows_cols: tuple[int, int], row_stride: int, block: tuple[int, int],
                   layout):  # fmt: skip
    """A host TMA descriptor of ``t`` walked as a (rows, cols) matrix with unit column stride, boxes of
    ``block`` in shared-memory ``layout``, zero-filled past its edges; the caller has checked the 16-byte
    rules. The launcher reads only ``t``'s address and dtype; the shape and strides are these."""
    desc = _TD_NEW(TensorDescriptor)
    desc.base = t
    desc.shape = list(rows_cols)
    desc.strides = [row_stride, 1]
    desc.block_shape = list(block)
    desc.layout = layout
    desc.padding = "zero"
    return desc


_TD_NEW = object.__new__


def try_forward(q, k, v, layout: str, scale: float, causal: bool, bufs=None):
    """:func:`gluon_forward` for a call the caller has already found eligible (sm_90, bhsd/bshd, 16-bit,
    D == Dv in HEAD_DIMS, Sk a multiple of 64, Hq a multiple of Hk, no other feature: see
    ``runtime/capability.gluon_forward_eligible``); checks only what that cannot know (strides, alignment) and
    returns None where they do not fit, instead of raising. The library's per-call path: the full
    :func:`supported` costs tens of microseconds a call. ``bufs``: (out, lse, stats) to write, as
    :func:`gluon_forward` would allocate them (contiguous, q's shape; float32 (B, Hq, Sq); float32
    (2, B, Hq, Sq)), or None to allocate."""
    got = _tma_inputs(q, k, v, layout)
    if got is None:
        return None
    Sk, rows = got
    return _launch(q, k, v, layout, scale, causal, _full_cfg(None, q.shape[3], Sk, causal), rows, bufs)


def _tma_inputs(q, k, v, layout: str):
    """(Sk, the TMA rows of q, k, v) of a call the caller found eligible, or None where a sequence is empty
    or :func:`tma_rows` refuses a tensor (the per-call checks of :func:`try_forward` and
    :func:`try_listed`)."""
    hd = 1 if layout == "bhsd" else 2
    Sq, Sk = q.shape[3 - hd], k.shape[3 - hd]
    if Sq < 1 or Sk < 1:
        return None
    rows = (tma_rows(q, layout), tma_rows(k, layout), tma_rows(v, layout))
    return None if None in rows else (Sk, rows)


def gluon_forward(q, k, v, layout: str, scale: float, causal: bool, cfg=None):
    """Attention forward on Hopper: (out in q's layout and shape, lse (B, Hq, Sq) float32, stats (2, B, Hq,
    Sq) float32 with stats[0] + stats[1] == m + log2(l) exactly).

    ``cfg`` = (BLOCK_N, NUM_STAGES, OVERLAP[, SPLIT[, PERSISTENT]]) or None for :func:`default_cfg`; SPLIT
    runs the two consumer warpgroups as two partitions instead of one 8-warp partition; PERSISTENT launches
    one CTA per multiprocessor, each taking work items in turn."""
    why = supported(q, k, v, layout, causal, cfg=cfg, scale=scale)
    if why is not None:
        raise ValueError(f"gluon_forward: {why}")
    Sk = k.shape[2 if layout == "bhsd" else 1]
    rows = (tma_rows(q, layout), tma_rows(k, layout), tma_rows(v, layout))
    return _launch(q, k, v, layout, scale, causal, _full_cfg(cfg, q.shape[3], Sk, causal), rows)


def try_listed(p, q, k, v, bufs):
    """The Gluon forward of a call whose only features are a mask carried as data and the causal / window
    flags (``runtime/capability.gluon_listed_eligible`` has judged the call): each query tile walks its
    lists of full and partial key tiles (``ops/ivlists.py``, built at this kernel's tiles), applying the
    mask's intervals and the flags to the partial ones only. None where the strides, the alignment or the
    lists do not fit (then the Triton kernel runs it)."""
    from attnkit.backends.triton.ops import common as c
    from attnkit.backends.triton.ops import ivlists

    layout = p.layout
    inputs = _tma_inputs(q, k, v, layout)
    if inputs is None:
        return None
    Sk, rows = inputs
    cfg = listed_cfg(Sk, bool(p.iv_skip))
    got = ivlists.lists(p, BLOCK_M, cfg[0])
    if got is None:
        return None
    lst, cnt = got
    sib, sih = c.iv_args(p, lst)[2:4]
    has_left, has_right, _, wr = p.window()
    if has_left:  # (capability.gluon_listed_eligible sends no left window bound here)
        return None
    listed = (lst, cnt, *ivlists.row_strides(lst), p.startend, sib, sih, wr)
    return _launch(q, k, v, layout, p.scale, p.causal, cfg, rows, bufs, listed, has_right)


def _launch(q, k, v, layout, scale, causal, cfg, rows, bufs=None, listed=None, has_right=False):
    """The launch; ``listed``: (lists, counts, their batch / head row strides, list length, intervals, their
    batch / head strides, right window bound) of :func:`try_listed`, ``has_right`` its HAS_RIGHT."""
    hd = 1 if layout == "bhsd" else 2
    sd = 3 - hd
    B, Hq, Sq, D = q.shape[0], q.shape[hd], q.shape[sd], q.shape[3]
    Hk, Sk = k.shape[hd], k.shape[sd]
    block_n, stages, overlap, split, persistent = cfg

    if bufs is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        stats = torch.empty((2, B, Hq, Sq), dtype=torch.float32, device=q.device)
    else:
        out, lse, stats = bufs
    so = out.stride()
    stride_ob, stride_oh, stride_os = (so[0], so[1], so[2]) if layout == "bhsd" else (so[0], so[2], so[1])

    q_desc = descriptor(q, rows[0], BLOCK_M)
    k_desc = descriptor(k, rows[1], block_n)
    v_desc = descriptor(v, rows[2], block_n)
    items = -(-Sq // BLOCK_M) * B * Hq
    grid = (min(items, _persistent_ctas(q.device)) if persistent else items,)
    _FWD_LAUNCH[grid](
        q_desc,
        k_desc,
        v_desc,
        out,
        lse,
        stats,
        stride_ob,
        stride_oh,
        stride_os,
        Hq,
        Hk,
        Hq // Hk,
        Sq,
        Sk,
        B * Hq,
        scale * LOG2E,
        *(listed if listed is not None else (lse, lse, 0, 0, 0, lse, 0, 0, 0)),
        BSHD=layout == "bshd",
        CAUSAL=bool(causal),
        LISTED=listed is not None,
        HAS_RIGHT=has_right,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        HEAD_D=D,
        NUM_STAGES=stages,
        OVERLAP=overlap,
        SPLIT=split,
        PERSISTENT=persistent,
        num_warps=4 if split else NUM_WARPS,
        maxnreg=MAXNREG,
    )
    return out, lse, stats


_FWD_LAUNCH = Launch(_attn_fwd_ws)  # the compiled kernel looked up without Triton's per-launch binding

__all__ = ["default_cfg", "descriptor", "gluon_forward", "supported", "tma_rows", "try_forward", "try_listed"]
