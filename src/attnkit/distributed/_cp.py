"""``context_parallel_attention``: attention over a sequence sharded across the ranks of a process group.

Two methods, both ending in ``attnkit.merge_attention`` of per-block ``(out, lse)``:

- ``ring`` (``_ring.py``): W steps; at step t each rank holds the K/V shard of rank r - t, posts the exchange
  that moves it on to rank r + 1 (``batch_isend_irecv``), computes its queries against it, then waits.
  Blocks that causal or window masking leave empty are skipped. Backward is a custom autograd function that
  runs the ring again, recomputing each block and passing dK/dV accumulators along, home to their owners.
- ``allgather`` (Llama 3 style): one all-gather of K and V (backward: a reduce-scatter of dK/dV), then each
  local query chunk attends to the keys up to its own end in one call (and to the rest in a second call when
  the constraints let later keys in). Chosen for masks given as predicates (a per-block predicate would mean
  one generated kernel per block), or forced with ``method="allgather"``.
"""

from __future__ import annotations

import torch

from attnkit.distributed import _blocks, _comm
from attnkit.distributed._ring import RingAttention
from attnkit.distributed._sharding import (
    check_cu_seqlens,
    check_sharding,
    chunks_per_rank,
    layout_chunks,
    reorder_to_global,
)
from attnkit.errors import AttentionInputError

METHODS = ("auto", "ring", "allgather")
_SEQ_DIM = {"bhsd": 2, "bshd": 1}


def _check_constraints(causal, window, mask):
    """The arguments this module reads itself (the rest are checked by each block's ``attention`` call)."""
    if not isinstance(causal, bool):
        raise AttentionInputError("causal", "a bool", repr(causal))
    if window is not None and (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)
    ):
        raise AttentionInputError(
            "window", "None or (left, right) with ints >= -1 (-1 = unbounded)", repr(window)
        )
    if mask is not None and not callable(mask) and not hasattr(mask, "mask_mod"):
        raise AttentionInputError(
            "mask",
            "None, an attnkit.masks.Mask, a mask_mod callable or a torch BlockMask",
            type(mask).__name__,
        )


def _validate(q, k, v, layout, sharding, method, group, causal, window, mask, cu_seqlens):
    if layout not in (*_SEQ_DIM, "thd"):
        raise AttentionInputError("layout", f"one of {(*_SEQ_DIM, 'thd')}", repr(layout))
    check_sharding(sharding)
    if method not in METHODS:
        raise AttentionInputError("method", f"one of {METHODS}", repr(method))
    dims = 3 if layout == "thd" else 4
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            got = f"{t.dim()}-D tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttentionInputError(name, f"a {dims}-D tensor in layout {layout!r}", got)
    _check_constraints(causal, window, mask)
    if layout == "thd" and mask is not None:
        raise AttentionInputError("mask", "None for layout='thd' (causal and window work per document)", mask)
    if (layout == "thd") != (cu_seqlens is not None):
        raise AttentionInputError(
            "cu_seqlens",
            "the int (N+1,) offsets of the whole packed batch for layout='thd', else None",
            "None" if cu_seqlens is None else "a tensor",
        )
    _comm.require_initialized()
    sd = 0 if layout == "thd" else _SEQ_DIM[layout]
    if k.shape[sd] != v.shape[sd]:
        raise AttentionInputError("v_local", f"{k.shape[sd]} positions (as k_local)", v.shape[sd])
    per = chunks_per_rank(sharding)
    # One small collective, so that every rank sees the same lengths and raises the same error.
    lens = _comm.all_gather_ints([q.shape[sd], k.shape[sd]], group, q.device)
    if any(x != lens[0] for x in lens) or lens[0][0] % per or lens[0][1] % per or 0 in lens[0]:
        raise AttentionInputError(
            "q_local",
            f"shards of one length on every rank (q and k/v each), positive and divisible by {per} "
            f"for {sharding!r}",
            f"(q, k) lengths by rank {lens}",
            hint="pad the global sequence to a multiple of W (contiguous) or 2W (zigzag); akd.shard cuts it",
        )
    if cu_seqlens is not None:
        if q.shape[0] != k.shape[0]:
            raise AttentionInputError("k_local", f"{q.shape[0]} tokens (as q_local) for thd", k.shape[0])
        check_cu_seqlens(cu_seqlens, _comm.group_size(group), sharding, q.shape[0] * _comm.group_size(group))


def _allgather(q, k, v, g, group):
    W, r = _comm.group_size(group), _comm.group_rank(group)
    sd, cu = g["sd"], g["cu"]
    kf = reorder_to_global(_comm.AllGatherSeq.apply(k, group, sd), sd, W, g["sharding"], cu)
    vf = reorder_to_global(_comm.AllGatherSeq.apply(v, group, sd), sd, W, g["sharding"], cu)
    Sk = kf.shape[sd]
    q_chunks = _blocks.chunks(q, sd, g["qd"](r))
    parts = []
    for qc, qo, doc, _ in q_chunks:
        lo, hi = (0, Sk) if doc is None else (int(cu[doc]), int(cu[doc + 1]))
        end = min(max(qo + qc.shape[sd] + g["Sk"] - g["Sq"], lo), hi)  # the keys up to the chunk's last query
        mine = []
        for ko, n in ((lo, end - lo), (end, hi - end)):
            if n > 0:
                res = _blocks.block(qc, qo, kf.narrow(sd, ko, n), vf.narrow(sd, ko, n), ko, g, doc, doc)
                if res is not None:
                    mine.append(res)
        parts.append(mine)
    return q_chunks, parts, kf, vf


def plan_call(
    q_local, k_local, W, layout, sharding, causal, window, softcap, scale, mask, backend, cu_seqlens=None
) -> dict:
    """What every block of one call needs: lengths, each rank's pieces, the global window, the mask parts.
    ``layout`` is ``bshd`` or ``bhsd`` here (thd arrives as bshd with B = 1 and ``cu_seqlens``)."""
    sd = _SEQ_DIM[layout]
    L, R, rest = _blocks.split_mask(mask, causal, window)
    Sq, Sk = q_local.shape[sd] * W, k_local.shape[sd] * W
    cu = None if cu_seqlens is None else cu_seqlens.cpu()
    return {
        "sd": sd,
        "layout": layout,
        "sharding": sharding,
        "L": L,
        "R": R,
        "rest": rest,
        "cu": cu,
        "qd": lambda r: layout_chunks(r, W, sharding, Sq, cu),
        "kd": lambda r: layout_chunks(r, W, sharding, Sk, cu),
        "Sq": Sq,
        "Sk": Sk,
        "opts": {"softcap": softcap, "scale": scale, "backend": backend},
    }


def context_parallel_attention(
    q_local,
    k_local,
    v_local,
    *,
    group=None,
    layout="bshd",
    sharding="zigzag",
    causal=False,
    window=None,
    softcap=None,
    scale=None,
    mask=None,
    return_lse=False,
    backend="auto",
    method="auto",
    cu_seqlens=None,
):
    """Attention over a sequence whose positions are sharded across ``group`` (docs/api.md §5).

    Every rank calls this with its own shards; the result equals ``attnkit.attention`` on the whole tensors,
    forward and backward, sharded the same way (``out_local = shard(attention(q, k, v, ...))``).

    Args:
        q_local: (B, Sq/W, Hq, D) for ``bshd`` or (B, Hq, Sq/W, D) for ``bhsd``: this rank's queries.
        k_local: (B, Sk/W, Hk, D) / (B, Hk, Sk/W, D); Hq a multiple of Hk (GQA/MQA).
        v_local: (B, Sk/W, Hk, Dv) / (B, Hk, Sk/W, Dv).
        group: a torch.distributed process group (default: the world); W is its size.
        layout: ``"bshd"`` or ``"bhsd"`` (sequence dim 1 or 2).
        sharding: ``"zigzag"`` (rank r holds chunks r and 2W-1-r of 2W) or ``"contiguous"`` (chunk r of W).
        causal, window, softcap, scale, mask, backend: as in ``attnkit.attention``, with positions GLOBAL:
            causal and windows align the whole sequences (bottom-right, as in §1); a ``mask`` is evaluated at
            global (query, key) indices; ``masks.document(doc_ids)`` takes the doc ids of the WHOLE sequence
            ((S,) or (B, S), identical on every rank) and is sliced per block, never densified.
        return_lse: also return this rank's lse, (B, Hq, Sq/W) float32.
        method: ``"auto"``, ``"ring"`` or ``"allgather"`` (see the module docstring).
        cu_seqlens: for ``layout="thd"`` (extends docs/api.md §5): int (N+1,), the offsets of the WHOLE
            packed batch, each document's length a multiple of W (2W for zigzag); q/k/v_local are (T/W, H, D)
            as ``shard(x, 0, cu_seqlens=cu_seqlens)`` cuts them (every document split evenly over the ranks).
            Documents never attend across each other; causal and windows act per document; lse (H, T/W).

    Returns:
        ``out_local`` of shape (B, Sq/W, Hq, Dv) / (B, Hq, Sq/W, Dv) in this rank's order of positions, and
        ``lse_local`` with ``return_lse``.
    """
    _validate(q_local, k_local, v_local, layout, sharding, method, group, causal, window, mask, cu_seqlens)
    thd = layout == "thd"
    if thd:  # (T/W, H, D) -> (1, T/W, H, D): one packed row, documents from cu_seqlens
        q_local, k_local, v_local = (t.unsqueeze(0) for t in (q_local, k_local, v_local))
        layout = "bshd"
    sd = _SEQ_DIM[layout]
    W = _comm.group_size(group)
    g = plan_call(
        q_local, k_local, W, layout, sharding, causal, window, softcap, scale, mask, backend, cu_seqlens
    )
    if method == "auto":
        method = "ring" if all(_blocks.is_data(mk) for mk in g["rest"]) else "allgather"
    if method == "ring":
        out, lse = RingAttention.apply(q_local, k_local, v_local, g, group)
    else:
        q_chunks, parts, kf, vf = _allgather(q_local, k_local, v_local, g, group)
        out, lse = _blocks.finish(q_chunks, parts, v_local.shape[-1], layout, sd)
        if not any(parts) and torch.is_grad_enabled():
            out = _comm.Tie.apply(out, q_local, kf, vf)
    if thd:
        out, lse = out.squeeze(0), lse.squeeze(0)  # (T/W, H, Dv), (H, T/W)
    return (out, lse) if return_lse else out
