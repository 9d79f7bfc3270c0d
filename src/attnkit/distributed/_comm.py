"""Communication for context parallelism, on torch.distributed (gloo on CPUs, NCCL on GPUs).

- :func:`exchange`: one ``batch_isend_irecv`` of a few tensors to one peer and from another (the ring's step,
  see ``_ring.py``).
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


def exchange(group, send: list[torch.Tensor], to: int, recv: list[torch.Tensor], frm: int, tag: int = 0):
    """Post sends of ``send`` to group rank ``to``, receives into ``recv`` from ``frm``; the requests."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), _global(group, to), group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, _global(group, frm), group, tag) for t in recv]
    return dist.batch_isend_irecv(ops)


class Tie(torch.autograd.Function):
    """``out`` unchanged, made to depend on ``extra`` tensors with a zero gradient: a rank whose queries see
    no key at all must still run the collective backward of the K/V it gathered (its peers wait for it),
    and give its q a zero gradient rather than none."""

    @staticmethod
    def forward(ctx, out, *extra):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in extra]
        return out.clone()

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
