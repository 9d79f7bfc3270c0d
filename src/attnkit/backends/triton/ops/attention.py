"""The Triton backend's ``torch.library`` ops, their autograd formula, and the replays of repeated calls.

``attnkit::triton_fwd`` and ``attnkit::triton_bwd`` are custom ops whose arguments are the fields of
:class:`~attnkit.backends.triton.params.FwdParams` / ``BwdParams`` (schemas, fake implementations and what
autograd saves are derived from them), with fake (meta) implementations; the forward carries an autograd
formula that calls the backward op, so ``torch.compile(fullgraph=True)`` traces through them and CUDA graphs
can capture them (dropout seeds are drawn on the device). Eager calls take :func:`attention`, an
``autograd.Function`` over the same functions without the ops' host overhead. The launchers themselves are
``ops/fwd.py`` and ``ops/bwd.py``.
"""

from __future__ import annotations

import os

import torch

from attnkit.backends.triton import params as _params
from attnkit.backends.triton.kernels import fwd as _fwd_kernels
from attnkit.backends.triton.ops import bwd as _bwd
from attnkit.backends.triton.ops import common as _common
from attnkit.backends.triton.ops import fwd as _fwd
from attnkit.backends.triton.params import BwdParams, FwdParams
from attnkit.backends.triton.runtime import capability as _cap
from attnkit.backends.triton.runtime import launch as _launch
from attnkit.backends.triton.runtime import tuning as _tuning

# the launches (tests and scripts reach them here)
attn_fwd, attn_bwd_dkdv, attn_bwd_dq = _fwd.attn_fwd, _bwd.attn_bwd_dkdv, _bwd.attn_bwd_dq
bwd_preprocess = _bwd.bwd_preprocess
dropout_mask_kernel = _fwd_kernels.dropout_mask_kernel
draw_rng = _common.draw_rng
_gluon = _common.gluon

Tensor = torch.Tensor


def _triton_fwd(p: FwdParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward: (out in q's layout, lse float32, dropout rng state int64 (2,), row stats float32 (2, *lse)).

    A call that repeats an earlier one in everything but its tensors' addresses replays that call's
    launches (:func:`_replayed`)."""
    return _run("fwd", p, _fwd) if p.bias is None and p.q.is_cuda else _fwd.body(p)


def _triton_bwd(p: BwdParams) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: (dq, dk, dv, dbias, dsmod) with dbias shaped like ``bias`` (an empty tensor when not asked)
    and dsmod the gradients of the score mod's captured tensors that want one, flattened one after the other
    in slot order, float32 (empty without).

    Repeated calls replay too: the backward runs on autograd's device thread, where every line of Python
    costs about twice what it costs on the caller's thread (``scripts/gpu_host_threads.py``)."""
    return _run("bwd", p, _bwd) if p.bias is None and p.q.is_cuda and not p.smod_grad else _bwd.body(p)


# ----------------------------------------------------------------------------------------------------------
# replays: a repeated call's launches without the host work that chose them
# ----------------------------------------------------------------------------------------------------------
_REPLAYS: dict = {}  # key -> Replay, or False where the call cannot be replayed
_MAX_REPLAYS = 1024
REPLAY = True  # tests and A/B runs: False takes the full path every call
# every switch that changes which kernels run or how (read per call: tests and A/B runs flip them): the
# capability table's (each Gluon family's off switches) and the launchers' own
_SWITCHES = (
    *_cap.SWITCHES,
    "ATTNKIT_TRITON_BWD_LOOP",
    "ATTNKIT_TRITON_GLUON_DQ",
    "ATTNKIT_TRITON_BWD_STREAMS",
    "ATTNKIT_TRITON_AUTOTUNE",
    "ATTNKIT_TRITON_IV_SKIP",
    "ATTNKIT_TRITON_IV_BODY",
    "ATTNKIT_TRITON_IV_LIST",
    "ATTNKIT_TRITON_TILE_STATES",
)


def _replay_key(kind: str, p: FwdParams):
    """Everything a forward or backward call's launches depend on but its tensors' addresses: the
    parameters' (:meth:`FwdParams.replay_key`), the device, the switches; None where calls must take the
    full path (replays off, launch hooks set, tiles forced by tests)."""
    if not REPLAY or _tuning.FORCE or _launch.hooked():
        return None
    env = os.environ
    switches = tuple([env.get(name) for name in _SWITCHES])
    # (the current device too: a compiled kernel's handle belongs to the device it was launched on)
    device = (p.q.get_device(), _launch._current_device())
    return (p.replay_key(kind), device, switches, _common.POISON)


def _run(kind: str, p, launcher):
    """``launcher.body(p)``, or the replay of an earlier call with the same key."""
    key = _replay_key(kind, p)
    if key is None:
        return launcher.body(p)
    replay = _REPLAYS.get(key)
    if replay:
        tensors = launcher.buffers(p)
        replay(tensors)
        return launcher.outputs(tensors)
    return _replayed(key, replay, launcher.body, p)


def _replayed(key, known, body, p):
    """Run ``body(p)`` for a call with replay key ``key``, recording its launches, and remember them for the
    next call with the same key when every launch took the fast path (not the first call of a shape, which
    compiles or autotunes) and every tensor a launch took is one the replay can pass. Calls that can never
    be replayed (a side stream, a tensor made inside) are remembered as such."""
    if known is False:
        return body(p)
    keep: list = []
    tuned = _tuning.TUNED[0]
    with _launch.Recording() as rec:
        result = body(p, keep=keep)
    if rec.replayable and _tuning.TUNED[0] == tuned:  # (no autotuning trials in the log)
        if len(_REPLAYS) >= _MAX_REPLAYS:
            _REPLAYS.clear()
        _REPLAYS[key] = _launch.Replay.build(rec.log, keep) or False
    return result


triton_fwd = _params.op("attnkit::triton_fwd", FwdParams, _triton_fwd, _fwd.fake)
triton_bwd = _params.op("attnkit::triton_bwd", BwdParams, _triton_bwd, _bwd.fake, n_out=5)


# ----------------------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output, p: FwdParams | None = None):
    p = FwdParams(*inputs) if p is None else p
    out, _lse, rng, stats = output
    tensors, ctx.params = _params.saved(p, out, stats, rng)
    ctx.save_for_backward(*tensors)
    ctx.bias_grad = p.bias is not None and p.bias.requires_grad
    ctx.smod_grad = _smod_grad(p)


_SMOD_SLOTS = ("smod_c0", "smod_c1", "smod_c2", "smod_c3")
_SMOD_POS = tuple(_params._NAMES[FwdParams].index(n) for n in _SMOD_SLOTS)


def _smod_grad(p: FwdParams) -> int:
    """Bit i set: the score mod's captured tensor i wants its gradient."""
    bits = 0
    for i, name in enumerate(_SMOD_SLOTS):
        t = getattr(p, name)
        if t is not None and t.requires_grad:
            bits |= 1 << i
    return bits


def _backward(ctx, dout, dlse, _drng, _dstats, bwd=None):
    """The autograd formula: the backward op (what compiled graphs trace), or ``bwd`` in its place."""
    saved = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(saved[-3])  # (out)
    p = _params.restore(saved, ctx.params, dout, dlse, ctx.bias_grad, ctx.smod_grad)
    if bwd is not None:
        dq, dk, dv, dbias, dsmod = bwd(p)
    else:
        dq, dk, dv, dbias, dsmod = triton_bwd(*p.args())
    grads = [dq, dk, dv, dbias if ctx.bias_grad else None] + [None] * (_params.num_inputs() - 4)
    at = 0
    for i, pos in enumerate(_SMOD_POS):  # the captured tensors' gradients, from the flat buffer
        if ctx.smod_grad >> i & 1:
            t = getattr(p, _SMOD_SLOTS[i])
            grads[pos] = dsmod[at : at + t.numel()].view(t.shape).to(t.dtype)
            at += t.numel()
    return tuple(grads)


triton_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward, autograd formula and backward as the ops, without the ops' dispatch: eager calls
    only (see :func:`attention`)."""

    @staticmethod
    def forward(ctx, *inputs):
        p = FwdParams(*inputs)
        output = _triton_fwd(p)
        _setup_context(ctx, inputs, output, p)
        ctx.mark_non_differentiable(output[2], output[3])
        ctx.set_materialize_grads(False)  # an unused lse keeps dlse None: no dLSE work in backward
        return output

    @staticmethod
    def backward(ctx, dout, dlse, drng, dstats):
        return _backward(ctx, dout, dlse, drng, dstats, bwd=_triton_bwd)


def attention(p: FwdParams) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward with autograd: (out, lse, rng, stats) as :func:`_triton_fwd`. Under torch.compile (and
    export) it is the ``attnkit::triton_fwd`` op, which traces without graph breaks; eagerly it is a plain
    ``autograd.Function`` over the same functions, because the op's dispatch and autograd wrapper cost
    about 0.3 ms of host time per forward+backward (H200 machine, tiny shape: 1.19 ms per call through the
    op, 0.91 ms through the Function; scripts/gpu_host_overhead.py), and short sequences wait on the host.
    Other tracers (make_fx, fake or functional tensors) get the op too."""
    q, k, v, bias = p.q, p.k, p.v, p.bias
    if torch.compiler.is_compiling() or type(q) is not torch.Tensor or _dispatch_mode() is not None:
        return triton_fwd(*p.args())  # traced (dynamo, export, make_fx, fake or functional tensors)
    wants_grad = (
        q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)
    ) or (p.score_mod != "" and _smod_grad(p) != 0)
    if not (wants_grad and torch.is_grad_enabled()) and not _functorch_wrapped(q):
        return _triton_fwd(p)  # nothing to differentiate: the Function's plumbing costs ~15 us
    return _EagerAttention.apply(*p.args())


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
    BLOCK = 16 if _cap.interpreting() else 64
    grid = (_common.cdiv(rows, BLOCK), _common.cdiv(Sk, BLOCK))
    for i, h in enumerate(range(h0, h1)):
        if rows and Sk:
            dropout_mask_kernel[grid](rng, out[i], b * Hq + h, r0, rows, Sk, dropout_p, BLOCK=BLOCK)
    return out.bool()


def dropout_keep_fn(rng: Tensor, Hq: int, dropout_p: float):
    """A ``dropout_keep`` callback for :func:`attnkit.backends.reference.reference_forward`."""

    def keep(b, h0, h1, r0, rows, Sk, device):
        return dropout_keep_mask(rng, b, Hq, h0, h1, r0, rows, Sk, dropout_p).to(device)

    return keep
