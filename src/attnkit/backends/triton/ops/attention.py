"""Host side of the Triton backend: layouts and strides, launch grids, and the ``torch.library`` ops.

``attnkit::triton_fwd`` and ``attnkit::triton_bwd`` are custom ops with fake (meta) implementations, and
the forward carries an autograd formula that calls the backward op, so ``torch.compile(fullgraph=True)``
traces through them and CUDA graphs can capture them (dropout seeds are drawn on the device). Eager calls
take :func:`attention`, an ``autograd.Function`` over the same functions without the ops' host overhead.

Tensor conventions (every launch): q/k/v/out/dO in the caller's layout with unit stride on the head dim,
read through (batch, head, row) strides; for ``thd`` the batch stride is 0 and each sequence starts at
``cu_seqlens[n]``. ``lse`` is (B, Hq, Sq) or (Hq, Tq) float32. Windows arrive as ``window_left`` /
``window_right`` (-1 = unbounded) with ``causal`` separately; the kernels get the right bound already
capped by causal.
"""

from __future__ import annotations

import os

import torch

from attnkit.backends.triton.kernels import bwd as _bwd
from attnkit.backends.triton.kernels import fwd as _fwd
from attnkit.backends.triton.runtime import launch as _launch
from attnkit.backends.triton.runtime import tuning as _tuning
from attnkit.backends.triton.runtime.launch import Launch

# every launch goes through Launch: the compiled kernel looked up from the arguments, without Triton's
# per-launch binding (host time is what short sequences wait on)
attn_fwd = Launch(_fwd.attn_fwd)
attn_bwd_dkdv = Launch(_bwd.attn_bwd_dkdv)
attn_bwd_dq = Launch(_bwd.attn_bwd_dq)
bwd_preprocess = Launch(_bwd.bwd_preprocess)
dropout_mask_kernel = _fwd.dropout_mask_kernel

Tensor = torch.Tensor

POISON = False  # tests: fill outputs with NaN before launch, so unwritten elements show


def _strides(t: Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, row) strides of a q/k/v-like tensor."""
    if layout == "bhsd":  # (B, H, S, D)
        return t.stride(0), t.stride(1), t.stride(2)
    if layout == "bshd":  # (B, S, H, D)
        return t.stride(0), t.stride(2), t.stride(1)
    return 0, t.stride(1), t.stride(0)  # thd: (T, H, D)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _sizes(q: Tensor, k: Tensor, layout: str, cu_q: Tensor | None) -> tuple[int, int, int]:
    """(B, Hq, Hk) of the call."""
    if layout == "thd":
        return cu_q.shape[0] - 1, q.shape[1], k.shape[1]
    if layout == "bhsd":
        return q.shape[0], q.shape[1], k.shape[1]
    return q.shape[0], q.shape[2], k.shape[2]


def _lse_shape(q: Tensor, layout: str, B: int, Hq: int) -> tuple[int, ...]:
    if layout == "thd":
        return (Hq, q.shape[0])
    return (B, Hq, q.shape[2] if layout == "bhsd" else q.shape[1])


def _lse_strides(lse: Tensor, layout: str) -> tuple[int, int, int]:
    if layout == "thd":  # (Hq, Tq)
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def _bias4(bias: Tensor | None, B: int, Hq: int, Sq: int, Sk: int):
    """Bias expanded (as a view) to (B, Hq, Sq, Sk) and its strides (0 on broadcast dims)."""
    if bias is None:
        return None, (0, 0, 0, 0)
    b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(B, Hq, Sq, Sk)
    return b4, tuple(b4.stride())


def _slope_strides(slopes: Tensor | None) -> tuple[int, int]:
    if slopes is None:
        return 0, 0
    return (0, slopes.stride(0)) if slopes.dim() == 1 else (slopes.stride(0), slopes.stride(1))


def _window(causal: bool, window_left: int, window_right: int) -> tuple[bool, bool, int, int]:
    """(HAS_LEFT, HAS_RIGHT, left, right) with causal folded into the right bound."""
    has_left = window_left >= 0
    if causal:
        right = min(window_right, 0) if window_right >= 0 else 0
        return has_left, True, max(window_left, 0), right
    return has_left, window_right >= 0, max(window_left, 0), max(window_right, 0)


def _tuning_iv_skip() -> bool:
    """Masks as data: ATTNKIT_TRITON_IV_SKIP=1 puts a branch around every key tile that skips the empty ones
    inside the narrowed range (default 0: no branch, so the software pipeline stays; empty tiles at the ends
    of a row's range are cut off either way). For A/B runs on the GPU."""
    return os.environ.get("ATTNKIT_TRITON_IV_SKIP", "0") not in ("", "0")


def _iv_args(startend: Tensor | None, summary: Tensor | None, dummy: Tensor) -> tuple:
    """Kernel arguments of a mask carried as data: (intervals, summary, their batch and head strides, 0 on
    broadcast dims); dummies without one."""
    if startend is None:
        return (dummy, dummy, 0, 0, 0, 0)

    def bh(t):
        return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)

    return (startend, summary, *bh(startend), *bh(summary))


def _block_d(d: int) -> int:
    """Padded head dim: the next power of two, at least 16 (plain Python: triton's helpers cost ~2 us a
    call, and every launch asks several times)."""
    return max(16, 1 << (d - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _defer(scale: float, softcap: float, bias, alibi_slopes) -> bool:
    """Plain positive scale: the kernels fold it into the exp2 FMA (``_pipeline.scores``' DEFER)."""
    return scale > 0 and softcap <= 0 and bias is None and alibi_slopes is None


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def draw_rng(device) -> Tensor:
    """Dropout state: int64 (2,) = (seed, offset) drawn from the device's default generator (seedable with
    ``torch.manual_seed``; capturable in CUDA graphs)."""
    return torch.randint(0, 2**62, (2,), device=device, dtype=torch.int64)


def _new(shape, like: Tensor, dtype=None) -> Tensor:
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON:
        t.fill_(float("nan"))
    return t


# ----------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------
def _triton_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    alibi_slopes: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    layout: str,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool = False,
    startend: Tensor | None = None,
    iv_summary: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward: (out in q's layout, lse float32, dropout rng state int64 (2,), row stats float32 (2, *lse)).

    The row stats (lse in log2 units, max score plus log2 of the exp-sum, as an unevaluated sum hi + lo)
    let the backward recompute probabilities exactly. ``deterministic`` is not used here: autograd hands it
    to the backward. ``startend`` / ``iv_summary``: a mask carried as data (``attnkit.masks._intervals``).

    A call that repeats an earlier one in everything but its tensors' addresses replays that call's
    launches (:func:`_replayed`)."""
    args = (q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, layout, max_seqlen_q, max_seqlen_k)
    args += (scale, causal, window_left, window_right, softcap, dropout_p, startend, iv_summary)
    key = _replay_key("fwd", args[:7] + args[16:], args[7:16]) if bias is None and q.is_cuda else None
    if key is None:
        return _fwd_body(*args)
    replay = _REPLAYS.get(key)
    if replay:
        tensors = _fwd_buffers(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, layout, dropout_p)
        tensors += [startend, iv_summary]
        replay(tensors)
        out, lse, stats, _, _, rng = tensors[3:9]
        return out, lse, rng, stats
    return _replayed(key, replay, _fwd_body, args)


def _fwd_buffers(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, layout, dropout_p) -> list:
    """Every tensor a forward launch may take, in the order replays pass them: [q, k, v (unit last
    stride), out, lse, stats, hi, lo (allocated; stats = (hi, lo)), rng (the dropout state), alibi_slopes,
    cu_seqlens_q, cu_seqlens_k]."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Hq, _ = _sizes(q, k, layout, cu_seqlens_q)
    out = _new(q.shape[:-1] + (v.shape[-1],), q)
    lse = _new(_lse_shape(q, layout, B, Hq), q, torch.float32)
    stats = _new((2,) + tuple(lse.shape), q, torch.float32)
    # without dropout the kernels never read the state: no fill (a launch of host time) for it
    rng = draw_rng(q.device) if dropout_p > 0 else torch.empty(2, dtype=torch.int64, device=q.device)
    return [q, k, v, out, lse, stats, *stats.unbind(0), rng, alibi_slopes, cu_seqlens_q, cu_seqlens_k]


def _fwd_body(
    q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, layout, max_seqlen_q, max_seqlen_k, scale,
    causal, window_left, window_right, softcap, dropout_p, startend=None, iv_summary=None, keep=None,
):  # fmt: skip
    """:func:`_triton_fwd`'s work; ``keep`` (a list) gets the tensors its launches may take."""
    tensors = _fwd_buffers(q, k, v, alibi_slopes, cu_seqlens_q, cu_seqlens_k, layout, dropout_p)
    if keep is not None:
        keep += tensors + [startend, iv_summary]
    q, k, v, out, lse, stats, hi, lo, rng = tensors[:9]
    B, Hq, Hk = _sizes(q, k, layout, cu_seqlens_q)
    D, Dv = q.shape[-1], v.shape[-1]
    Sq, Sk = max_seqlen_q, max_seqlen_k
    # plain calls (causal or not, no other feature) on Hopper: the warp-specialized Gluon kernel
    plain = bias is None and alibi_slopes is None and softcap <= 0 and dropout_p <= 0
    plain = plain and window_left < 0 and window_right < 0
    plain = plain and q.numel() > 0 and k.numel() > 0 and startend is None
    if q.is_cuda and _tuning.gluon_forward_eligible(
        _tuning.capability(q.device), layout, D, Dv, q.dtype, Sk, causal, plain, scale
    ):
        gluon = _gluon()
        done = gluon.try_forward(q, k, v, layout, scale, causal, (out, lse, stats)) if gluon else None
        if done is not None:  # (strides or alignment a TMA descriptor cannot take: the Triton kernel)
            return out, lse, rng, stats
    if out.numel() == 0:
        stats[0].fill_(float("inf"))
        stats[1].fill_(0.0)
        return out, lse.fill_(float("-inf")), rng, stats
    b4, sb = _bias4(bias, B, Hq, Sq, Sk)
    has_left, has_right, wl, wr = _window(causal, window_left, window_right)
    varlen = layout == "thd"
    dummy = q
    flags = (
        varlen,
        softcap > 0,
        bias is not None,
        alibi_slopes is not None,
        has_left,
        has_right,
        dropout_p > 0,
    )
    has_iv = startend is not None
    if has_iv:
        flags += (True,)
    iv_args = _iv_args(startend, iv_summary, dummy)

    def launch(cfg):
        BM, BN, warps, stages = cfg
        grid = (_cdiv(max(Sq, 1), BM), B * Hq)
        attn_fwd[grid](
            q,
            k,
            v,
            out,
            lse,
            hi,
            lo,
            b4 if b4 is not None else dummy,
            alibi_slopes if alibi_slopes is not None else dummy,
            cu_seqlens_q if varlen else dummy,
            cu_seqlens_k if varlen else dummy,
            rng,
            *_strides(q, layout),
            *_strides(k, layout),
            *_strides(v, layout),
            *_strides(out, layout),
            *_lse_strides(lse, layout),
            *sb,
            *_slope_strides(alibi_slopes),
            Hq,
            Sq,
            Sk,
            scale,
            softcap if softcap > 0 else 1.0,
            wl,
            wr,
            dropout_p,
            *iv_args,
            GROUP=Hq // Hk,
            D=D,
            DV=Dv,
            BLOCK_D=_block_d(D),
            BLOCK_DV=_block_d(Dv),
            BLOCK_M=BM,
            BLOCK_N=BN,
            VARLEN=varlen,
            SOFTCAP=softcap > 0,
            HAS_BIAS=bias is not None,
            HAS_ALIBI=alibi_slopes is not None,
            HAS_LEFT=has_left,
            HAS_RIGHT=has_right,
            DROPOUT=dropout_p > 0,
            REVERSE=has_right and not has_left,
            DEFER=_defer(scale, softcap, bias, alibi_slopes),
            PRECISION=_precision(q.dtype),
            HAS_IV=has_iv,
            IV_SKIP=has_iv and _tuning_iv_skip(),
            num_warps=warps,
            num_stages=stages,
        )

    cfg = _tuning.pick("fwd", D, Dv, q.dtype, flags, Sq, Sk, q.device, launch)
    launch(cfg)
    return out, lse, rng, stats


_GLUON: dict = {}


def _gluon(kind: str = "fwd"):
    """The Hopper Gluon module for ``kind`` ("fwd": ``_gluon_fwd``, "bwd": ``_gluon_bwd``), or None where
    this Triton has no Gluon (imported on first use)."""
    if kind not in _GLUON:
        try:
            if kind == "fwd":
                from attnkit.backends.triton.kernels.hopper import fwd as mod
            else:
                from attnkit.backends.triton.kernels.hopper import bwd as mod
        except ImportError:
            mod = None
        _GLUON[kind] = mod
    return _GLUON[kind]


triton_fwd = torch.library.custom_op("attnkit::triton_fwd", mutates_args=())(_triton_fwd)


@triton_fwd.register_fake
def _(
    q,
    k,
    v,
    bias,
    alibi_slopes,
    cu_seqlens_q,
    cu_seqlens_k,
    layout,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    causal,
    window_left,
    window_right,
    softcap,
    dropout_p,
    deterministic=False,
    startend=None,
    iv_summary=None,
):
    B, Hq, _ = _sizes(q, k, layout, cu_seqlens_q)
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    lse = q.new_empty(_lse_shape(q, layout, B, Hq), dtype=torch.float32)
    stats = q.new_empty((2,) + tuple(lse.shape), dtype=torch.float32)
    return out, lse, q.new_empty((2,), dtype=torch.int64), stats


# ----------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------
def _triton_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
    dlse: Tensor | None,
    bias: Tensor | None,
    alibi_slopes: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    rng: Tensor,
    layout: str,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    bias_grad: bool,
    deterministic: bool = False,
    startend: Tensor | None = None,
    iv_summary: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward: (dq, dk, dv, dbias) with dbias shaped like ``bias`` (an empty tensor when not asked).

    By default the dK/dV kernel, then a separate dQ pass (no atomics: bitwise reproducible, so
    ``deterministic=True`` changes nothing); ``ATTNKIT_TRITON_BWD=fused`` opts non-deterministic calls into
    one fused kernel (dK, dV, and dQ through fp32 atomic adds), measured slower since version 4
    (:func:`_tuning.fused_backward`).

    A call that repeats an earlier one in everything but its tensors' addresses replays that call's
    launches (:func:`_replayed`): the backward runs on autograd's device thread, where every line of
    Python costs about twice what it costs on the caller's thread (``scripts/gpu_host_threads.py``)."""
    args = (dout, q, k, v, out, stats, dlse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng, layout)
    args += (max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p)
    args += (bias_grad, deterministic, startend, iv_summary)
    fused = not deterministic and _tuning.fused_backward()
    key = None
    if bias is None and not fused and q.is_cuda:  # (bias and fused: work besides launches, not replayed)
        key = _replay_key("bwd", args[:12] + args[23:], args[12:23])
    if key is None:
        return _bwd_body(*args)
    replay = _REPLAYS.get(key)
    if replay:
        tensors = _bwd_buffers(dout, q, k, v, out, stats, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng)
        tensors += [startend, iv_summary]
        replay(tensors)
        return (*tensors[8:11], torch.empty((0,), device=q.device, dtype=torch.float32))
    return _replayed(key, replay, _bwd_body, args)


def _bwd_buffers(dout, q, k, v, out, stats, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng) -> list:
    """Every tensor a backward launch may take, in the order replays pass them: [q, k, v, out (unit last
    stride), dout (contiguous), hi, lo (the forward's log2 row statistic, stats = (hi, lo)), delta, dq, dk,
    dv (allocated), dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng]."""
    q, k, v, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out)
    hi, lo = stats.unbind(0)
    delta = torch.empty(hi.shape, device=q.device, dtype=torch.float32)  # rowsum(dO * O) - dLSE
    grads = [_new(q.shape, q), _new(k.shape, k), _new(v.shape, v)]
    return [
        q,
        k,
        v,
        out,
        dout.contiguous(),
        hi,
        lo,
        delta,
        *grads,
        dlse,
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        rng,
    ]


def _bwd_body(
    dout, q, k, v, out, stats, dlse, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng, layout,
    max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p, bias_grad,
    deterministic, startend=None, iv_summary=None, keep=None,
):  # fmt: skip
    """:func:`_triton_bwd`'s work; ``keep`` (a list) gets the tensors its launches may take."""
    tensors = _bwd_buffers(dout, q, k, v, out, stats, dlse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, rng)
    if keep is not None:
        keep += tensors + [startend, iv_summary]
    q, k, v, out, dout, hi, lo, delta, dq, dk, dv = tensors[:11]
    B, Hq, Hk = _sizes(q, k, layout, cu_seqlens_q)
    D, Dv = q.shape[-1], v.shape[-1]
    Sq, Sk = max_seqlen_q, max_seqlen_k
    fused = not deterministic and _tuning.fused_backward()
    # fused: dQ accumulates in fp32 (q's shape, contiguous); float32 inputs accumulate in dq itself
    if fused and q.dtype == torch.float32:
        dq = dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    else:
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if fused else dq
    b4, sb = _bias4(bias, B, Hq, Sq, Sk)
    bias_grad = bias_grad and bias is not None
    dbias = (
        torch.zeros((B, Hq, Sq, Sk), device=q.device, dtype=torch.float32)
        if bias_grad
        else torch.empty((0,), device=q.device, dtype=torch.float32)
    )
    if q.numel() == 0 or k.numel() == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv, _reduce_dbias(dbias, bias) if bias_grad else dbias
    has_left, has_right, wl, wr = _window(causal, window_left, window_right)
    varlen = layout == "thd"
    plain = bias is None and alibi_slopes is None and softcap <= 0 and dropout_p <= 0
    plain = plain and window_left < 0 and window_right < 0 and startend is None
    dummy = q
    has_iv = startend is not None
    iv_args = _iv_args(startend, iv_summary, dummy)
    # every stride once (host time: each ``stride(i)`` is a call into torch)
    st_q, st_k, st_v = _strides(q, layout), _strides(k, layout), _strides(v, layout)
    st_do, st_delta, st_lse = _strides(dout, layout), _lse_strides(delta, layout), _lse_strides(hi, layout)
    BMP = 16 if _tuning.interpreting() else 64
    bwd_preprocess[(_cdiv(max(Sq, 1), BMP), B * Hq)](
        out,
        dout,
        dlse if dlse is not None else delta,
        delta,
        cu_seqlens_q if varlen else dummy,
        *_strides(out, layout),
        *st_do,
        *(_lse_strides(dlse, layout) if dlse is not None else st_delta),
        *st_delta,
        Hq,
        Sq,
        DV=Dv,
        BLOCK_DV=_block_d(Dv),
        BLOCK_M=BMP,
        VARLEN=varlen,
        HAS_DLSE=dlse is not None,
    )
    bias_arg = b4 if b4 is not None else dummy
    slopes_arg = alibi_slopes if alibi_slopes is not None else dummy
    cu_q = cu_seqlens_q if varlen else dummy
    cu_k = cu_seqlens_k if varlen else dummy
    sdb = tuple(dbias.stride()) if bias_grad else (0, 0, 0, 0)
    common = dict(
        GROUP=Hq // Hk,
        D=D,
        DV=Dv,
        BLOCK_D=_block_d(D),
        BLOCK_DV=_block_d(Dv),
        VARLEN=varlen,
        SOFTCAP=softcap > 0,
        HAS_BIAS=bias is not None,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_LEFT=has_left,
        HAS_RIGHT=has_right,
        DROPOUT=dropout_p > 0,
        DEFER=_defer(scale, softcap, bias, alibi_slopes),
        PRECISION=_precision(q.dtype),
        HAS_IV=has_iv,
        IV_SKIP=has_iv and _tuning_iv_skip(),
    )
    scalars = (scale, softcap if softcap > 0 else 1.0, wl, wr, dropout_p, *iv_args)
    flags = (
        varlen,
        softcap > 0,
        bias is not None,
        bias_grad,
        alibi_slopes is not None,
        has_left,
        has_right,
        dropout_p > 0,
    ) + ((True,) if has_iv else ())

    def launch_dkdv(cfg):
        BM, BN, warps, stages = cfg
        grid = (_cdiv(max(Sk, 1), BN), B * Hk)
        attn_bwd_dkdv[grid](
            q,
            k,
            v,
            dout,
            dk,
            dv,
            dq_acc if fused else dummy,
            hi,
            lo,
            delta,
            bias_arg,
            dbias if bias_grad else dummy,
            slopes_arg,
            cu_q,
            cu_k,
            rng,
            *st_q,
            *st_k,
            *st_v,
            *st_do,
            *_strides(dk, layout),
            *_strides(dv, layout),
            *(_strides(dq_acc, layout) if fused else (0, 0, 0)),
            *st_lse,
            *st_delta,
            *sb,
            *sdb,
            *_slope_strides(alibi_slopes),
            Hq,
            Hk,
            Sq,
            Sk,
            *scalars,
            BLOCK_M=BM,
            BLOCK_N=BN,
            BIAS_GRAD=bias_grad,
            FUSED_DQ=fused,
            ONE_LOOP=_tuning.one_loop_dkdv(has_left, has_right),
            num_warps=warps,
            num_stages=stages,
            **common,
        )

    def launch_dq(cfg, stream=None):
        BM, BN, warps, stages = cfg
        grid = (_cdiv(max(Sq, 1), BM), B * Hq)
        attn_bwd_dq[grid](
            q,
            k,
            v,
            dout,
            dq,
            hi,
            lo,
            delta,
            bias_arg,
            slopes_arg,
            cu_q,
            cu_k,
            rng,
            *st_q,
            *st_k,
            *st_v,
            *st_do,
            *_strides(dq, layout),
            *st_lse,
            *st_delta,
            *sb,
            *_slope_strides(alibi_slopes),
            Hq,
            Sq,
            Sk,
            *scalars,
            BLOCK_M=BM,
            BLOCK_N=BN,
            REVERSE=has_right and not has_left,
            num_warps=warps,
            num_stages=stages,
            stream=stream,
            **common,
        )

    if fused:
        # autotuning runs the kernel several times: its atomic adds land in dq_acc, so clear it after
        cfg = _tuning.pick("bwd", D, Dv, q.dtype, flags, Sq, Sk, q.device, launch_dkdv, reset=dq_acc.zero_)
        launch_dkdv(cfg)
        if dq_acc is not dq:
            dq.copy_(dq_acc)
    else:
        gluon_bwd = views = None
        if q.is_cuda and _tuning.gluon_backward_eligible(
            _tuning.capability(q.device), layout, D, Dv, q.dtype, plain, scale, fused
        ):
            gluon_bwd = _gluon("bwd")
            views = gluon_bwd.tma_views(q, k, v, dout, dk, dv, layout) if gluon_bwd is not None else None
        if views is not None:  # the Hopper Gluon dK/dV kernel (None: strides a TMA descriptor cannot take)

            def run_dkdv():
                gluon_bwd.launch_dkdv(q, k, v, dout, hi, delta, dk, dv, layout, scale, causal, views)

        else:
            cfg_dkdv = _tuning.pick("dkdv", D, Dv, q.dtype, flags, Sq, Sk, q.device, launch_dkdv)

            def run_dkdv():
                launch_dkdv(cfg_dkdv)

        cfg_dq = _tuning.pick("dq", D, Dv, q.dtype, flags, Sq, Sk, q.device, launch_dq)
        if q.is_cuda and _tuning.concurrent_backward(B * Hq * Sq * Sk):
            # dQ does not depend on dK/dV: on a side stream its programs fill the SMs that dK/dV's last
            # wave leaves idle (FlexAttention gets the same from one grid of both kinds of program)
            # (the launch takes the side stream's handle: no stream switch on the host)
            main = torch.cuda.current_stream(q.device)
            side = _side_stream(q.device)
            side.wait_stream(main)
            run_dkdv()
            launch_dq(cfg_dq, side.cuda_stream)
            main.wait_stream(side)
        else:
            run_dkdv()
            launch_dq(cfg_dq)
    return dq, dk, dv, _reduce_dbias(dbias, bias) if bias_grad else dbias


# ----------------------------------------------------------------------------------------------------------
# replays: a repeated call's launches without the host work that chose them
# ----------------------------------------------------------------------------------------------------------
_REPLAYS: dict = {}  # key -> Replay, or False where the call cannot be replayed
_MAX_REPLAYS = 1024
REPLAY = True  # tests and A/B runs: False takes the full path every call
# every switch that changes which kernels run or how (read per call: tests and A/B runs flip them)
_SWITCHES = (
    "ATTNKIT_TRITON_GLUON",
    "ATTNKIT_TRITON_GLUON_BWD",
    "ATTNKIT_TRITON_BWD",
    "ATTNKIT_TRITON_BWD_LOOP",
    "ATTNKIT_TRITON_BWD_STREAMS",
    "ATTNKIT_TRITON_AUTOTUNE",
    "ATTNKIT_TRITON_IV_SKIP",
)


def _replay_key(kind: str, tensors: tuple, scalars: tuple):
    """Everything a forward or backward call's launches depend on but its tensors' addresses: each
    tensor's shape, strides, dtype and address mod 16 (Triton specializes on 16-byte alignment), which
    tensors are the same object, the scalar arguments, the device, the switches; None where calls must
    take the full path (replays off, launch hooks set, tiles forced by tests)."""
    if not REPLAY or _tuning.FORCE or _launch.hooked():
        return None
    sig = tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15) for t in tensors])
    first: dict = {}  # which tensors are one object (cu_seqlens_q is cu_seqlens_k, q is k): the first index
    same = tuple([first.setdefault(id(t), i) for i, t in enumerate(tensors) if t is not None])
    env = os.environ
    switches = tuple([env.get(name) for name in _SWITCHES])
    device = tensors[1 if kind == "bwd" else 0].get_device()
    # (the current device too: a compiled kernel's handle belongs to the device it was launched on)
    return (kind, sig, same, scalars, device, _launch._current_device(), switches, POISON)


def _replayed(key, known, body, args):
    """Run ``body(*args)`` for a call with replay key ``key``, recording its launches, and remember them
    for the next call with the same key when every launch took the fast path (not the first call of a
    shape, which compiles or autotunes) and every tensor a launch took is one the replay can pass. Calls
    that can never be replayed (a side stream, a tensor made inside) are remembered as such."""
    if known is False:
        return body(*args)
    keep: list = []
    tuned = _tuning.TUNED[0]
    with _launch.Recording() as rec:
        result = body(*args, keep=keep)
    if rec.replayable and _tuning.TUNED[0] == tuned:  # (no autotuning trials in the log)
        if len(_REPLAYS) >= _MAX_REPLAYS:
            _REPLAYS.clear()
        _REPLAYS[key] = _launch.Replay.build(rec.log, keep) or False
    return result


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


triton_bwd = torch.library.custom_op("attnkit::triton_bwd", mutates_args=())(_triton_bwd)


@triton_bwd.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    stats,
    dlse,
    bias,
    alibi_slopes,
    cu_seqlens_q,
    cu_seqlens_k,
    rng,
    layout,
    max_seqlen_q,
    max_seqlen_k,
    scale,
    causal,
    window_left,
    window_right,
    softcap,
    dropout_p,
    bias_grad,
    deterministic=False,
    startend=None,
    iv_summary=None,
):
    dbias = (
        bias.new_empty(bias.shape)
        if (bias_grad and bias is not None)
        else q.new_empty((0,), dtype=torch.float32)
    )
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


# ----------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------
_FWD_ARGS = (
    "q",
    "k",
    "v",
    "bias",
    "alibi_slopes",
    "cu_seqlens_q",
    "cu_seqlens_k",
    "layout",
    "max_seqlen_q",
    "max_seqlen_k",
    "scale",
    "causal",
    "window_left",
    "window_right",
    "softcap",
    "dropout_p",
    "deterministic",
    "startend",
    "iv_summary",
)


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_ARGS, inputs))
    out, _lse, rng, stats = output
    ctx.save_for_backward(
        args["q"],
        args["k"],
        args["v"],
        out,
        stats,
        rng,
        args["bias"],
        args["alibi_slopes"],
        args["cu_seqlens_q"],
        args["cu_seqlens_k"],
        args.get("startend"),
        args.get("iv_summary"),
    )
    ctx.params = {n: args[n] for n in _FWD_ARGS[7:17]}
    ctx.bias_grad = args["bias"] is not None and args["bias"].requires_grad


def _backward(ctx, dout, dlse, _drng, _dstats, bwd=None):
    """The autograd formula: the backward op (what compiled graphs trace), or ``bwd`` in its place."""
    q, k, v, out, stats, rng, bias, slopes, cu_q, cu_k, startend, iv_summary = ctx.saved_tensors
    p = ctx.params
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dbias = (bwd or triton_bwd)(
        dout,
        q,
        k,
        v,
        out,
        stats,
        dlse,
        bias,
        slopes,
        cu_q,
        cu_k,
        rng,
        p["layout"],
        p["max_seqlen_q"],
        p["max_seqlen_k"],
        p["scale"],
        p["causal"],
        p["window_left"],
        p["window_right"],
        p["softcap"],
        p["dropout_p"],
        ctx.bias_grad,
        p["deterministic"],
        startend,
        iv_summary,
    )
    return (dq, dk, dv, dbias if ctx.bias_grad else None) + (None,) * (len(_FWD_ARGS) - 4)


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward, autograd formula and backward as the ops, without the ops' dispatch: eager calls
    only (see :func:`attention`)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _triton_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.set_materialize_grads(False)  # an unused lse keeps dlse None: no dLSE work in backward
        return output

    @staticmethod
    def backward(ctx, dout, dlse, drng, dstats):
        return _backward(ctx, dout, dlse, drng, dstats, bwd=_triton_bwd)


def attention(*inputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward with autograd, arguments as :func:`triton_fwd`. Under torch.compile (and export) it is
    the ``attnkit::triton_fwd`` op, which traces without graph breaks; eagerly it is a plain
    ``autograd.Function`` over the same functions, because the op's dispatch and autograd wrapper cost
    about 0.3 ms of host time per forward+backward (H200 machine, tiny shape: 1.19 ms per call through the
    op, 0.91 ms through the Function; scripts/gpu_host_overhead.py), and short sequences wait on the host.
    Other tracers (make_fx, fake or functional tensors) get the op too."""
    q, k, v, bias = inputs[:4]
    if torch.compiler.is_compiling() or type(q) is not torch.Tensor or _dispatch_mode() is not None:
        return triton_fwd(*inputs)  # traced (dynamo, export, make_fx, fake or functional tensors)
    wants_grad = (
        q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not (wants_grad and torch.is_grad_enabled()) and not _functorch_wrapped(q):
        return _triton_fwd(*inputs)  # nothing to differentiate: the Function's plumbing costs ~15 us
    return _EagerAttention.apply(*inputs)


def _functorch_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a functorch (vmap, grad transform) wrapper: those keep going through the Function."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))


def _dispatch_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


# ----------------------------------------------------------------------------------------------------------
# helpers for tests and benchmarks
# ----------------------------------------------------------------------------------------------------------
def dropout_keep_mask(
    rng: Tensor, b: int, Hq: int, h0: int, h1: int, r0: int, rows: int, Sk: int, dropout_p: float
) -> Tensor:
    """The kernels' keep mask for batch (sequence) ``b``, heads h0:h1, rows r0:r0+rows, keys 0:Sk -> bool
    (h1 - h0, rows, Sk), on rng's device. Indices are positions inside the sequence."""
    out = torch.empty((h1 - h0, rows, Sk), dtype=torch.int8, device=rng.device)
    BLOCK = 16 if _tuning.interpreting() else 64
    grid = (_cdiv(rows, BLOCK), _cdiv(Sk, BLOCK))
    for i, h in enumerate(range(h0, h1)):
        if rows and Sk:
            dropout_mask_kernel[grid](rng, out[i], b * Hq + h, r0, rows, Sk, dropout_p, BLOCK=BLOCK)
    return out.bool()


def dropout_keep_fn(rng: Tensor, Hq: int, dropout_p: float):
    """A ``dropout_keep`` callback for :func:`attnkit.backends.reference.reference_forward`."""

    def keep(b, h0, h1, r0, rows, Sk, device):
        return dropout_keep_mask(rng, b, Hq, h0, h1, r0, rows, Sk, dropout_p).to(device)

    return keep
