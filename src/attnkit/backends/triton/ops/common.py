"""Host helpers every launcher of the Triton backend shares: strides per layout, sizes, output buffers.

Tensor conventions (every launch): q/k/v/out/dO in the caller's layout with unit stride on the head dim,
read through (batch, head, row) strides; for ``thd`` the batch stride is 0 and each sequence starts at
``cu_seqlens[n]``. ``lse`` is (B, Hq, Sq) or (Hq, Tq) float32.
"""

from __future__ import annotations

import contextlib

import torch

from attnkit.backends.triton.kernels.common import Features, Schedule

Tensor = torch.Tensor

POISON = False  # tests: fill outputs with NaN before launch, so unwritten elements show


def strides(t: Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, row) strides of a q/k/v-like tensor."""
    if layout == "bhsd":  # (B, H, S, D)
        return t.stride(0), t.stride(1), t.stride(2)
    if layout == "bshd":  # (B, S, H, D)
        return t.stride(0), t.stride(2), t.stride(1)
    return 0, t.stride(1), t.stride(0)  # thd: (T, H, D)


def unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sizes(q: Tensor, k: Tensor, layout: str, cu_q: Tensor | None) -> tuple[int, int, int]:
    """(B, Hq, Hk) of the call."""
    if layout == "thd":
        return cu_q.shape[0] - 1, q.shape[1], k.shape[1]
    if layout == "bhsd":
        return q.shape[0], q.shape[1], k.shape[1]
    return q.shape[0], q.shape[2], k.shape[2]


def lse_shape(q: Tensor, layout: str, B: int, Hq: int) -> tuple[int, ...]:
    if layout == "thd":
        return (Hq, q.shape[0])
    return (B, Hq, q.shape[2] if layout == "bhsd" else q.shape[1])


def lse_strides(lse: Tensor, layout: str) -> tuple[int, int, int]:
    if layout == "thd":  # (Hq, Tq)
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def bias4(bias: Tensor | None, B: int, Hq: int, Sq: int, Sk: int):
    """Bias expanded (as a view) to (B, Hq, Sq, Sk) and its strides (0 on broadcast dims)."""
    if bias is None:
        return None, (0, 0, 0, 0)
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(B, Hq, Sq, Sk)
    return b4, tuple(b4.stride())


def slope_strides(slopes: Tensor | None) -> tuple[int, int]:
    if slopes is None:
        return 0, 0
    return (0, slopes.stride(0)) if slopes.dim() == 1 else (slopes.stride(0), slopes.stride(1))


def block_d(d: int) -> int:
    """Padded head dim: the next power of two, at least 16 (plain Python: triton's helpers cost ~2 us a
    call, and every launch asks several times)."""
    return max(16, 1 << (d - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def defer(p) -> bool:
    """Plain positive scale: the kernels fold it into the exp2 FMA (``kernels/common.scores``' DEFER)."""
    return p.scale > 0 and p.softcap <= 0 and p.bias is None and p.alibi_slopes is None and not p.score_mod


def precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def constexprs(p, q: Tensor, v: Tensor, Hq: int, Hk: int, features: dict) -> dict:
    """The constexprs every attention kernel takes: shapes, the feature flags ``features``, and how the
    scale and the dots are done."""
    D, Dv = q.shape[-1], v.shape[-1]
    shape = dict(GROUP=Hq // Hk, D=D, DV=Dv, BLOCK_D=block_d(D), BLOCK_DV=block_d(Dv))
    fn = score_mod_fn(p)
    return {**shape, **features, "DEFER": defer(p), "PRECISION": precision(q.dtype), "SCORE_MOD": fn}


def kernel_constexprs(common: dict, *parts: dict) -> dict:
    """One attention kernel launch's constexprs: :func:`constexprs`' dict with the launch's own parts merged
    in (its tile states' and tile lists' flags, ``REVERSE``; a later part wins), the score pipeline's flags
    gathered into ``FEAT`` (``kernels/common.Features``) and the tile loop's into ``SCHED``
    (``kernels/common.Schedule``), the rest (shapes) as they are. (Triton's disk cache keys a constexpr
    tuple by its ``str``, which names a compiled mod by its module, ``attnkit.compiler.generated.m<hash of
    its source>``: enough while generated code calls nothing but ``tl``; a top-level function constexpr
    would be keyed by its ``cache_key``, which follows what it calls.)"""
    kw = dict(common)
    for part in parts:
        kw.update(part)
    kw["FEAT"] = Features(*[kw.pop(n) for n in Features._fields])
    kw["SCHED"] = Schedule(*[kw.pop(n) for n in Schedule._fields])
    return kw


@contextlib.contextmanager
def jit_hooks_off(fn):
    """Around a launch that takes the compiled score mod ``fn`` (a ``@triton.jit`` function) as a constexpr:
    Triton's JIT hooks (``triton.knobs.runtime.jit_cache_hook`` / ``jit_post_compile_hook``, which other
    libraries in the process may set) serialize every constexpr to JSON and fail on a function, so they are
    off for that launch (and back after it). Without ``fn``, nothing changes."""
    if fn is None:
        yield
        return
    import triton

    rt = triton.knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook
    if saved == (None, None):
        yield
        return
    rt.jit_cache_hook = rt.jit_post_compile_hook = None
    try:
        yield
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved


def score_mod_fn(p):
    """The compiled score mod's ``@triton.jit`` function (``attnkit.compiler``), or None without one."""
    if not p.score_mod:
        return None
    from attnkit import compiler

    return compiler.REGISTRY[p.score_mod].score_mod


def score_mod_bwd_fn(p):
    """The compiled score mod's gradient function for its captured tensors, or None (none wanted)."""
    if not p.score_mod:
        return None
    from attnkit import compiler

    return getattr(compiler.REGISTRY[p.score_mod], "score_mod_bwd", None)


def scalars(p, dummy: Tensor) -> tuple:
    """The scalar runtime arguments every attention kernel takes after its sizes, in the kernels' order,
    then the mask-interval arguments (:func:`iv_args`) and the score mod's (:func:`smod_args`)."""
    _, _, wl, wr = p.window()
    return (p.scale, p.softcap if p.softcap > 0 else 1.0, wl, wr, p.dropout_p, *iv_args(p, dummy),
            *smod_args(p, dummy))  # fmt: skip


def smod_args(p, dummy: Tensor) -> tuple:
    """A compiled score mod's captured tensors (``dummy`` in empty slots) and their strides/sizes table."""
    slots = (p.smod_c0, p.smod_c1, p.smod_c2, p.smod_c3, p.smod_meta)
    return tuple([dummy if t is None else t for t in slots])


def iv_args(p, dummy: Tensor) -> tuple:
    """A mask carried as data: (intervals, summary, their batch and head strides, 0 on broadcast dims);
    ``dummy`` (a tensor the launch takes anyway) in their place without one."""
    se, summary = p.startend, p.iv_summary
    if se is None:
        return (dummy, dummy, 0, 0, 0, 0)

    def bh(t):
        return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)

    return (se, summary, *bh(se), *bh(summary))


def draw_rng(device) -> Tensor:
    """Dropout state: int64 (2,) = (seed, offset) drawn from the device's default generator (seedable with
    ``torch.manual_seed``; capturable in CUDA graphs)."""
    return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64)


def new(shape, like: Tensor, dtype=None) -> Tensor:
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON:
        t.fill_(float("nan"))
    return t


_GLUON: dict = {}


def gluon(kind: str = "fwd"):
    """The Gluon host module for ``kind`` ("fwd": ``ops/gluon_fwd.py``, "bwd": ``ops/gluon_bwd.py``), or
    None where this Triton has no Gluon (imported on first use)."""
    if kind not in _GLUON:
        try:
            if kind == "fwd":
                from attnkit.backends.triton.ops import gluon_fwd as mod
            else:
                from attnkit.backends.triton.ops import gluon_bwd as mod
        except ImportError:
            mod = None
        _GLUON[kind] = mod
    return _GLUON[kind]
