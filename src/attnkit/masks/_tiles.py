"""How block sparse a mask is, cheaply: the sampled fraction of (query tile, key tile) pairs it leaves
non-empty, for the cost model of backends that skip empty tiles (``backends/triton/backend.py``: masks that
are evaluated in the kernels with per-tile states, ``backends/triton/ops/tiles.py``).

Not the states themselves (those are computed on the device at the kernels' own tile sizes, when a call
runs): up to :data:`SAMPLES` tiles of TILE x TILE, drawn with a fixed seed (every tile where there are no
more), at a random batch element and head each, evaluated with the mask's own PyTorch function (one read of
the count). Memoized on the mask like ``_intervals.lower`` (shapes, data tensors by weak identity and
version). None where host reads are not allowed (torch.compile, CUDA-graph capture) and for ``thd``.
"""

from __future__ import annotations

import weakref

import torch

from attnkit.masks import _intervals

SAMPLES = 64
TILE = 128  # (the forward's tile at the common head dims on the H200)


def occupancy(mask, call) -> float | None:
    """Sampled fraction of the call's tiles (TILE x TILE) in which ``mask`` keeps something, or None."""
    if call.layout == "thd" or not _intervals._host_values_allowed(call.q):
        return None
    shape, tensors = _intervals._memo_key(mask, call)
    versions = [_intervals._version(t) for t in tensors]
    memo = mask.__dict__.get("_occupancy")
    if (
        memo is not None
        and memo[0] == shape
        and len(memo[1]) == len(tensors)
        and all(r() is t and v == u for (r, v), t, u in zip(memo[1], tensors, versions))
    ):
        return memo[2]
    try:
        frac = _sample(mask, call)
    except Exception:  # noqa: BLE001 (a mask whose eager function fails on index tensors: no estimate)
        frac = None
    if None not in versions:
        mask.__dict__["_occupancy"] = (shape, [(weakref.ref(t), v) for t, v in zip(tensors, versions)], frac)
    return frac


def _sample(mask, call) -> float | None:
    B, H, Sq, Sk = call.batch, call.Hq, call.Sq, call.Sk
    n_m, n_n = -(-Sq // TILE), -(-Sk // TILE)
    n = n_m * n_n
    if n == 0:
        return None
    gen = torch.Generator().manual_seed(0)
    picks = torch.arange(n) if n <= SAMPLES else torch.randint(0, n, (SAMPLES,), generator=gen)
    T = picks.numel()
    dev = call.device
    b = torch.randint(0, B, (T, 1, 1), generator=gen).to(dev)
    h = torch.randint(0, H, (T, 1, 1), generator=gen).to(dev)
    r = torch.arange(TILE)
    q = ((picks // n_n).view(T, 1, 1) * TILE + r.view(1, TILE, 1)).to(dev)
    kv = ((picks % n_n).view(T, 1, 1) * TILE + r.view(1, 1, TILE)).to(dev)
    inside = (q < Sq) & (kv < Sk)
    keep = torch.as_tensor(mask._fn(b, h, q.clamp(max=Sq - 1), kv.clamp(max=Sk - 1), Sk - Sq), device=dev)
    hit = (keep.to(torch.bool) & inside).flatten(1).any(1)
    return float(hit.sum().item()) / T
