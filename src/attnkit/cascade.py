"""Shared-prefix (cascade) decoding: ``cascade_attention``.

Many rows that share one prompt (parallel sampling, beam search, many questions about one document) keep
the prompt's keys once, and each row only its own continuation in a KV cache. Row b's logical keys are
``[shared prefix (S_p keys) | its own cache (cache_seqlens[b] + Sq_new keys)]``. Attention over them is
computed in two parts and merged exactly (``attnkit.merge_attention``):

1. the prefix, read once for all rows: every row's queries folded into the query tokens of one row,
   ``(1, B * Sq, Hq, D)`` against a cache ``(1, S_p, Hk, D)`` that the row fills, through
   :func:`attnkit.attention_with_kvcache` (on the split-KV decode kernel the query heads of a KV head share
   its tiles and the prefix's keys are split over enough programs to fill the GPU);
2. the suffixes, per row: :func:`attnkit.attention_with_kvcache` on the rows' own (contiguous or paged)
   caches, with in-place append of ``k_new``/``v_new``.

Positions: query i of row b stands at ``S_p + Sk_b - Sq + i`` (Sk_b = the row's suffix length after the
append), so ``causal`` sees the whole prefix and its suffix bottom-right aligned, exactly as plain
decoding over the concatenated keys does, as long as ``Sk_b >= Sq - 1`` (checked with ``validate``).
Windows and ALiBi depend on each row's own distance to the prefix and are not folded: decode those with
``attention_with_kvcache`` on the concatenated cache.
"""

from __future__ import annotations

import torch

from attnkit.errors import AttentionInputError
from attnkit.kvcache import attention_with_kvcache
from attnkit.merge import merge_attention


def cascade_attention(
    q,
    shared_k,
    shared_v,
    k_cache,
    v_cache,
    *,
    cache_seqlens,
    k_new=None,
    v_new=None,
    block_table=None,
    causal=False,
    softcap=None,
    scale=None,
    return_lse=False,
    backend="auto",
    validate=True,
):
    """Decode rows that share one prefix: the prefix read once, each row's suffix from its cache.

    Args:
        q: (B, Sq, Hq, D) new queries.
        shared_k, shared_v: (S_p, Hk, D|Dv): the shared prefix's keys and values (logical positions
            0 .. S_p - 1 of every row).
        k_cache, v_cache, cache_seqlens, k_new, v_new, block_table: each row's own keys after the prefix,
            exactly as :func:`attnkit.attention_with_kvcache` takes them (contiguous (B, S_max, Hk, D|Dv) or
            paged (num_pages, page_size, Hk, D|Dv) with block_table int32 (B, max_pages); cache_seqlens
            int32 (B,) suffix lengths before the append; k_new/v_new appended in place).
        causal, softcap, scale: as in :func:`attnkit.attention`, over the concatenated keys.
        return_lse: also return the float32 lse (B, Hq, Sq) over all of a row's keys.
        backend: ``"auto"``, ``"triton"`` or ``"reference"``: used for both parts.
        validate: as in :func:`attnkit.attention_with_kvcache`; with ``causal`` also checks that every row
            holds at least ``Sq - 1`` suffix keys (so that each query sees the whole prefix).

    Returns:
        ``out`` (B, Sq, Hq, Dv) in q's dtype (and ``lse`` (B, Hq, Sq) with ``return_lse``): equal to
        ``attention_with_kvcache`` over ``[shared prefix | row's cache]``.
    """
    for name, t in (("shared_k", shared_k), ("shared_v", shared_v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise AttentionInputError(name, "a 3-D tensor (S_p, Hk, D|Dv)", _desc(t))
        if isinstance(q, torch.Tensor) and (t.dtype != q.dtype or t.device != q.device):
            raise AttentionInputError(name, f"dtype {q.dtype} on {q.device} (those of q)", _desc(t))
    if shared_v.shape[:2] != shared_k.shape[:2]:
        raise AttentionInputError("shared_v", f"{tuple(shared_k.shape[:2])} leading sizes", _desc(shared_v))
    if isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and shared_k.shape[1:] != k_cache.shape[2:]:
        raise AttentionInputError(
            "shared_k", f"(S_p, {k_cache.shape[2]}, {k_cache.shape[3]}) (heads of k_cache)", _desc(shared_k)
        )
    if isinstance(v_cache, torch.Tensor) and v_cache.dim() == 4 and shared_v.shape[1:] != v_cache.shape[2:]:
        raise AttentionInputError(
            "shared_v", f"(S_p, {v_cache.shape[2]}, {v_cache.shape[3]}) (heads of v_cache)", _desc(shared_v)
        )
    if validate and causal and isinstance(cache_seqlens, torch.Tensor) and isinstance(q, torch.Tensor):
        Sq_new = 0 if k_new is None else k_new.shape[1]
        short = int(((cache_seqlens.long() + Sq_new) < q.shape[1] - 1).sum()) if q.dim() == 4 else 0
        if short:
            raise AttentionInputError(
                "cache_seqlens",
                f"suffix lengths (after the append) >= Sq - 1 = {q.shape[1] - 1} with causal",
                f"{short} rows shorter",
                "a causal query before the end of the prefix: use attention_with_kvcache on the whole cache",
            )
    flags = dict(causal=causal, softcap=softcap, scale=scale, return_lse=True, backend=backend)
    suf_out, suf_lse = attention_with_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens=cache_seqlens,
        k_new=k_new,
        v_new=v_new,
        block_table=block_table,
        validate=validate,
        **flags,
    )
    B, Sq, Hq, D = q.shape
    S_p = shared_k.shape[0]
    if S_p == 0:
        return (suf_out, suf_lse) if return_lse else suf_out
    # the prefix: every row's queries as the query tokens of one row (a view of q) against a cache that one
    # row fills, on the same path as the suffixes. On the decode kernel the GQA heads of a KV head share its
    # tiles and the prefix's keys are split over programs, so the grid fills the GPU and each tile of 64
    # packed rows reads the prefix once.
    lens = torch.full((1,), S_p, dtype=torch.int32, device=q.device)
    flags.update(causal=False, validate=False)  # (lengths of our own making: nothing to check)
    pre_out, pre_lse = attention_with_kvcache(
        q.reshape(1, B * Sq, Hq, D), shared_k.unsqueeze(0), shared_v.unsqueeze(0), cache_seqlens=lens, **flags
    )
    pre_out = pre_out.reshape(B, Sq, Hq, pre_out.shape[-1])
    pre_lse = pre_lse.reshape(Hq, B, Sq).transpose(0, 1)  # (1, Hq, B * Sq) -> (B, Hq, Sq)
    out, lse = merge_attention([pre_out, suf_out], [pre_lse, suf_lse], layout="bshd")
    return (out, lse) if return_lse else out


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__}"


__all__ = ["cascade_attention"]
