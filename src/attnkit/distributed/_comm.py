"""Communication for context parallelism, on torch.distributed (gloo on CPUs, NCCL on GPUs).

Three autograd-aware pieces, each with its backward written out:

- :class:`RingShift`: send a K/V block to the next rank while receiving the previous rank's block. Forward
  posts the ``batch_isend_irecv`` and returns the receive buffers at once (the caller computes on the current
  block, then calls ``pending.wait()``); backward passes the gradients the other way round the ring, so
  dK/dV travel back to the rank that owns the block.
- :class:`AllGatherSeq`: all-gather along a dimension; backward reduce-scatters the gradient (sums every
  rank's gradient of the gathered tensor and keeps this rank's part).
- :class:`GatherReplicated`: all-gather for :func:`unshard`; every rank then holds the same (replicated)
  tensor, so backward keeps this rank's slice of the gradient, with no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


def _global(group, local_rank: int) -> int:
    return local_rank if group is None else dist.get_global_rank(group, local_rank)


class Pending:
    """The requests of one posted ring step; ``wait()`` before reading the received buffers."""

    def __init__(self):
        self.reqs = []

    def wait(self):
        for r in self.reqs:
            r.wait()
        self.reqs = []


def _exchange(group, send: list[torch.Tensor], to: int, recv: list[torch.Tensor], frm: int):
    """Post sends of ``send`` to group rank ``to``, receives into ``recv`` from ``frm``; the requests."""
    ops = [dist.P2POp(dist.isend, t, _global(group, to), group) for t in send]
    ops += [dist.P2POp(dist.irecv, t, _global(group, frm), group) for t in recv]
    return dist.batch_isend_irecv(ops)


class RingShift(torch.autograd.Function):
    """``(k, v) -> (k_prev, v_prev)``: this rank's block goes to rank r+1, rank r-1's block comes in."""

    @staticmethod
    def forward(ctx, pending: Pending, group, k, v):
        ctx.group = group
        W, r = group_size(group), group_rank(group)
        k, v = k.contiguous(), v.contiguous()
        kb, vb = torch.empty_like(k), torch.empty_like(v)
        pending.reqs = _exchange(group, [k, v], (r + 1) % W, [kb, vb], (r - 1) % W)
        pending.keep = (k, v)  # the send buffers live until the requests complete
        return kb, vb

    @staticmethod
    def backward(ctx, gk, gv):
        group = ctx.group
        W, r = group_size(group), group_rank(group)
        gk, gv = gk.contiguous(), gv.contiguous()
        dk, dv = torch.empty_like(gk), torch.empty_like(gv)
        for req in _exchange(group, [gk, gv], (r - 1) % W, [dk, dv], (r + 1) % W):
            req.wait()
        return None, None, dk, dv


class Tie(torch.autograd.Function):
    """``out`` unchanged, made to depend on ``extra`` tensors (zero gradient): a received block that this
    rank skipped must stay in the graph, or its RingShift backward would not run here while the
    neighbours wait for it."""

    @staticmethod
    def forward(ctx, out, *extra):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in extra]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return (g, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes])


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class AllGatherSeq(torch.autograd.Function):
    """All-gather along ``dim`` (rank order); backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.group, ctx.dim, ctx.n = group, dim, x.shape[dim]
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        group, dim, n = ctx.group, ctx.dim, ctx.n
        r = group_rank(group)
        if dist.get_backend(group) == "nccl":
            g_t = g.movedim(dim, 0).contiguous()
            out = torch.empty((n, *g_t.shape[1:]), dtype=g.dtype, device=g.device)
            dist.reduce_scatter_tensor(out, g_t, group=group)
            return out.movedim(0, dim), None, None
        g = g.contiguous().clone()  # gloo has no reduce-scatter: all-reduce, keep this rank's part
        dist.all_reduce(g, group=group)
        return g.narrow(dim, r * n, n), None, None


class GatherReplicated(torch.autograd.Function):
    """All-gather along ``dim`` to a replicated tensor; backward keeps this rank's slice (no comms)."""

    @staticmethod
    def forward(ctx, x, group, dim: int):
        ctx.dim, ctx.n, ctx.r = dim, x.shape[dim], group_rank(group)
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(ctx.dim, ctx.r * ctx.n, ctx.n), None, None


def all_gather_ints(values: list[int], group, device) -> list[list[int]]:
    """Every rank's ``values`` (a short list of ints), in group rank order."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(group_size(group))]
    dist.all_gather(parts, t, group=group)
    return [p.tolist() for p in parts]


def require_initialized():
    from attnkit.errors import AttentionInputError

    if not dist.is_available() or not dist.is_initialized():
        raise AttentionInputError(
            "group",
            "an initialized torch.distributed process group",
            "torch.distributed not initialized",
            hint="call torch.distributed.init_process_group(...) first (gloo on CPUs, nccl on GPUs)",
        )
