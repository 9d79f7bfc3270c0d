"""Host side of the split-KV decode kernel (``kernels/decode.py``): grid, number of splits, combine.

``attnkit::decode_fwd`` is a ``torch.library`` custom op (fake implementation beside it; forward only:
decoding needs no gradient), so ``torch.compile`` traces through it. Eager calls take :func:`decode_fwd`
directly. Nothing here reads a device value: the grid and the number of splits come from shapes (the
cache capacity, never ``cache_seqlens``), so a decode step can be captured in a CUDA graph.

Tensor conventions: q (B, Sq, Hq, D); caches (B, S_max, Hk, D) or paged (num_pages, page_size, Hk, D),
unit stride on the head dim; ``cache_seqlens`` int32 (B,); ``block_table`` int32 (B, max_pages). Returns
out (B, Sq, Hq, Dv) in q's dtype, or (B, Hq, Sq, Dv) with ``bhsd_out``, and lse float32 (B, Hq, Sq).
"""

from __future__ import annotations

import os

import torch

from attnkit.backends.triton.ops.combine import combine_into
from attnkit.backends.triton.runtime import capability as _cap
from attnkit.backends.triton.runtime import launch as _launch

Tensor = torch.Tensor
POISON = False  # tests: fill outputs with NaN before launch, so unwritten elements show
MAX_SPLITS = 128
_KERNEL = None
_SMS: dict[int, int] = {}


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from attnkit.backends.triton.kernels.decode import decode_fwd as _jit

        _KERNEL = _launch.Launch(_jit)
    return _KERNEL


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 under the interpreter, so tests see several splits)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


_TUNE: list = []


def _tune() -> dict:
    """GPU tuning knobs, read once from ``ATTNKIT_DECODE_TUNE="block_n=64,warps=4,stages=2,waves=2"``
    (any subset; the values here are defaults, not measured optima: `attnkit bench decode` decides)."""
    if not _TUNE:
        cfg = {"block_n": 0, "warps": 4, "stages": 2, "waves": 2}
        for part in os.environ.get("ATTNKIT_DECODE_TUNE", "").split(","):
            if "=" in part:
                key, val = part.split("=", 1)
                if key.strip() in cfg:
                    cfg[key.strip()] = int(val)
        _TUNE.append(cfg)
    return _TUNE[0]


def blocks(Sq: int, group: int, D: int, Dv: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): a tile of the Sq * group packed rows, and keys per loop step."""
    if _cap.interpreting():
        return 16, 16
    block_m = min(64, _pow2(Sq * group))
    block_n = _tune()["block_n"] or (64 if max(D, Dv) <= 128 else 32)
    return block_m, block_n


def num_splits(
    batch: int, hk: int, m_blocks: int, capacity: int, block_n: int, sms: int, waves: int = 2
) -> int:
    """Splits of the key range so that the grid fills the GPU (FlashAttention's rule, simplified): none
    when the (batch, KV head, row tile) programs already fill ~``waves`` waves of the SMs; otherwise
    enough to reach that, keeping at least 4 key blocks a split, at most MAX_SPLITS. Host values only."""
    work = batch * hk * m_blocks
    target = waves * sms
    if work * 10 >= target * 8:
        return 1
    n_blocks = _cdiv(capacity, block_n)
    return max(1, min(_cdiv(target, work), n_blocks // 4, MAX_SPLITS))


def _new(shape, device, dtype) -> Tensor:
    t = torch.empty(shape, device=device, dtype=dtype)
    if POISON:
        t.fill_(float("nan"))
    return t


def decode_fwd(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Tensor | None,
    alibi_slopes: Tensor | None,
    sq_new: int,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    splits: int = 0,
    bhsd_out: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention of q against the first ``cache_seqlens[b] + sq_new`` keys of each row (see the module
    docstring for shapes). ``splits``: 0 picks :func:`num_splits`; tests force other values."""
    B, Sq, Hq, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[3]
    group = Hq // Hk
    dev = q.device
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads these with unit inner strides
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.contiguous()
    paged = block_table is not None
    if paged:
        block_table = block_table.contiguous()
        num_pages, ps = k_cache.shape[0], k_cache.shape[1]
        cap = block_table.shape[1] * ps
    else:
        num_pages, ps = 1, 1
        cap = k_cache.shape[1]
    if bhsd_out:
        out_base = _new((B, Hq, Sq, Dv), dev, q.dtype)
        out = out_base.transpose(1, 2)  # (B, Sq, Hq, Dv) view
    else:
        out_base = out = _new((B, Sq, Hq, Dv), dev, q.dtype)
    lse = _new((B, Hq, Sq), dev, torch.float32)
    if B * Sq * Hq == 0:
        return out_base, lse
    if cap == 0 or num_pages == 0 or (paged and block_table.shape[0] == 0):
        out.zero_()
        lse.fill_(float("-inf"))
        return out_base, lse

    block_m, block_n = blocks(Sq, group, D, Dv)
    m_blocks = _cdiv(Sq * group, block_m)
    if splits <= 0:
        waves = 2 if _cap.interpreting() else _tune()["waves"]
        splits = num_splits(B, Hk, m_blocks, cap, block_n, sm_count(dev), waves)
    chunk = _cdiv(_cdiv(cap, splits), block_n) * block_n
    splits = _cdiv(cap, chunk)
    if splits == 1:
        part, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        part = _new((splits, B, Sq, Hq, Dv), dev, torch.float32)
        part_lse = _new((splits, B, Hq, Sq), dev, torch.float32)
    has_left = window_left >= 0
    has_right = causal or window_right >= 0
    win_right = 0 if causal else max(window_right, 0)
    table = block_table if paged else cache_seqlens
    slopes = alibi_slopes if alibi_slopes is not None else lse
    stride_ab = 0 if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes.stride(0)
    _kernel()[(splits, B * Hk, m_blocks)](
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        table,
        slopes,
        part,
        part_lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        table.stride(0),
        stride_ab,
        *part.stride()[:4],
        *part_lse.stride(),
        Hk,
        Sq,
        int(sq_new),
        cap,
        ps,
        num_pages,
        chunk,
        float(scale),
        float(softcap or 1.0),
        max(window_left, 0),
        win_right,
        GROUP=group,
        D=D,
        DV=Dv,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=_pow2(D),
        BLOCK_DV=_pow2(Dv),
        PAGED=paged,
        HAS_LEFT=has_left,
        HAS_RIGHT=has_right,
        SOFTCAP=bool(softcap),
        HAS_ALIBI=alibi_slopes is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4 if _cap.interpreting() else _tune()["warps"],
        num_stages=2 if _cap.interpreting() else _tune()["stages"],
    )
    if splits > 1:
        # partials (P, B, Sq, Hq, Dv) -> rows (b, h, i)
        combine_into(part.transpose(2, 3), part_lse, out.transpose(1, 2), lse)
    return out_base, lse


_op = torch.library.custom_op("attnkit::decode_fwd", mutates_args=())(decode_fwd)


@_op.register_fake
def _(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    block_table,
    alibi_slopes,
    sq_new,
    scale,
    causal,
    window_left,
    window_right,
    softcap,
    splits=0,
    bhsd_out=False,
):
    B, Sq, Hq, _ = q.shape
    Dv = v_cache.shape[3]
    shape = (B, Hq, Sq, Dv) if bhsd_out else (B, Sq, Hq, Dv)
    return q.new_empty(shape), q.new_empty((B, Hq, Sq), dtype=torch.float32)


def decode(*args, **kwargs) -> tuple[Tensor, Tensor]:
    """:func:`decode_fwd` eagerly, the custom op under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return _op(*args, **kwargs)
    return decode_fwd(*args, **kwargs)
