"""The backward's launcher: the dK/dV kernel (the Hopper Gluon one where it serves), then a separate dQ pass
(no atomics: bitwise reproducible), beside it on a side stream at large sizes. Where
``runtime/capability.gluon_fused_dq`` says so (not with ``deterministic=True``), the Gluon kernel adds dQ
itself into a float32 buffer and no dQ pass runs.

``body(p)`` -> (dq, dk, dv, dbias, dsmod) with dbias shaped like ``bias`` (an empty tensor when not asked)
and dsmod the score mod's captured tensors' gradients, flat (see :func:`smod_grads`).
"""

from __future__ import annotations

import torch

from attnkit.backends.triton.kernels import bwd as _bwd
from attnkit.backends.triton.kernels import bwd_dq as _bwd_dq
from attnkit.backends.triton.ops import common as c
from attnkit.backends.triton.ops import ivlists as _ivlists
from attnkit.backends.triton.ops import tiles as _tiles
from attnkit.backends.triton.params import BwdParams
from attnkit.backends.triton.runtime import capability as _cap
from attnkit.backends.triton.runtime import tuning as _tuning
from attnkit.backends.triton.runtime.launch import Launch

attn_bwd_dkdv = Launch(_bwd.attn_bwd_dkdv)
attn_bwd_dq = Launch(_bwd_dq.attn_bwd_dq)
bwd_preprocess = Launch(_bwd.bwd_preprocess)

Tensor = torch.Tensor


def buffers(p: BwdParams) -> list:
    """Every tensor a backward launch may take, in the order replays pass them: [q, k, v, out (unit last
    stride), dout (contiguous), hi, lo (the forward's log2 row statistic, stats = (hi, lo)), delta, dq, dk,
    dv (allocated)], then every other tensor argument of ``p`` in field order."""
    q, k, v, out = c.unit_last(p.q), c.unit_last(p.k), c.unit_last(p.v), c.unit_last(p.out)
    hi, lo = p.stats.unbind(0)
    delta = torch.empty(hi.shape, device=q.device, dtype=torch.float32)  # rowsum(dO * O) - dLSE
    grads = [c.new(q.shape, q), c.new(k.shape, k), c.new(v.shape, v)]
    rest = [getattr(p, n) for n in _REST]
    return [q, k, v, out, p.dout.contiguous(), hi, lo, delta, *grads, *rest]


_REST = tuple(n for n in BwdParams.tensor_names() if n not in ("q", "k", "v", "out", "dout"))


def outputs(tensors: list) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, an empty dbias, an empty dsmod) from :func:`buffers`' list (replays: calls without bias
    or captured tensors wanting gradients)."""
    empty = torch.empty((0,), device=tensors[0].device, dtype=torch.float32)
    return (*tensors[8:11], empty, empty)


# The captured tensors' gradients are summed by atomic adds from every (key tile, head) program of dK/dV.
# Into one buffer, the adds of a small table (a T5 bias: 16 x 32 entries) queue on a few addresses: 796 ms for
# the forward+backward of B=2 H=16 S=8k D=128 causal (H200, run D), against 18 ms for the forward (the adds,
# by elimination: not profiled). Each program adds into copy (program index % copies) of the buffer instead,
# and the copies are summed after.
SMOD_COPIES = 256  # at most
SMOD_COPY_FLOATS = 1 << 22  # all copies together, float32 entries (16 MiB)


def smod_copies(n: int) -> int:
    """Copies of an ``n``-entry gradient buffer: as many as fit in SMOD_COPY_FLOATS, at most SMOD_COPIES."""
    return max(1, min(SMOD_COPIES, SMOD_COPY_FLOATS // max(n, 1)))


def smod_grads(p: BwdParams):
    """(float32 buffer (copies, n) of the captured tensors' gradients (zeros; slot order in each copy),
    [per-slot views of copy 0, or None]) for the slots ``p.smod_grad`` names; :func:`smod_sum` gives the
    gradients (n,) after the dK/dV kernel."""
    slots = (p.smod_c0, p.smod_c1, p.smod_c2, p.smod_c3)
    n = sum(t.numel() for i, t in enumerate(slots) if p.smod_grad >> i & 1)
    flat = torch.zeros((smod_copies(n), n), device=p.q.device, dtype=torch.float32)
    views, at = [], 0
    for i, t in enumerate(slots):
        if p.smod_grad >> i & 1:
            views.append(flat[0, at : at + t.numel()])
            at += t.numel()
        else:
            views.append(None)
    return flat, views


def smod_sum(flat: Tensor) -> Tensor:
    return flat[0] if flat.shape[0] == 1 else flat.sum(0)


def fake(p: BwdParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's fake (meta) implementation."""
    q, bias = p.q, p.bias
    grad = p.bias_grad and bias is not None
    dbias = bias.new_empty(bias.shape) if grad else q.new_empty((0,), dtype=torch.float32)
    slots = (p.smod_c0, p.smod_c1, p.smod_c2, p.smod_c3)
    n = sum(t.numel() for i, t in enumerate(slots) if p.smod_grad >> i & 1)
    dsmod = q.new_empty((n,), dtype=torch.float32)
    return q.new_empty(q.shape), p.k.new_empty(p.k.shape), p.v.new_empty(p.v.shape), dbias, dsmod


def body(p: BwdParams, keep=None):
    """The backward's work; ``keep`` (a list) gets the tensors its launches may take."""
    tensors = buffers(p)
    if keep is not None:
        keep += tensors
    q, k, v, out, dout, hi, lo, delta, dq, dk, dv = tensors[:11]
    layout, bias, slopes, dlse = p.layout, p.bias, p.alibi_slopes, p.dlse
    B, Hq, Hk = c.sizes(q, k, layout, p.cu_seqlens_q)
    D, Dv = q.shape[-1], v.shape[-1]
    Sq, Sk = p.max_seqlen_q, p.max_seqlen_k
    b4, sb = c.bias4(bias, B, Hq, Sq, Sk)
    flags = p.flags()
    bias_grad = flags["BIAS_GRAD"]
    dbias = (
        torch.zeros((B, Hq, Sq, Sk), device=q.device, dtype=torch.float32)
        if bias_grad
        else torch.empty((0,), device=q.device, dtype=torch.float32)
    )
    copies, g_views = smod_grads(p)
    if q.numel() == 0 or k.numel() == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv, _reduce_dbias(dbias, bias) if bias_grad else dbias, smod_sum(copies)
    varlen = flags["VARLEN"]
    dummy = q
    # every stride once (host time: each ``stride(i)`` is a call into torch)
    st_q, st_k, st_v = c.strides(q, layout), c.strides(k, layout), c.strides(v, layout)
    st_do, st_delta, st_lse = c.strides(dout, layout), c.lse_strides(delta, layout), c.lse_strides(hi, layout)
    BMP = 16 if _cap.interpreting() else 64
    bwd_preprocess[(c.cdiv(max(Sq, 1), BMP), B * Hq)](
        out,
        dout,
        dlse if dlse is not None else delta,
        delta,
        p.cu_seqlens_q if varlen else dummy,
        *c.strides(out, layout),
        *st_do,
        *(c.lse_strides(dlse, layout) if dlse is not None else st_delta),
        *st_delta,
        Hq,
        Sq,
        DV=Dv,
        BLOCK_DV=c.block_d(Dv),
        BLOCK_M=BMP,
        VARLEN=varlen,
        HAS_DLSE=dlse is not None,
    )
    slopes_arg = slopes if slopes is not None else dummy
    cu = (p.cu_seqlens_q if varlen else dummy, p.cu_seqlens_k if varlen else dummy, p.rng)
    inputs = (q, k, v, dout)
    input_strides = (st_q, st_k, st_v, st_do)  # (the kernels take each tensor's strides as one tuple)
    stat_strides = (*st_lse, *st_delta, sb)
    sizes = (Hq, Sq, Sk, *c.scalars(p, dummy))
    bias_arg = b4 if b4 is not None else dummy
    # the two kernels' runtime arguments, in their order (``kernels/bwd.py``, ``kernels/bwd_dq.py``)
    dkdv_args = (
        *(*inputs, dk, dv, hi, lo, delta, bias_arg, dbias if bias_grad else dummy, slopes_arg, *cu),
        *(*input_strides, c.strides(dk, layout), c.strides(dv, layout), *stat_strides),
        *(dbias.stride() if bias_grad else (0, 0, 0, 0), c.slope_strides(slopes), Hq, Hk, *sizes[1:]),
        *[dummy if g is None else g for g in g_views],  # (the captured tensors' gradients, copy 0)
        copies.stride(0) if copies.shape[0] > 1 else 0,
        copies.shape[0],
    )
    dq_args = (
        *(*inputs, dq, hi, lo, delta, bias_arg, slopes_arg, *cu),
        *(*input_strides, c.strides(dq, layout), *stat_strides, c.slope_strides(slopes), *sizes),
    )
    features = {n: f for n, f in flags.items() if n != "BIAS_GRAD"}  # (BIAS_GRAD: the dK/dV kernel's alone)
    common = c.constexprs(p, q, v, Hq, Hk, features)
    tune_key = BwdParams.tune_key(flags)
    fit_key = (tune_key, p.score_mod)  # (what a tile shape's resources depend on besides the tiles)
    hint = _tuning.hints(flags)

    def launch_dkdv(cfg):
        BM, BN, warps, stages = cfg
        grid = (c.cdiv(max(Sk, 1), BN), B * Hk)
        one_loop = _tuning.one_loop_dkdv(flags["HAS_LEFT"], flags["HAS_RIGHT"])
        ts, ts_flags = _tiles.launch_args(p, B, Hq, BM, BN, dummy)  # (a mask evaluated per tile)
        ivl, ivl_flags = _ivlists.launch_args(p, BM, BN, dummy, transposed=True)  # (a mask as data, listed)
        kw = c.kernel_constexprs(common, ts_flags, ivl_flags, {"REVERSE": False})
        with c.jit_hooks_off(kw["FEAT"].SCORE_MOD):
            attn_bwd_dkdv[grid](
                *dkdv_args,
                *ts,
                *ivl,
                BLOCK_M=BM,
                BLOCK_N=BN,
                BIAS_GRAD=bias_grad,
                ONE_LOOP=one_loop,
                SMOD_GRAD=p.smod_grad != 0,
                SCORE_MOD_BWD=c.score_mod_bwd_fn(p) if p.smod_grad else None,
                num_warps=warps,
                num_stages=stages,
                **kw,
            )

    def dq_extras(BM, BN):
        """The dQ launch's tile states and tile lists at BM x BN (made on the current stream: a side stream
        that reads them waits on it after)."""
        return _tiles.launch_args(p, B, Hq, BM, BN, dummy), _ivlists.launch_args(p, BM, BN, dummy)

    def launch_dq(cfg, stream=None, extras=None):
        BM, BN, warps, stages = cfg
        grid = (c.cdiv(max(Sq, 1), BM), B * Hq)
        reverse = flags["HAS_RIGHT"] and not flags["HAS_LEFT"]
        (ts, ts_flags), (ivl, ivl_flags) = dq_extras(BM, BN) if extras is None else extras
        kw = c.kernel_constexprs(common, ts_flags, ivl_flags, {"REVERSE": reverse})
        with c.jit_hooks_off(kw["FEAT"].SCORE_MOD):
            attn_bwd_dq[grid](*dq_args, *ts, *ivl, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages,
                              stream=stream, **kw)  # fmt: skip

    gluon_bwd = views = listed = None
    cap = _cap.capability(q.device) if q.is_cuda else None
    if cap is not None and p.plain() and _cap.gluon_backward_eligible(cap, layout, D, Dv, q.dtype, p.scale):
        gluon_bwd = c.gluon("bwd")
    elif (
        cap is not None
        and p.data_mask_only()
        and _cap.gluon_listed_backward_eligible(cap, layout, D, Dv, q.dtype, p.scale)
    ):  # a mask carried as data: the Gluon kernel on the transposed tile lists, where they are made
        gluon_bwd = c.gluon("bwd")
        listed = gluon_bwd.listed_args(p) if gluon_bwd is not None else None
        if listed is None:
            gluon_bwd = None
    if gluon_bwd is not None:
        views = gluon_bwd.tma_views(q, k, v, dout, dk, dv, layout)
    if views is not None and _cap.gluon_fused_dq(D, Sq, Sk, p.deterministic):  # dQ added by the dK/dV kernel
        dqa = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        args = (q, k, v, dout, hi, delta, dk, dv, layout, p.scale, p.causal, views, listed)
        gluon_bwd.launch_dkdv(*args, dqa=dqa)
        torch.mul(dqa, p.scale, out=dq)
        return dq, dk, dv, dbias, smod_sum(copies)
    if views is not None:  # the Hopper Gluon dK/dV kernel (None: strides a TMA descriptor cannot take)

        def run_dkdv():
            gluon_bwd.launch_dkdv(q, k, v, dout, hi, delta, dk, dv, layout, p.scale, p.causal, views, listed)

    else:
        cfg_dkdv = _tuning.pick("dkdv", D, Dv, q.dtype, tune_key, Sq, Sk, q.device, launch_dkdv, hint)

        def run_dkdv():
            _tuning.launch_fitting("dkdv", cfg_dkdv, fit_key, launch_dkdv, D, Dv, q.dtype)

    cfg_dq = _tuning.pick("dq", D, Dv, q.dtype, tune_key, Sq, Sk, q.device, launch_dq, hint)
    if q.is_cuda and _tuning.concurrent_backward(B * Hq * Sq * Sk):
        # dQ does not depend on dK/dV: on a side stream its programs fill the SMs that dK/dV's last
        # wave leaves idle (FlexAttention gets the same from one grid of both kinds of program)
        # (the launch takes the side stream's handle: no stream switch on the host)
        main = torch.cuda.current_stream(q.device)
        side = _side_stream(q.device)
        cfg_dq = _tuning.shrunk("dq", cfg_dq, fit_key)
        extras_dq = dq_extras(cfg_dq[0], cfg_dq[1])
        side.wait_stream(main)
        run_dkdv()

        def dq_on_side(cfg):
            extras = extras_dq
            if cfg != cfg_dq:  # (smaller tiles than planned: their states, made before the side stream reads)
                extras = dq_extras(cfg[0], cfg[1])
                side.wait_stream(main)
            launch_dq(cfg, side.cuda_stream, extras)

        _tuning.launch_fitting("dq", cfg_dq, fit_key, dq_on_side, D, Dv, q.dtype)
        main.wait_stream(side)
    else:
        run_dkdv()
        _tuning.launch_fitting("dq", cfg_dq, fit_key, launch_dq, D, Dv, q.dtype)
    return dq, dk, dv, _reduce_dbias(dbias, bias) if bias_grad else dbias, smod_sum(copies)


_SIDE_STREAMS: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    """One side stream per device, reused across calls (creating streams per call leaks them)."""
    key = torch.device(device).index
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[key]


def _reduce_dbias(dbias: Tensor, bias: Tensor) -> Tensor:
    """Sum the dense (B, Hq, Sq, Sk) gradient over the dims ``bias`` broadcast along."""
    shape4 = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    dims = [i for i in range(4) if shape4[i] == 1 and dbias.shape[i] != 1]
    g = dbias.sum(dim=dims, keepdim=True) if dims else dbias
    return g.reshape(bias.shape).to(bias.dtype)
