"""The ring method: K/V blocks travel round the group; a custom autograd function runs it in reverse.

Forward (W steps, no autograd graph): at step t rank r holds the K/V shard of rank r - t. It posts the
exchange that passes the block on to rank r + 1 (``batch_isend_irecv``) before computing its queries against
the block, and waits after. Each query chunk's blocks are merged with ``merge_attention``; only the local
shards, out and lse are saved.

Backward (W steps again): the K/V blocks travel the same way, each with an accumulator of its dK/dV. At
step t a rank recomputes every non-empty block of its queries against the block it holds (the backend's own
forward and backward, through autograd), adds dQ locally, adds the block's dK/dV to the accumulator it
received from rank r - 1 and passes it on to rank r + 1; after the last step the accumulator of each block
arrives at its owner. Both exchanges are posted before the compute they overlap with. Per block, the
gradients of the merged result are (w = exp(lse_block - lse), rowwise)::

    d out_block = w * d out          d lse_block = w * (<d out, out_block - out> + d lse)
"""

from __future__ import annotations

import torch

from attnkit.distributed import _blocks, _comm
from attnkit.merge import _lse_view

_KV, _ACC = 0, 1  # p2p tags: K/V blocks and dK/dV accumulators


def _kv_chunks(kk, vv, src, g):
    pieces = g["kd"](src)
    return list(zip(_blocks.chunks(kk, g["sd"], pieces), _blocks.chunks(vv, g["sd"], pieces)))


def _post(group, send, recv, tag):
    """Send ``send`` to rank r + 1 and receive ``recv`` from rank r - 1; return the requests."""
    W, r = _comm.group_size(group), _comm.group_rank(group)
    return _comm.exchange(group, send, (r + 1) % W, recv, (r - 1) % W, tag=tag)


def _wait(reqs):
    for q in reqs or ():
        q.wait()


def _forward(q, k, v, g, group):
    W, r = _comm.group_size(group), _comm.group_rank(group)
    q_chunks = _blocks.chunks(q, g["sd"], g["qd"](r))
    parts = [[] for _ in q_chunks]
    kk, vv, src = k, v, r
    for t in range(W):
        reqs = None
        if t < W - 1:
            nk, nv = torch.empty_like(kk), torch.empty_like(vv)
            reqs = _post(group, [kk, vv], [nk, nv], _KV)
        for qi, (qc, qo, qdoc, _) in enumerate(q_chunks):
            for (kc, ko, kdoc, _), (vc, *_) in _kv_chunks(kk, vv, src, g):
                res = _blocks.block(qc, qo, kc, vc, ko, g, qdoc, kdoc)
                if res is not None:
                    parts[qi].append(res)
        if reqs is not None:
            _wait(reqs)
            kk, vv, src = nk, nv, (src - 1) % W
    return _blocks.finish(q_chunks, parts, v.shape[-1], g["layout"], g["sd"])


def _block_grads(qc, kc, vc, qo, ko, docs, out_c, lse_c, dout_c, dlse_c, g):
    """(dq, dk, dv) of one block's share of the merged result, or None for an empty block."""
    layout = g["layout"]
    with torch.enable_grad():
        qc, kc, vc = (t.detach().requires_grad_() for t in (qc, kc, vc))
        res = _blocks.block(qc, qo, kc, vc, ko, g, *docs)
        if res is None:
            return None
        o_b, lse_b = res
        lse_b32 = lse_b.detach().float()
        w = torch.where(torch.isfinite(lse_c), torch.exp(lse_b32 - lse_c), torch.zeros_like(lse_c))
        do_b = (dout_c.float() * _lse_view(w, layout)).to(o_b.dtype)
        row = (dout_c.float() * (o_b.detach().float() - out_c.float())).sum(-1)  # (B, m, H) or (B, H, m)
        row = row.transpose(1, 2) if layout == "bshd" else row
        dl_b = (w * (row + dlse_c)).to(lse_b.dtype)
        return torch.autograd.grad((o_b, lse_b), (qc, kc, vc), (do_b, dl_b), allow_unused=True)


def _backward(q, k, v, out, lse, dout, dlse, g, group):
    W, r = _comm.group_size(group), _comm.group_rank(group)
    sd = g["sd"]
    q_chunks = _blocks.chunks(q, sd, g["qd"](r))
    per_chunk = [
        tuple(t.narrow(d, at, qc.shape[sd]) for t, d in ((out, sd), (lse, -1), (dout, sd), (dlse, -1)))
        for qc, _, _, at in q_chunks
    ]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kk, vv, src = k, v, r
    acc_reqs, acc_in = None, None
    for t in range(W):
        kv_reqs = None
        if t < W - 1:
            nk, nv = torch.empty_like(kk), torch.empty_like(vv)
            kv_reqs = _post(group, [kk, vv], [nk, nv], _KV)
        dk = torch.zeros(kk.shape, dtype=torch.float32, device=kk.device)
        dv = torch.zeros(vv.shape, dtype=torch.float32, device=vv.device)
        for qi, (qc, qo, qdoc, qat) in enumerate(q_chunks):
            for (kc, ko, kdoc, kat), (vc, *_) in _kv_chunks(kk, vv, src, g):
                grads = _block_grads(qc, kc, vc, qo, ko, (qdoc, kdoc), *per_chunk[qi], g)
                if grads is None:
                    continue
                for acc, gr, at in ((dq, grads[0], qat), (dk, grads[1], kat), (dv, grads[2], kat)):
                    if gr is not None:
                        acc.narrow(sd, at, gr.shape[sd]).add_(gr.float())
        if acc_reqs is not None:  # the block's dK/dV from the ranks it visited before
            _wait(acc_reqs)
            dk.add_(acc_in[0])
            dv.add_(acc_in[1])
        if W > 1:
            acc_in = [torch.empty_like(dk), torch.empty_like(dv)]
            acc_reqs = _post(group, [dk, dv], acc_in, _ACC)
            sent = (dk, dv)  # noqa: F841 (the send buffers live until the requests complete)
        if kv_reqs is not None:
            _wait(kv_reqs)
            kk, vv, src = nk, nv, (src - 1) % W
    if W > 1:  # after W steps every block's accumulator has come home
        _wait(acc_reqs)
        dk, dv = acc_in
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingAttention(torch.autograd.Function):
    """``(q_local, k_local, v_local) -> (out_local, lse_local)`` over the group, by the ring."""

    @staticmethod
    def forward(ctx, q, k, v, g, group):
        k, v = k.contiguous(), v.contiguous()
        with torch.no_grad():
            out, lse = _forward(q, k, v, g, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.g, ctx.group = g, group
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.g, ctx.group)
        return dq, dk, dv, None, None
