"""``context_parallel_attention``: attention over a sequence sharded across the ranks of a process group.

Two methods, both ending in ``attnkit.merge_attention`` of per-block ``(out, lse)``:

- ``ring``: W steps. At step t each rank holds the K/V shard of rank r - t; it first posts the exchange that
  moves that block on to rank r + 1 (``batch_isend_irecv``), then computes its queries against the block,
  then waits. Blocks that causal or window masking leave empty are skipped. Backward runs through autograd:
  each ring step's backward sends the block's dK/dV back to the rank it came from (the ring in reverse), so
  the gradients reach their owners.
- ``allgather`` (Llama 3 style): one all-gather of K and V (backward: a reduce-scatter of dK/dV), then each
  local query chunk attends to the keys up to its own end in one call (and to the rest in a second call when
  the constraints let later keys in). Chosen for masks given as predicates (a per-block predicate would mean
  one generated kernel per block), or forced with ``method="allgather"``.
"""

from __future__ import annotations

import torch

from attnkit.distributed import _blocks, _comm
from attnkit.distributed._sharding import check_sharding, chunk_starts, chunks_per_rank, reorder_to_global
from attnkit.errors import AttentionInputError
from attnkit.merge import merge_attention

METHODS = ("auto", "ring", "allgather")
_SEQ_DIM = {"bhsd": 2, "bshd": 1}


def _validate(q, k, v, layout, sharding, method, group):
    if layout not in _SEQ_DIM:
        raise AttentionInputError("layout", f"one of {tuple(_SEQ_DIM)} (thd: not yet)", repr(layout))
    check_sharding(sharding)
    if method not in METHODS:
        raise AttentionInputError("method", f"one of {METHODS}", repr(method))
    for name, t in (("q_local", q), ("k_local", k), ("v_local", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"{t.dim()}-D tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise AttentionInputError(name, f"a 4-D tensor in layout {layout!r}", got)
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


def _chunks(x, sd, starts, c):
    return [(x.narrow(sd, i * c, c), s) for i, s in enumerate(starts)]


def _run_ring(q, k, v, g, group):
    W, r = _comm.group_size(group), _comm.group_rank(group)
    q_chunks = _chunks(q, g["sd"], chunk_starts(r, W, g["sharding"], g["cq"]), g["cq"])
    parts = [[] for _ in q_chunks]
    kk, vv, src = k, v, r
    for t in range(W):
        pending = None
        if t < W - 1:
            pending = _comm.Pending()
            nk, nv = _comm.RingShift.apply(pending, group, kk, vv)
        used = False
        kv_chunks = list(
            zip(
                _chunks(kk, g["sd"], chunk_starts(src, W, g["sharding"], g["ck"]), g["ck"]),
                _chunks(vv, g["sd"], chunk_starts(src, W, g["sharding"], g["ck"]), g["ck"]),
            )
        )
        for qi, (qc, qo) in enumerate(q_chunks):
            for (kc, ko), (vc, _) in kv_chunks:
                res = _block(qc, qo, kc, vc, ko, g)
                if res is not None:
                    parts[qi].append(res)
                    used = True
        if not used:
            g["tie"].extend([kk, vv])
        if pending is not None:
            pending.wait()
            kk, vv, src = nk, nv, (src - 1) % W
    return q_chunks, parts


def _run_allgather(q, k, v, g, group):
    W, r = _comm.group_size(group), _comm.group_rank(group)
    sd = g["sd"]
    kf = reorder_to_global(_comm.AllGatherSeq.apply(k, group, sd), sd, W, g["sharding"])
    vf = reorder_to_global(_comm.AllGatherSeq.apply(v, group, sd), sd, W, g["sharding"])
    Sk = kf.shape[sd]
    q_chunks = _chunks(q, sd, chunk_starts(r, W, g["sharding"], g["cq"]), g["cq"])
    parts = []
    for qc, qo in q_chunks:
        end = min(max(qo + g["cq"] + g["Sk"] - g["Sq"], 0), Sk)  # the keys up to this chunk's last query
        mine = []
        for ko, n in ((0, end), (end, Sk - end)):
            if n > 0:
                res = _block(qc, qo, kf.narrow(sd, ko, n), vf.narrow(sd, ko, n), ko, g)
                if res is not None:
                    mine.append(res)
        parts.append(mine)
    return q_chunks, parts


def _block(qc, qo, kc, vc, ko, g):
    m, n = qc.shape[g["sd"]], kc.shape[g["sd"]]
    plan = _blocks.plan_block(qo + g["Sk"] - g["Sq"], m, ko, n, g["L"], g["R"])
    if plan is None:
        return None
    return _blocks.attend_block(
        qc,
        kc,
        vc,
        plan,
        g["rest"],
        qo=qo,
        ko=ko,
        Sq=g["Sq"],
        Sk=g["Sk"],
        seq_dim=g["sd"],
        layout=g["layout"],
        opts=g["opts"],
    )


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
    sd = _validate(q_local, k_local, v_local, layout, sharding, method, group)
    W = _comm.group_size(group)
    per = chunks_per_rank(sharding)
    L, R, rest = _blocks.split_mask(mask, causal, window)
    if method == "auto":
        method = "ring" if all(_blocks.is_data(mk) for mk in rest) else "allgather"
    g = {
        "sd": sd,
        "layout": layout,
        "sharding": sharding,
        "L": L,
        "R": R,
        "rest": rest,
        "tie": [],
        "cq": q_local.shape[sd] // per,
        "ck": k_local.shape[sd] // per,
        "Sq": q_local.shape[sd] * W,
        "Sk": k_local.shape[sd] * W,
        "opts": {"softcap": softcap, "scale": scale, "backend": backend},
    }
    run = _run_ring if method == "ring" else _run_allgather
    q_chunks, parts = run(q_local, k_local, v_local, g, group)
    outs, lses = [], []
    for (qc, _), p in zip(q_chunks, parts):
        if p:
            o, s = merge_attention([x[0] for x in p], [x[1] for x in p], layout=layout)
        else:  # no key visible to any query of this chunk
            shape = list(qc.shape)
            shape[-1] = v_local.shape[-1]
            o = qc.new_zeros(shape)
            s = torch.full(_lse_shape(qc, layout), float("-inf"), device=qc.device)
        outs.append(o)
        lses.append(s)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=sd)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)
    if g["tie"]:
        out = _comm.Tie.apply(out, *g["tie"])
    return (out, lse) if return_lse else out


def _lse_shape(qc, layout):
    B = qc.shape[0]
    return (B, qc.shape[2], qc.shape[1]) if layout == "bshd" else (B, qc.shape[1], qc.shape[2])
