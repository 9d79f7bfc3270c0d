"""The forward's launcher: buffers, the Gluon forward where it serves, else the Triton kernel.

``body(p)`` -> (out in q's layout, lse float32, dropout rng state int64 (2,), row stats float32 (2, *lse)).
The row stats (lse in log2 units, max score plus log2 of the exp-sum, as an unevaluated sum hi + lo) let
the backward recompute probabilities exactly.
"""

from __future__ import annotations

import torch

from attnkit.backends.triton.kernels import fwd as _fwd
from attnkit.backends.triton.ops import common as c
from attnkit.backends.triton.ops import ivlists as _ivlists
from attnkit.backends.triton.ops import tiles as _tiles
from attnkit.backends.triton.params import FwdParams
from attnkit.backends.triton.runtime import capability as _cap
from attnkit.backends.triton.runtime import tuning as _tuning
from attnkit.backends.triton.runtime.launch import Launch

# every launch goes through Launch: the compiled kernel looked up from the arguments, without Triton's
# per-launch binding (host time is what short sequences wait on)
attn_fwd = Launch(_fwd.attn_fwd)

Tensor = torch.Tensor


def buffers(p: FwdParams) -> list:
    """Every tensor a forward launch may take, in the order replays pass them: [q, k, v (unit last
    stride), out, lse, stats, hi, lo (allocated; stats = (hi, lo)), rng (the dropout state)], then every
    other tensor argument of ``p`` in field order."""
    q, k, v = c.unit_last(p.q), c.unit_last(p.k), c.unit_last(p.v)
    B, Hq, _ = c.sizes(q, k, p.layout, p.cu_seqlens_q)
    out = c.new(q.shape[:-1] + (v.shape[-1],), q)
    lse = c.new(c.lse_shape(q, p.layout, B, Hq), q, torch.float32)
    stats = c.new((2,) + tuple(lse.shape), q, torch.float32)
    # without dropout the kernels never read the state: no fill (a launch of host time) for it
    rng = c.draw_rng(q.device) if p.dropout_p > 0 else torch.empty(2, dtype=torch.int64, device=q.device)
    rest = [getattr(p, n) for n in _REST]
    return [q, k, v, out, lse, stats, *stats.unbind(0), rng, *rest]


_REST = tuple(n for n in FwdParams.tensor_names() if n not in ("q", "k", "v"))


def outputs(tensors: list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, rng, stats) from :func:`buffers`' list."""
    out, lse, stats, _, _, rng = tensors[3:9]
    return out, lse, rng, stats


def fake(p: FwdParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's fake (meta) implementation: outputs of the right shapes, nothing computed."""
    q = p.q
    B, Hq, _ = c.sizes(q, p.k, p.layout, p.cu_seqlens_q)
    out = q.new_empty(q.shape[:-1] + (p.v.shape[-1],))
    lse = q.new_empty(c.lse_shape(q, p.layout, B, Hq), dtype=torch.float32)
    stats = q.new_empty((2,) + tuple(lse.shape), dtype=torch.float32)
    return out, lse, q.new_empty((2,), dtype=torch.int64), stats


def body(p: FwdParams, keep=None):
    """The forward's work; ``keep`` (a list) gets the tensors its launches may take."""
    tensors = buffers(p)
    if keep is not None:
        keep += tensors
    q, k, v, out, lse, stats, hi, lo, rng = tensors[:9]
    layout = p.layout
    B, Hq, Hk = c.sizes(q, k, layout, p.cu_seqlens_q)
    D, Dv = q.shape[-1], v.shape[-1]
    Sq, Sk = p.max_seqlen_q, p.max_seqlen_k
    # plain calls (causal or not, no other feature) on Hopper: the warp-specialized Gluon kernel
    cap = _cap.capability(q.device) if q.is_cuda else None
    if cap and p.plain() and _cap.gluon_forward_eligible(cap, layout, D, Dv, q.dtype, Sk, p.causal, p.scale):
        gluon = c.gluon()
        done = gluon.try_forward(q, k, v, layout, p.scale, p.causal, (out, lse, stats)) if gluon else None
        if done is not None:  # (strides or alignment a TMA descriptor cannot take: the Triton kernel)
            return outputs(tensors)
    # a mask carried as data (and flags) on Hopper: the Gluon kernel on the mask's tile lists
    if (
        cap
        and p.data_mask_only()
        and _cap.gluon_listed_eligible(cap, layout, D, Dv, q.dtype, Sk, p.scale, p.window()[0] or p.iv_band)
    ):
        gluon = c.gluon()
        done = gluon.try_listed(p, q, k, v, (out, lse, stats)) if gluon else None
        if done is not None:
            return outputs(tensors)
    if out.numel() == 0:
        stats[0].fill_(float("inf"))
        stats[1].fill_(0.0)
        lse.fill_(float("-inf"))
        return outputs(tensors)
    b4, sb = c.bias4(p.bias, B, Hq, Sq, Sk)
    flags = p.flags()
    varlen = flags["VARLEN"]
    dummy = q
    args = (
        q,
        k,
        v,
        out,
        lse,
        hi,
        lo,
        b4 if b4 is not None else dummy,
        p.alibi_slopes if p.alibi_slopes is not None else dummy,
        p.cu_seqlens_q if varlen else dummy,
        p.cu_seqlens_k if varlen else dummy,
        rng,
        c.strides(q, layout),
        c.strides(k, layout),
        c.strides(v, layout),
        c.strides(out, layout),
        *c.lse_strides(lse, layout),
        sb,
        c.slope_strides(p.alibi_slopes),
        Hq,
        Sq,
        Sk,
        *c.scalars(p, dummy),
    )
    constexprs = c.constexprs(p, q, v, Hq, Hk, flags)
    constexprs["REVERSE"] = flags["HAS_RIGHT"] and not flags["HAS_LEFT"]

    def launch(cfg):
        BM, BN, warps, stages = cfg
        grid = (c.cdiv(max(Sq, 1), BM), B * Hq)
        ts, ts_flags = _tiles.launch_args(p, B, Hq, BM, BN, dummy)  # (a mask evaluated per tile)
        ivl, ivl_flags = _ivlists.launch_args(p, BM, BN, dummy)  # (a mask as data, listed)
        kw = c.kernel_constexprs(constexprs, ts_flags, ivl_flags)
        with c.jit_hooks_off(kw["FEAT"].SCORE_MOD):
            attn_fwd[grid](*args, *ts, *ivl, BLOCK_M=BM, BLOCK_N=BN, **kw, num_warps=warps, num_stages=stages)

    tune_key = FwdParams.tune_key(flags)
    hint = _tuning.hints(flags, gathers=p.smod_c0 is not None)
    cfg = _tuning.pick("fwd", D, Dv, q.dtype, tune_key, Sq, Sk, q.device, launch, hint)
    _tuning.launch_fitting("fwd", cfg, (tune_key, p.score_mod), launch, D, Dv, q.dtype)
    return outputs(tensors)
