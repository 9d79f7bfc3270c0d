"""How a sequence is cut across the ranks of a group: ``contiguous`` and ``zigzag``.

With W ranks and a global length S:

- ``contiguous``: W chunks of S / W; rank r holds chunk r.
- ``zigzag``: 2W chunks of S / (2W); rank r holds chunks r and 2W-1-r, concatenated. Under causal masking
  every rank then does the same work (an early chunk sees few keys, its partner many)::

      W = 2, S = 8:  chunks  0 1 | 2 3 | 4 5 | 6 7       rank 0 holds 0 1 6 7, rank 1 holds 2 3 4 5
"""

from __future__ import annotations

import torch

from attnkit.errors import AttentionInputError

SHARDINGS = ("contiguous", "zigzag")


def check_sharding(sharding) -> str:
    if sharding not in SHARDINGS:
        raise AttentionInputError("sharding", f"one of {SHARDINGS}", repr(sharding))
    return sharding


def chunks_per_rank(sharding: str) -> int:
    return 2 if sharding == "zigzag" else 1


def rank_chunks(rank: int, world: int, sharding: str) -> list[int]:
    """The global chunk indices rank ``rank`` holds, in its local order."""
    return [rank, 2 * world - 1 - rank] if sharding == "zigzag" else [rank]


def chunk_starts(rank: int, world: int, sharding: str, chunk: int) -> list[int]:
    """Global start position of each chunk (of ``chunk`` positions) that ``rank`` holds, in local order."""
    return [c * chunk for c in rank_chunks(rank, world, sharding)]


def layout_chunks(rank: int, world: int, sharding: str, length: int, cu_seqlens=None) -> list[tuple]:
    """The pieces of the global sequence that ``rank`` holds, in local order: ``(start, length, doc)``.

    Without ``cu_seqlens`` the sequence of ``length`` positions is cut as a whole (``doc`` None). With
    ``cu_seqlens`` (int (N+1,), packed documents, each length a multiple of W or 2W) every document is cut the
    same way on its own, so every rank gets an equal share of each document (TransformerEngine's THD
    layout); the pieces are then ordered document by document."""
    per = chunks_per_rank(sharding)
    if cu_seqlens is None:
        c = length // (world * per)
        return [(s, c, None) for s in chunk_starts(rank, world, sharding, c)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    out = []
    for n in range(len(cu) - 1):
        c = (cu[n + 1] - cu[n]) // (world * per)
        out += [(cu[n] + i * c, c, n) for i in rank_chunks(rank, world, sharding)] if c else []
    return out


def check_cu_seqlens(cu_seqlens, world: int, sharding: str, total: int | None = None):
    """``cu_seqlens`` for a sharded packed batch: int (N+1,), from 0, every length a multiple of W (2W)."""
    n = world * chunks_per_rank(sharding)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
        raise AttentionInputError(
            "cu_seqlens", "an int tensor (N+1,) of the whole packed batch", repr(cu_seqlens)
        )
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if int(cu_seqlens[0]) != 0 or any(x < 0 or x % n for x in lens):
        raise AttentionInputError(
            "cu_seqlens",
            f"0 first and every sequence length a multiple of {n} ({sharding}, W={world})",
            lens,
            hint="pad each document to a multiple of the chunk count (TE's cu_seqlens_padded)",
        )
    if total is not None and int(cu_seqlens[-1]) != total:
        raise AttentionInputError(
            "cu_seqlens", f"a last entry equal to the total length {total}", int(cu_seqlens[-1])
        )


def _check_dim(x, dim: int, arg: str = "x") -> int:
    if not isinstance(x, torch.Tensor):
        raise AttentionInputError(arg, "a tensor", type(x).__name__)
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise AttentionInputError("dim", f"an int in [-{x.dim()}, {x.dim()})", repr(dim))
    return dim % x.dim()


def _world(group, rank, world_size) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    from attnkit.distributed._comm import group_rank, group_size, require_initialized

    require_initialized()
    return group_rank(group), group_size(group)


def shard(
    x: torch.Tensor,
    dim: int,
    group=None,
    sharding: str = "zigzag",
    *,
    cu_seqlens=None,
    rank=None,
    world_size=None,
):
    """This rank's part of ``x`` along ``dim`` (no communication; differentiable).

    Args:
        x: the whole tensor, identical on every rank; ``x.shape[dim]`` (the global length S) must be a
            multiple of W (``contiguous``) or 2W (``zigzag``). E.g. q (B, S, H, D) with ``dim=1`` (bshd),
            doc ids (B, S) or position ids (S,) with ``dim=-1``.
        dim: the sequence dimension of ``x``.
        group: the process group (default: the world); W is its size.
        sharding: ``"contiguous"`` or ``"zigzag"`` (see the module docstring).
        cu_seqlens: optional int (N+1,): ``x`` packs N documents along ``dim`` (layout ``thd``); each is cut
            on its own (every length a multiple of W or 2W), so every rank gets an equal share of each.
        rank, world_size: give both to shard without a process group (e.g. to prepare data).

    Returns:
        ``x`` narrowed to S / W positions along ``dim``: this rank's chunks, concatenated.
    """
    dim = _check_dim(x, dim)
    check_sharding(sharding)
    r, W = _world(group, rank, world_size)
    n = W * chunks_per_rank(sharding)
    S = x.shape[dim]
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, W, sharding, S)
    elif S == 0 or S % n:
        raise AttentionInputError(
            "x",
            f"a length along dim {dim} that is a positive multiple of {n} ({sharding}, W={W})",
            S,
            hint="pad the sequence (and mask the padding) to a multiple of the number of chunks",
        )
    parts = [x.narrow(dim, s, c) for s, c, _ in layout_chunks(r, W, sharding, S, cu_seqlens)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def reorder_to_global(x: torch.Tensor, dim: int, world: int, sharding: str, cu_seqlens=None) -> torch.Tensor:
    """Rank-ordered concatenation of every rank's shard (what an all-gather gives) -> global order."""
    if sharding == "contiguous" and cu_seqlens is None:
        return x
    S = x.shape[dim]
    pieces, at = [], 0
    for r in range(world):
        for start, c, _ in layout_chunks(r, world, sharding, S, cu_seqlens):
            pieces.append((start, at, c))
            at += c
    return torch.cat([x.narrow(dim, at, c) for _, at, c in sorted(pieces)], dim=dim)


def unshard(x_local: torch.Tensor, dim: int, group=None, sharding: str = "zigzag", *, cu_seqlens=None):
    """The whole tensor on every rank, from each rank's shard (an all-gather; differentiable).

    Args:
        x_local: this rank's shard, as :func:`shard` or ``context_parallel_attention`` return it, e.g. out
            (B, S/W, H, Dv) with ``dim=1``, or lse (B, H, S/W) with ``dim=-1``; the same shape on every rank.
        dim: the sequence dimension.
        group, sharding, cu_seqlens: as given to :func:`shard`.

    Returns:
        The tensor with S positions along ``dim``, in global order. Every rank holds the same (replicated)
        result, so its gradient flows back as this rank's slice of the gradient (like DTensor's
        Replicate -> Shard), with no communication in backward.
    """
    from attnkit.distributed._comm import GatherReplicated, group_size, require_initialized

    dim = _check_dim(x_local, dim, "x_local")
    check_sharding(sharding)
    require_initialized()
    W = group_size(group)
    if cu_seqlens is None and x_local.shape[dim] % chunks_per_rank(sharding):
        raise AttentionInputError("x_local", f"an even length along dim {dim} for zigzag", x_local.shape[dim])
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, W, sharding, x_local.shape[dim] * W)
    full = GatherReplicated.apply(x_local, group, dim)
    return reorder_to_global(full, dim, W, sharding, cu_seqlens)


def position_ids(
    seq_len: int,
    group=None,
    sharding: str = "zigzag",
    *,
    cu_seqlens=None,
    device=None,
    rank=None,
    world_size=None,
):
    """The positions (int64, (S/W,)) of this rank's shard of a sequence of ``seq_len`` positions: what RoPE
    needs on each rank. Same as ``shard(torch.arange(seq_len), 0, group, sharding)``; with ``cu_seqlens``
    (packed documents, as for :func:`shard`) the positions restart at 0 in every document."""
    pos = torch.arange(seq_len, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=pos.device, dtype=torch.int64)
        doc = torch.searchsorted(cu, pos, right=True) - 1
        pos = pos - cu[doc]
    return shard(pos, 0, group, sharding, cu_seqlens=cu_seqlens, rank=rank, world_size=world_size)
