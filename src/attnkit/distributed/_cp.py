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
from attnkit.distributed._sharding import check_sharding, chunk_starts, chunks_per_rank, reorder_to_global
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


def _validate(q, k, v, layout, sharding, method, group, causal, window, mask):
    if layout not in _SEQ_DIM:
        raise AttentionInputError("layout", f"one of {tuple(_SEQ_DIM)} (thd: not yet)", repr(layout))
    check_sharding(sharding)
    if method not in METHODS:
        raise AttentionInputError("method", f"one of {METHODS}", repr(method))
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttentionInputError(name, f"a 4-D tensor in layout {layout!r}", got)
    _check_constraints(causal, window, mask)
    _comm.require_initialized()
    sd = _SEQ_DIM[layout]
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
    return sd


def _allgather(q, k, v, g, group):
    W, r = _comm.group_size(group), _comm.group_rank(group)
    sd = g["sd"]
    kf = reorder_to_global(_comm.AllGatherSeq.apply(k, group, sd), sd, W, g["sharding"])
    vf = reorder_to_global(_comm.AllGatherSeq.apply(v, group, sd), sd, W, g["sharding"])
    Sk = kf.shape[sd]
    q_chunks = _blocks.chunks(q, sd, chunk_starts(r, W, g["sharding"], g["cq"]), g["cq"])
    parts = []
    for qc, qo in q_chunks:
        end = min(max(qo + g["cq"] + g["Sk"] - g["Sq"], 0), Sk)  # the keys up to this chunk's last query
        mine = []
        for ko, n in ((0, end), (end, Sk - end)):
            if n > 0:
                res = _blocks.block(qc, qo, kf.narrow(sd, ko, n), vf.narrow(sd, ko, n), ko, g)
                if res is not None:
                    mine.append(res)
        parts.append(mine)
    return q_chunks, parts, kf, vf


def plan_call(q_local, k_local, W, layout, sharding, causal, window, softcap, scale, mask, backend) -> dict:
    """What every block of one call needs: lengths, chunk sizes, the global window and the mask parts."""
    sd, per = _SEQ_DIM[layout], chunks_per_rank(sharding)
    L, R, rest = _blocks.split_mask(mask, causal, window)
    return {
        "sd": sd,
        "layout": layout,
        "sharding": sharding,
        "L": L,
        "R": R,
        "rest": rest,
        "cq": q_local.shape[sd] // per,
        "ck": k_local.shape[sd] // per,
        "Sq": q_local.shape[sd] * W,
        "Sk": k_local.shape[sd] * W,
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
):
    """Attention over a sequence whose positions are sharded across ``group`` (API.md §5).

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

    Returns:
        ``out_local`` of shape (B, Sq/W, Hq, Dv) / (B, Hq, Sq/W, Dv) in this rank's order of positions, and
        ``lse_local`` with ``return_lse``.
    """
    sd = _validate(q_local, k_local, v_local, layout, sharding, method, group, causal, window, mask)
    W = _comm.group_size(group)
    g = plan_call(q_local, k_local, W, layout, sharding, causal, window, softcap, scale, mask, backend)
    if method == "auto":
        method = "ring" if all(_blocks.is_data(mk) for mk in g["rest"]) else "allgather"
    if method == "ring":
        out, lse = RingAttention.apply(q_local, k_local, v_local, g, group)
    else:
        q_chunks, parts, kf, vf = _allgather(q_local, k_local, v_local, g, group)
        out, lse = _blocks.finish(q_chunks, parts, v_local.shape[-1], layout, sd)
        if not any(parts) and torch.is_grad_enabled():
            out = _comm.Tie.apply(out, q_local, kf, vf)
    return (out, lse) if return_lse else out
