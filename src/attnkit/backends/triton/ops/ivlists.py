"""Tile lists for masks carried as data (``kernels/ivlists.py``): the forward and the dQ pass visit, per query
tile, a list of partial key tiles (masked) and a list of full ones (the plain body); dK/dV visits, per key
tile, the transposed lists of its query tiles; none classifies the tiles of its range inside its loop. On by
default: on the H200 (bf16, B=2 H=16 S=8k D=128, 2026-12-02, run D in docs/benchmarks.md) the listed forward
ran a causal document mask in 0.564 ms against 0.637 classified, prefix-LM 1.505 / 1.600, a shared prefix
0.859 / 1.551, global+window 0.560 / 0.960. The backward took the lists after that run: not measured yet.
``ATTNKIT_TRITON_IV_LIST=0`` takes the classified loops (A/B runs).

Used for ``bhsd`` / ``bshd`` calls with a mask as data; not for ``thd`` (per-sequence tiles) or inside a
CUDA-graph capture or a compile (no host decisions there): those take the classified loops. Memoized per
summary tensor (weak identity and in-place version), shapes, tiles, flags and orientation, like
``ops/tiles.py``.
"""

from __future__ import annotations

import os
import weakref

import torch

from attnkit.backends.triton.kernels import ivlists as _k
from attnkit.backends.triton.runtime.launch import Launch

iv_lists = Launch(_k.iv_lists)
iv_lists_t = Launch(_k.iv_lists_t)

MAX_ENTRIES = 1 << 26  # int32 list entries (256 MiB)
_MEMO: dict = {}  # key -> (weakref to the summary, its version, (lists, counts))
_MAX_MEMO = 16


def enabled() -> bool:
    return os.environ.get("ATTNKIT_TRITON_IV_LIST", "1") not in ("", "0")


def _usable(p) -> bool:
    if p.iv_summary is None or p.layout == "thd" or not enabled() or torch.compiler.is_compiling():
        return False
    return not (p.q.is_cuda and torch.cuda.is_current_stream_capturing())


def lists(p, BM: int, BN: int, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lists, counts) of ``p``'s mask at tiles BM x BN (``kernels/ivlists.py``): per query tile its key
    tiles, or ``transposed`` (dK/dV) per key tile its query tiles; None where not used."""
    if not _usable(p):
        return None
    summ = p.iv_summary
    Bs, Hs = summ.shape[0], summ.shape[1]
    Sq, Sk = p.max_seqlen_q, p.max_seqlen_k
    n_m, n_n = -(-max(Sq, 1) // BM), -(-max(Sk, 1) // BN)
    if Bs * Hs * n_m * 2 * n_n > MAX_ENTRIES:
        return None
    has_left, has_right, wl, wr = p.window()
    key = (id(summ), Sq, Sk, BM, BN, has_left, has_right, wl, wr, transposed, summ.device)
    version = summ._version
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is summ and hit[1] == version:
        return hit[2]
    rows, cols = (n_n, n_m) if transposed else (n_m, n_n)
    lst = torch.empty((Bs, Hs, rows, 2, cols), device=summ.device, dtype=torch.int32)
    cnt = torch.empty((Bs, Hs, rows, 2), device=summ.device, dtype=torch.int32)
    if cnt.numel():
        (iv_lists_t if transposed else iv_lists)[(rows, Bs * Hs)](
            lst, cnt, summ,
            summ.stride(0) if Bs > 1 else 0, summ.stride(1) if Hs > 1 else 0,
            Hs, Sq, Sk, n_m, n_n, wl, wr,
            HAS_LEFT=has_left, HAS_RIGHT=has_right, BLOCK_M=BM, BLOCK_N=BN,
        )  # fmt: skip
    if len(_MEMO) >= _MAX_MEMO:
        _MEMO.clear()
    _MEMO[key] = (weakref.ref(summ), version, (lst, cnt))
    return lst, cnt


def launch_args(p, BM: int, BN: int, dummy: torch.Tensor, transposed: bool = False) -> tuple[tuple, dict]:
    """(runtime arguments ``IvL, IvC, ivl_b, ivl_h, ivl_n``, constexpr ``IV_LIST``) of a kernel launched at
    tiles BM x BN (the forward and dQ; ``transposed``: dK/dV); the batch / head strides (in list rows) are 0
    on the mask's broadcast dims."""
    got = lists(p, BM, BN, transposed)
    if got is None:
        return (dummy, dummy, 0, 0, 0), {"IV_LIST": False}
    lst, cnt = got
    return (lst, cnt, *row_strides(lst)), {"IV_LIST": True}


def row_strides(lst: torch.Tensor) -> tuple[int, int, int]:
    """(batch stride, head stride, length) of lists (B', H', rows, 2, length) as the kernels index them: list
    row of (b, h, tile) = b * batch stride + h * head stride + tile (0 strides on the mask's broadcast
    dims), entries at row * 2 * length (partial) and + length (full)."""
    Bs, Hs, rows, _, cols = lst.shape
    return (Hs * rows if Bs > 1 else 0, rows if Hs > 1 else 0, cols)
