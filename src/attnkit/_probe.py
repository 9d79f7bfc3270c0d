"""Call-time checks of the programmable parts of a call (``mask``, ``score_mod``).

Three kinds, each raising :class:`AttentionInputError` naming the argument:

- arity: a user ``score_mod`` must take FlexAttention's 5 positional arguments, a ``mask_mod`` 4 (read off
  the signature, never by calling);
- sizes: library masks and mods compare their tensors with the call's B, Hq, Sq, Sk (``Mask.check`` /
  ``ScoreMod.check``: shapes, and values only where they are on the host);
- a probe: a user callable is evaluated once on a tiny grid of indices (first and last batch row, head,
  query and key, and a few between) to catch an out-of-range index (an IndexError on the CPU) and, for a
  ``score_mod``, a result that is a number, a 0-dim or non-float tensor, or of the wrong shape.

Verdicts are cached: arity per function code (or callable object); probes per (callable, call signature:
layout, B, Hq, the longest Sq and Sk, dtype, device), where a plain function is known by its code and its
captures (tensors by shape, dtype and device, numbers by value), so a loop that writes ``score_mod=lambda
...`` afresh each step probes once. Probes are skipped under torch.compile and CUDA-graph capture; they
launch a few tiny kernels and never read device values on the host.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref

import torch

from attnkit.errors import AttentionInputError

_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # callable -> set of passed keys
_ARITY_OK: set = set()  # (code, number of defaults, n) of plain functions that passed
_BY_CODE_MAX = 4096  # bound on the code-keyed caches (cleared when full)


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
    code = getattr(fn, "__code__", None)
    by_code = None
    if code is not None and getattr(fn, "__self__", None) is None:  # a plain function: its code decides
        by_code = (code, len(getattr(fn, "__defaults__", None) or ()), n)
        if by_code in _ARITY_OK:
            return
    elif _seen(fn, "arity"):
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
    if by_code is not None:
        if len(_ARITY_OK) >= _BY_CODE_MAX:
            _ARITY_OK.clear()
        _ARITY_OK.add(by_code)
    else:
        _remember(fn, "arity")


def _user_parts(obj) -> list:
    """The user callables inside a Mask / ScoreMod tree (wrapped with from_mask_mod / from_score_mod)."""
    if obj.kind in ("score_mod", "mask_mod"):
        return [obj.source]
    return [u for p in obj.parts for u in _user_parts(p)]


_SCALARS = (int, float, bool, str, type(None))
_BY_CODE: dict = {}  # (code keys, name, call key) -> True for probes that passed


def _code_key(fn):
    """A key for a plain function that is the same for every lambda made from the same source with the
    same captures (tensors by shape, dtype and device; numbers and strings by value): a training step that
    writes ``score_mod=lambda ...`` makes a new function each call, and is probed once. None when some
    capture is neither (then the callable object itself is the key)."""
    code = getattr(fn, "__code__", None)
    if code is None or getattr(fn, "__self__", None) is not None:
        return None
    caps = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            x = cell.cell_contents
        except ValueError:
            return None
        if isinstance(x, torch.Tensor):
            caps.append(("tensor", tuple(x.shape), x.dtype, x.device))
        elif isinstance(x, _SCALARS):
            caps.append((type(x), x))
        else:
            return None
    kwdefaults = getattr(fn, "__kwdefaults__", None)
    return code, tuple(caps), getattr(fn, "__defaults__", None), tuple(sorted((kwdefaults or {}).items()))


def _probes_allowed(call) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (call.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _spread(n: int, k: int, device) -> torch.Tensor:
    """``k`` positions spread over ``range(n)``, first and last included (repeats when n < k), built on the
    device without a host-to-device copy (``torch.tensor(list, device="cuda")`` would sync)."""
    return torch.arange(k, device=device) * (n - 1) // max(k - 1, 1)


def _probe_grid(call, Sq: int, Sk: int):
    """Index tensors (b, h, q, kv) at the call's corners and the lengths to bind, or None if empty.

    Dense layouts: a broadcast grid of 2 batch rows, 2 heads, 3 queries and 4 keys (distinct sizes, so a
    result that mixes up dims shows); thd: per-sequence (n, i, j) points along dim 0."""
    dev = call.device
    heads = _spread(call.Hq, 2, dev).view(1, -1, 1, 1)
    if call.layout != "thd":
        if not (call.batch and Sq and Sk):
            return None
        b, i, j = _spread(call.batch, 2, dev), _spread(Sq, 3, dev), _spread(Sk, 4, dev)
        return b.view(-1, 1, 1, 1), heads, i.view(1, 1, -1, 1), j.view(1, 1, 1, -1), (Sq, Sk)
    lq, lk = call.seqlens_q, call.seqlens_k
    seqs = [n for n in range(len(lq)) if lq[n] and lk[n]]
    if not seqs:
        return None
    pick = sorted({seqs[0], seqs[-1], max(seqs, key=lq.__getitem__), max(seqs, key=lk.__getitem__)})
    pts = [(n, i, j) for n in pick for i in {0, lq[n] - 1} for j in {0, lk[n] - 1}]
    # a pageable host-to-device copy without a stream sync (the driver stages it before returning)
    b, i, j = torch.tensor(pts).t().to(dev, non_blocking=True).view(3, -1, 1, 1, 1).unbind(0)
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
    shape = tuple(max(dims) for dims in zip(b.shape, h.shape, i.shape, j.shape))  # the grid, (4 dims)
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
    # the index tensors are 4-D: so is any score computed from them; each dim is the grid's or 1
    if out.dim() != len(shape) or any(o not in (1, g) for o, g in zip(out.shape, shape)):
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
        users = _user_parts(obj)
        if not users or not _probes_allowed(call):
            continue
        key = (arg, call.layout, call.batch, call.Hq, Sq, Sk, call.dtype, call.device)
        codes = [_code_key(u) for u in users]
        if all(c is not None for c in codes):
            try:
                full = (tuple(codes), obj.name, key)
                hash(full)
            except TypeError:  # an unhashable default argument
                full = None
        else:
            full = None
        if full is not None:
            if full not in _BY_CODE:
                _probe(arg, obj, call, Sq, Sk)
                if len(_BY_CODE) >= _BY_CODE_MAX:
                    _BY_CODE.clear()
                _BY_CODE[full] = True
        elif not _seen(obj.source, key):
            _probe(arg, obj, call, Sq, Sk)
            _remember(obj.source, key)
