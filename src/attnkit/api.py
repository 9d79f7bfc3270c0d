"""The public entry points: ``attention`` and ``explain``."""

from __future__ import annotations

import inspect
import os

import torch

from attnkit import dispatch
from attnkit._call import normalize
from attnkit.backends.reference import reference_forward

_ARGS = tuple(inspect.signature(normalize).parameters)[3:]  # attention()'s keyword arguments but backend
# Plain calls (no mask, mod, bias, ALiBi or packing) by signature: the validated call without its tensors
# and the backend chosen for it. A repeated signature skips the checks and the choice (host time: a decode
# step through attention() waits on it). Only calls that passed every check and ran are kept.
_PLAIN: dict = {}
_PLAIN_SIZE = 1024


def _plain_key(q, k, v, flags: tuple):
    """What a plain call's checks and choice depend on: the tensors' types, shapes, strides, dtypes,
    devices and grad flags, the flags with their types, grad mode, ``ATTNKIT_BACKEND``, the backends
    registered. None where it cannot be keyed (an argument that does not hash)."""
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return None
    key = (
        flags,
        tuple(map(type, flags)),
        tuple(map(type, flags[2])) if isinstance(flags[2], tuple) else None,
        q.shape, q.stride(), q.dtype, q.device, q.requires_grad,
        k.shape, k.stride(), k.dtype, k.device, k.requires_grad,
        v.shape, v.stride(), v.dtype, v.device, v.requires_grad,
        torch.is_grad_enabled(),
        os.environ.get("ATTNKIT_BACKEND", ""),
        dispatch.registry_size(),
    )  # fmt: skip
    try:
        hash(key)
    except TypeError:
        return None
    return key


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layout: str = "bhsd",
    causal: bool = False,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    score_mod=None,
    mask=None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    deterministic: bool = False,
):
    r"""Scaled dot-product attention with every common variant, on the fastest capable backend.

    Shapes (D = head dim of q and k, Dv = head dim of v; Hq a multiple of Hk for GQA/MQA, query head h
    reads key/value head ``h // (Hq // Hk)``):

    ======  ===============  ===============  ================  ================  ===========
    layout  q                k                v                 out               lse
    ======  ===============  ===============  ================  ================  ===========
    bhsd    (B, Hq, Sq, D)   (B, Hk, Sk, D)   (B, Hk, Sk, Dv)   (B, Hq, Sq, Dv)   (B, Hq, Sq)
    bshd    (B, Sq, Hq, D)   (B, Sk, Hk, D)   (B, Sk, Hk, Dv)   (B, Sq, Hq, Dv)   (B, Hq, Sq)
    thd     (Tq, Hq, D)      (Tk, Hk, D)      (Tk, Hk, Dv)      (Tq, Hq, Dv)      (Hq, Tq)
    ======  ===============  ===============  ================  ================  ===========

    For ``thd``, sequence n owns rows ``cu_seqlens[n]:cu_seqlens[n+1]`` (int32 (N+1,), both required);
    sequences never attend across each other and every index below is a position inside its sequence.

    Score pipeline for batch b (sequence n), query head h, query row i, key row j:
      1. ``s = scale * <q_i, k_j>`` (``scale`` defaults to 1/sqrt(D))
      2. ``softcap``: ``s = softcap * tanh(s / softcap)``
      3. ``s += bias[b, h, i, j]`` (``bias`` broadcastable to (B, Hq, Sq, Sk), or (N, Hq, max_Sq, max_Sk)
         for thd; it may require grad); ALiBi: ``s -= slope[h] * |i + (Sk - Sq) - j|``
         (``alibi_slopes`` float32 (Hq,) or (B, Hq))
      4. ``score_mod(s, b, h, i, j)`` (FlexAttention signature; elementwise, in plain PyTorch)
      5. visible iff ``causal``: ``j <= i + (Sk - Sq)``; ``window=(l, r)``:
         ``i + (Sk - Sq) - l <= j <= i + (Sk - Sq) + r`` (-1 = unbounded side); ``mask(b, h, i, j)``
      6. softmax over visible keys, dropout ``dropout_p`` (scaled by 1/(1-p)), weighted sum of v.

    ``causal`` is aligned to the bottom right, as FlashAttention >= 2.1 (█ = attend)::

        Sq=2, Sk=5:          Sq=5, Sk=2:          Sq=3, Sk=3:
          █ █ █ █ ·            · ·                  █ · ·
          █ █ █ █ █            · ·                  █ █ ·
                               · ·                  █ █ █
                               █ ·
                               █ █

    A query row with no visible key (the top rows of the middle picture) gives ``out = 0`` and
    ``lse = -inf``, never NaN, forward and backward.

    q, k and v may be DTensors sharded on the sequence dimension of a 1-D mesh (``Shard(2)`` for bhsd,
    ``Shard(1)`` for bshd), as under torch's ``context_parallel``: the call then runs
    ``attnkit.distributed.context_parallel_attention`` on the local shards, in torch's sharding order, and
    returns DTensors (docs/distributed.md, "With PyTorch's context_parallel").

    Args:
        mask: an :class:`attnkit.masks.Mask`, a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` callable, or a
            torch ``BlockMask`` (its ``mask_mod`` is used).
        return_lse: also return the float32 natural-log log-sum-exp of the final scores.
        backend: ``"auto"`` (fastest capable; ``ATTNKIT_BACKEND`` overrides) or a name from
            :func:`attnkit.backends`; a named backend that cannot serve raises ``UnsupportedError``.
        deterministic: backward without run-to-run variation.

    Returns:
        ``out`` with the dtype of q, or ``(out, lse)`` when ``return_lse``.

    Raises:
        AttentionInputError: a malformed argument (named in the message).
        UnsupportedError: the named backend cannot serve this call (the message lists why).
    """
    if type(q) is not torch.Tensor:  # DTensors sharded on the sequence: context parallelism
        args = dict(locals())
        from attnkit.distributed import _torch_cp

        if _torch_cp.is_dtensor(q, k, v):
            return _torch_cp.attention_on_dtensors(attention, args)
    q, k, v = _autocast(q, k, v)
    key = None
    if (
        alibi_slopes is None
        and bias is None
        and score_mod is None
        and mask is None
        and cu_seqlens_q is None
        and cu_seqlens_k is None
        and max_seqlen_q is None
        and max_seqlen_k is None
        and not torch.compiler.is_compiling()
    ):
        key = _plain_key(q, k, v, (layout, causal, window, softcap, scale, dropout_p, return_lse, backend,
                                   deterministic))  # fmt: skip
        hit = _PLAIN.get(key) if key is not None else None
        if hit is not None and dispatch.registered(hit[0]):  # a plain signature seen before: its checks hold
            chosen, template = hit
            call = template.with_tensors(q, k, v)
            out, lse = chosen.run(call)
            return (out, lse) if return_lse else out
    call = normalize(
        q,
        k,
        v,
        layout=layout,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        bias=bias,
        score_mod=score_mod,
        mask=mask,
        scale=scale,
        dropout_p=dropout_p,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        return_lse=return_lse,
        deterministic=deterministic,
    )
    if call.empty:
        # Nothing to attend to (no query rows, or no keys at all): zeros and -inf, exactly, on any backend.
        dispatch.get(backend) if backend != "auto" else None
        out, lse = reference_forward(call)
    else:
        chosen = dispatch.choose(call, backend)
        out, lse = chosen.run(call)
        if key is not None and out.requires_grad == call.requires_grad:
            if len(_PLAIN) >= _PLAIN_SIZE:
                _PLAIN.clear()
            _PLAIN[key] = (chosen, call.with_tensors(None, None, None))
    if call.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
        # Every query row had no visible key (e.g. thd sequences whose keys are all empty): the output is
        # constant zeros, but callers still backpropagate through it (zero gradients, never an error).
        inputs = sum(t.sum() for t in (call.q, call.k, call.v, call.bias) if t is not None)
        out = out + 0.0 * inputs.to(out.dtype)
    if return_lse:
        return out, lse
    return out


def _autocast(q, k, v):
    """Under torch.autocast, attention runs in the autocast dtype, as SDPA does (q, k and v often come
    out of autocast regions in different dtypes, e.g. rotary embeddings in float32 and v in bfloat16)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return q, k, v  # validation names the culprit
    dev = "cuda" if q.is_cuda else "cpu" if q.is_cpu else None  # (cheaper than q.device.type)
    if dev is None or not torch.is_autocast_enabled(dev):
        return q, k, v
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.is_floating_point() and t.dtype != dt else t for t in (q, k, v))


def explain(q, k, v, **kwargs) -> dispatch.Report:
    """Report (printable) of every backend for this call: chosen, or rejected with its reasons.

    Takes the same arguments as :func:`attention` (``backend`` included) and runs nothing.
    """
    backend = kwargs.pop("backend", "auto")
    q, k, v = _autocast(q, k, v)
    unknown = set(kwargs) - set(_ARGS)
    if unknown:
        raise TypeError(f"explain() got unexpected keyword arguments {sorted(unknown)}")
    call = normalize(q, k, v, **kwargs)
    _, report = dispatch.evaluate(call, backend)
    return report
