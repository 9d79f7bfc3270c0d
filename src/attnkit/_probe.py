"""Call-time checks of the programmable parts of a call (``mask``, ``score_mod``).

Three kinds, each raising :class:`AttentionInputError` naming the argument:

- arity: a user ``score_mod`` must take FlexAttention's 5 positional arguments, a ``mask_mod`` 4 (read off
  the signature, never by calling);
- sizes: library masks and mods compare their tensors with the call's B, Hq, Sq, Sk (``Mask.check`` /
  ``ScoreMod.check``: shapes, and values only where they are on the host);
- a probe: a user callable is evaluated once on a tiny grid of indices (the corners of the call: first and
  last batch row, head, query and key) to catch an out-of-range index (raised as IndexError on the CPU)
  and, for a ``score_mod``, a result that is a number, a 0-dim or non-float tensor or of the wrong shape.

Arity verdicts are cached per callable; probe verdicts per (callable, call signature: layout, B, Hq, the
longest Sq and Sk, dtype, device), in a weak dictionary, so a training loop probes once. Probes are skipped
under torch.compile and CUDA-graph capture; they launch a few tiny kernels and never read device values.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch

from attnkit.errors import AttentionInputError

_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # callable -> set of passed keys


def _seen(obj, key) -> bool:
    try:
        return key in _VERDICTS.get(obj, ())
    except TypeError:  # not weak-referenceable: check every time
        return False


def _remember(obj, key) -> None:
    with contextlib.suppress(TypeError):  # not weak-referenceable
        _VERDICTS.setdefault(obj, set()).add(key)


def check_arity(arg: str, fn, n: int, signature: str) -> None:
    """Raise unless ``fn`` accepts ``n`` positional arguments (callables without a signature pass)."""
    if _seen(fn, "arity"):
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*range(n))
    except TypeError:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise AttentionInputError(
            arg,
            f"a callable {signature}, taking {n} positional arguments (FlexAttention's signature)",
            f"{name}{sig}",
            "score_mod(score, b, h, q_idx, kv_idx) and mask_mod(b, h, q_idx, kv_idx)",
        ) from None
    _remember(fn, "arity")


def _has_user_part(obj) -> bool:
    return obj.kind in ("score_mod", "mask_mod") or any(_has_user_part(p) for p in obj.parts)


def _probes_allowed(call) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (call.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _probe_grid(call, Sq: int, Sk: int):
    """Index tensors (b, h, q, kv) at the call's corners and the lengths to bind, or None if empty.
    Dense layouts: a broadcast grid of 2 values per dim; thd: per-sequence (n, i, j) points along dim 0."""
    dev = call.device
    heads = torch.tensor(sorted({0, call.Hq - 1}), device=dev).view(1, -1, 1, 1)

    def col(vals):
        return torch.tensor(vals, device=dev)

    if call.layout != "thd":
        if not (call.batch and Sq and Sk):
            return None
        b, i, j = (col(sorted({0, n - 1})) for n in (call.batch, Sq, Sk))
        return b.view(-1, 1, 1, 1), heads, i.view(1, 1, -1, 1), j.view(1, 1, 1, -1), (Sq, Sk)
    lq, lk = call.seqlens_q, call.seqlens_k
    seqs = [n for n in range(len(lq)) if lq[n] and lk[n]]
    if not seqs:
        return None
    pick = sorted({seqs[0], seqs[-1], max(seqs, key=lq.__getitem__), max(seqs, key=lk.__getitem__)})
    pts = [(n, i, j) for n in pick for i in sorted({0, lq[n] - 1}) for j in sorted({0, lk[n] - 1})]
    b, i, j = (col(list(c)).view(-1, 1, 1, 1) for c in zip(*pts))
    return b, heads, i, j, call.lengths()


def _probe(arg: str, obj, call, Sq: int, Sk: int) -> None:
    grid = _probe_grid(call, Sq, Sk)
    if grid is None:
        return
    b, h, i, j, (q_len, kv_len) = grid
    where = f"B={call.batch}, Hq={call.Hq}, Sq={Sq}, Sk={Sk}" + (
        " (longest sequences)" * (call.layout == "thd")
    )
    fn = obj.bind(q_len, kv_len)
    sdt = torch.float32 if call.dtype in (torch.float16, torch.bfloat16) else call.dtype
    shape = torch.broadcast_shapes(b.shape, h.shape, i.shape, j.shape)
    with torch.no_grad():
        try:
            if arg == "score_mod":
                s = torch.randn(shape, dtype=sdt, device=call.device)
                out = fn(s, b, h, i, j)
            else:
                out = fn(b, h, i, j)
        except (IndexError, RuntimeError, TypeError) as e:
            raise AttentionInputError(
                arg,
                f"a callable defined at every (b, h, q_idx, kv_idx) of this call ({where})",
                f"{type(e).__name__} at the corner indices: {e}",
                "a tensor it reads is probably too small for these sizes",
            ) from e
    if arg == "score_mod":
        _check_score(out, shape)


def _check_score(out, shape) -> None:
    expected = "a score_mod returning a floating tensor shaped like `score` (e.g. score + bias)"
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        got = (
            f"a 0-dim tensor ({out.dtype})"
            if isinstance(out, torch.Tensor)
            else f"{type(out).__name__} {out!r}"
        )
        raise AttentionInputError(
            "score_mod", expected, got, "a single number gives every key the same score: return a tensor"
        )
    if not out.is_floating_point():
        raise AttentionInputError(
            "score_mod", expected, f"a {out.dtype} tensor", "to hide keys pass mask=, not a bool score_mod"
        )
    try:
        ok = torch.broadcast_shapes(out.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise AttentionInputError(
            "score_mod", expected, f"shape {tuple(out.shape)} for scores of shape {tuple(shape)}"
        )


def check_programmable(call) -> None:
    """Check ``call.mask`` and ``call.score_mod`` against the call (see the module docstring)."""
    seqlens = None
    if call.layout == "thd":
        if call.seqlens_q is None:  # lengths not known on the host (compile / graph capture)
            return
        seqlens = (call.seqlens_q, call.seqlens_k)
        Sq, Sk = max(call.seqlens_q, default=0), max(call.seqlens_k, default=0)
    else:
        Sq, Sk = call.Sq, call.Sk
    for arg, obj in (("mask", call.mask), ("score_mod", call.score_mod)):
        if obj is None:
            continue
        obj.check(call.batch, call.Hq, Sq, Sk, call.layout, seqlens)
        if not _has_user_part(obj) or not _probes_allowed(call):
            continue
        key = (call.layout, call.batch, call.Hq, Sq, Sk, call.dtype, call.device)
        user = obj.source
        if not _seen(user, key):
            _probe(arg, obj, call, Sq, Sk)
            _remember(user, key)
