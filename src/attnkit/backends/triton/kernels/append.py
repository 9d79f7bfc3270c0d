"""Append kernel, pure ``@triton.jit``: write the new tokens' keys and values into a KV cache, in place.

One program = BLOCK_T new tokens of one batch row ``b`` and one KV head. Token ``t`` of row ``b`` goes to
logical position ``cache_seqlens[b] + t``, addressed as the decode kernel reads it (``_key_slots``: the
position clamped into the capacity, a paged cache's page id clamped into the pool), so a poisoned length
or table writes into the cache tensors, never outside them. Same result as ``index_put_`` on those
clamped positions (``kvcache._append``, the path of the other backends), in one launch.
"""

import triton
import triton.language as tl

from attnkit.backends.triton.kernels.decode import _key_slots


@triton.jit
def append_kv(
    KN,  # (B, Sq_new, Hk, D) new keys
    VN,  # (B, Sq_new, Hk, Dv) new values
    K,  # (B, S_max, Hk, D) contiguous, or (num_pages, PS, Hk, D) paged: written
    V,  # (B, S_max, Hk, Dv) or (num_pages, PS, Hk, Dv): written
    Seqlens,  # int32 (B,): keys in the cache before the new ones
    Table,  # int32 (B, max_pages) (paged; any int32 tensor otherwise)
    stride_knb,
    stride_kns,
    stride_knh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_k0,
    stride_k1,
    stride_k2,
    stride_v0,
    stride_v1,
    stride_v2,
    stride_tb,
    sq_new,
    cap,  # logical capacity of a row (S_max, or max_pages * PS)
    ps,
    num_pages,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGED: tl.constexpr,
):
    b = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(2)
    t_ok = t < sq_new
    j = tl.load(Seqlens + b) + t  # logical positions (clamped in _key_slots)
    d0, d1 = _key_slots(Table, stride_tb, b, j, cap, ps, num_pages, PAGED)
    k_rows = d0 * stride_k0 + d1 * stride_k1
    v_rows = d0 * stride_v0 + d1 * stride_v1

    t64 = t[:, None].to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    src = KN + b.to(tl.int64) * stride_knb + t64 * stride_kns + h * stride_knh + d[None, :]
    m = t_ok[:, None] & (d[None, :] < D)
    x = tl.load(src, mask=m, other=0.0)
    tl.store(K + k_rows[:, None] + h * stride_k2 + d[None, :], x, mask=m)

    dv = tl.arange(0, BLOCK_DV)
    src = VN + b.to(tl.int64) * stride_vnb + t64 * stride_vns + h * stride_vnh + dv[None, :]
    m = t_ok[:, None] & (dv[None, :] < DV)
    x = tl.load(src, mask=m, other=0.0)
    tl.store(V + v_rows[:, None] + h * stride_v2 + dv[None, :], x, mask=m)
