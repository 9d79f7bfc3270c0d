"""Block sparsity for masks evaluated in the kernels (no interval lowering): per-tile states on the device.

A mask that does not lower to column intervals reaches the launchers as a compiled masked score mod
(``backends/triton/backend._masked_mod``), whose module also holds the mask condition and the inner mod
apart (``attnkit.compiler.masked``). Each launcher asks :func:`launch_args` at its own tile sizes: the
states kernel (``kernels/tiles.py``) fills int8 (B', H', ceil(Sq / BM), ceil(Sk / BN)) states (0 empty,
1 partial, 2 full; B' = 1 / H' = 1 where the condition ignores the batch / head index; for ``thd`` one row
per sequence, tiles counted inside it), and the kernel then skips empty tiles, runs full ones through the
inner mod alone and applies the condition on partial ones. The dK/dV kernel reads the same layout
transposed (it walks a column of query tiles per key tile).

Memoized like ``masks._intervals.lower``: per compiled mask (its module), shapes, tile sizes, and the
captured tensors (and cu_seqlens for ``thd``) by weak identity and in-place version, so the layers of a
model that pass one mask pay one states launch per tile shape. Never kept from inside a CUDA-graph capture
or a compile (computed fresh there, so a replay recomputes them from the tensors' current values).

Not used (the per-element path, every tile visited): under ``ATTNKIT_TRITON_TILE_STATES=0`` (A/B runs), and
where the states would exceed :data:`MAX_STATES` entries (a ``thd`` call whose longest sequence is far longer
than the others pays its padded grid per sequence).
"""

from __future__ import annotations

import os
import weakref

import torch

from attnkit.backends.triton.kernels import tiles as _k
from attnkit.backends.triton.ops import common as c
from attnkit.backends.triton.runtime.launch import Launch

tile_states = Launch(_k.tile_states)

MAX_STATES = 1 << 26  # int8 entries (64 MiB)
_MEMO: dict = {}  # key -> ([(weakref, version)] of the tensors read, states)
_MAX_MEMO = 32
_MAX_MEMO_BYTES = 1 << 28  # what the memo may hold on the devices, all entries together


def enabled() -> bool:
    return os.environ.get("ATTNKIT_TRITON_TILE_STATES", "1") not in ("", "0")


def _module(p):
    """The compiled masked mod's module if it carries the condition apart (else None)."""
    if not p.score_mod:
        return None
    from attnkit import compiler

    mod = compiler.REGISTRY.get(p.score_mod)
    return mod if mod is not None and hasattr(mod, "mask_keep") else None


def _tensors(p) -> list:
    ts = [t for t in (p.smod_c0, p.smod_c1, p.smod_c2, p.smod_c3) if t is not None]
    if p.layout == "thd":
        ts += [p.cu_seqlens_q, p.cu_seqlens_k]
    return ts


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter: never memoized
        return None


def _keepable(q: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (q.is_cuda and torch.cuda.is_current_stream_capturing())


def shape(p, mod, B: int, Hq: int, BM: int, BN: int) -> tuple[int, int, int, int]:
    """(B', H', query tiles, key tiles) of the states of ``p`` at tiles BM x BN."""
    thd = p.layout == "thd"
    Bs = B if (thd or mod.KEEP_USES_B) else 1
    Hs = Hq if mod.KEEP_USES_H else 1
    return Bs, Hs, c.cdiv(max(p.max_seqlen_q, 1), BM), c.cdiv(max(p.max_seqlen_k, 1), BN)


def states(p, B: int, Hq: int, BM: int, BN: int) -> torch.Tensor | None:
    """int8 tile states of ``p``'s mask at tiles BM x BN (module docstring), or None where not used."""
    mod = _module(p)
    if mod is None or not enabled():
        return None
    dims = shape(p, mod, B, Hq, BM, BN)
    if dims[0] * dims[1] * dims[2] * dims[3] > MAX_STATES:
        return None
    tensors = _tensors(p)
    versions = [_version(t) for t in tensors]
    key = (p.score_mod, p.layout, B, Hq, p.max_seqlen_q, p.max_seqlen_k, BM, BN, p.q.device)
    key += tuple([id(t) for t in tensors])
    keepable = _keepable(p.q) and None not in versions
    hit = _MEMO.get(key) if keepable else None
    if hit is not None and all(r() is t and v == u for (r, v), t, u in zip(hit[0], tensors, versions)):
        return hit[1]
    st = compute(p, mod, dims, BM, BN)
    if keepable:
        _remember(key, [(weakref.ref(t), v) for t, v in zip(tensors, versions)], st)
    return st


def _remember(key, refs: list, st: torch.Tensor) -> None:
    """Keep ``st`` under ``key``, first dropping entries whose tensors are gone (their states can never be
    asked for again), then everything where the memo holds too many entries or bytes."""
    for k in [k for k, (rs, _) in _MEMO.items() if any(r() is None for r, _ in rs)]:
        del _MEMO[k]
    held = sum(x.numel() for _, x in _MEMO.values())
    if len(_MEMO) >= _MAX_MEMO or held + st.numel() > _MAX_MEMO_BYTES:
        _MEMO.clear()
    _MEMO[key] = (refs, st)


def compute(p, mod, dims, BM: int, BN: int) -> torch.Tensor:
    """Launch the states kernel: one program per tile, (key tiles, query tiles, B' * H')."""
    Bs, Hs, n_m, n_n = dims
    q = p.q
    st = torch.empty(dims, device=q.device, dtype=torch.int8)
    if st.numel() == 0:
        return st
    varlen = p.layout == "thd"
    dummy = q
    with c.jit_hooks_off(mod.mask_keep):
        tile_states[(n_n, n_m, Bs * Hs)](
            st,
            p.cu_seqlens_q if varlen else dummy,
            p.cu_seqlens_k if varlen else dummy,
            *c.smod_args(p, dummy),
            Hs,
            p.max_seqlen_q,
            p.max_seqlen_k,
            n_m,
            n_n,
            st.stride(0),
            st.stride(1),
            BLOCK_M=BM,
            BLOCK_N=BN,
            VARLEN=varlen,
            MASK_KEEP=mod.mask_keep,
        )
    return st


def launch_args(p, B: int, Hq: int, BM: int, BN: int, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """(runtime arguments ``Ts, stride_tb, stride_th, ts_cols``, constexprs ``HAS_TS, MASK_KEEP`` and, with
    states, ``SCORE_MOD`` replaced by the inner mod) of an attention kernel launched at tiles BM x BN; the
    batch / head strides are 0 on broadcast dims."""
    st = states(p, B, Hq, BM, BN)
    if st is None:
        return (dummy, 0, 0, 0), {"HAS_TS": False, "MASK_KEEP": None}
    mod = _module(p)
    sb = st.stride(0) if st.shape[0] > 1 else 0
    sh = st.stride(1) if st.shape[1] > 1 else 0
    return (st, sb, sh, st.shape[3]), {"HAS_TS": True, "MASK_KEEP": mod.mask_keep,
                                       "SCORE_MOD": mod.score_mod_inner}  # fmt: skip
