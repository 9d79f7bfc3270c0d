"""The score-mod compiler: a FlexAttention-style ``score_mod`` (a :class:`attnkit.mods.ScoreMod`) ->
a ``@triton.jit`` function the Triton backend's kernels inline, forward and backward.

Steps, one module each: :mod:`.trace` (``make_fx`` in fake mode -> aten graph, captured tensors),
:mod:`.lower` (graph -> Triton source of the value and its derivative in the score), :mod:`.cache` (source
-> imported module, on disk and in process). :func:`compile_score_mod` runs them, memoized per mod (by
its structure and the identity of the tensors it captures: tracing costs milliseconds); :func:`meta`
builds the int64 strides/sizes table the generated code reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from attnkit.compiler.cache import GENERATED, module_for
from attnkit.compiler.lower import MAX_DIMS, MAX_TENSORS, lower, lower_grads
from attnkit.compiler.trace import Unlowerable, trace

__all__ = ["Compiled", "GENERATED", "MAX_TENSORS", "Unlowerable", "compile_score_mod", "meta"]


@dataclass(frozen=True)
class Compiled:
    """A compiled score mod: ``fn`` the ``@triton.jit`` function ``(score, b, h, q, kv, off, SM) ->
    (value, dvalue)``, ``bwd`` the one that adds the gradients of the captured tensors in ``grad_slots``
    (those that required grad when compiled; None without), ``key`` their module's name (the op's string
    argument), ``tensors`` the captured tensors in slot order (the live objects: their values are read at
    run time)."""

    fn: object
    bwd: object
    key: str
    tensors: tuple
    grad_slots: tuple


REGISTRY: dict = {}  # key -> the generated module (the ops find a kernel's functions by its key)
_MEMO: dict = {}
_MAX_MEMO = 256


def _tensors_of(obj, out: list, depth: int = 0) -> list:
    """Every tensor a mod can read: a ScoreMod's params, parts and function; a function's closure cells,
    defaults and the globals its code names."""
    if depth > 8:
        return out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _tensors_of(x, out, depth + 1)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors_of(x, out, depth + 1)
    elif hasattr(obj, "_fn") and hasattr(obj, "params"):  # a ScoreMod / Mask
        _tensors_of(obj.params, out, depth + 1)
        _tensors_of(list(obj.parts), out, depth + 1)
        _tensors_of(obj._fn, out, depth + 1)
        if getattr(obj, "source", obj) is not obj:
            _tensors_of(obj.source, out, depth + 1)
    else:
        func = getattr(obj, "__func__", obj)
        code = getattr(func, "__code__", None)
        if code is None:
            return out
        for cell in func.__closure__ or ():
            with contextlib.suppress(ValueError):  # (an empty cell)
                _tensors_of(cell.cell_contents, out, depth + 1)
        _tensors_of(func.__defaults__ or (), out, depth + 1)
        g = getattr(func, "__globals__", {})
        for name in code.co_names:
            v = g.get(name)
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def compile_score_mod(mod) -> Compiled:
    """Trace, lower and load ``mod`` (a ScoreMod); raises :class:`Unlowerable` with the op and source line.
    Mods of one structure with other tensors (same dtypes and ranks) share one generated module."""
    from attnkit.dispatch import _structure

    found = _tensors_of(mod, [])
    key = (_structure(mod), tuple([id(t) for t in found]))
    hit = _MEMO.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[1], found)):
        if isinstance(hit[0], Unlowerable):
            raise hit[0]
        return hit[0]
    try:
        traced = trace(mod)
        src, tensors = lower(traced, mod)
        grad_slots = tuple(i for i, t in enumerate(tensors) if t.requires_grad and t.is_floating_point())
        bwd = lower_grads(traced, mod, set(grad_slots)) if grad_slots else None
        module = module_for(src if bwd is None else src + "\n\n" + bwd)
        name = module.__name__
        REGISTRY[name] = module
        fn_bwd = getattr(module, "score_mod_bwd", None)
        result = Compiled(module.score_mod, fn_bwd, name, tuple(tensors), grad_slots if fn_bwd else ())
    except Unlowerable as e:
        result = e
    if len(_MEMO) >= _MAX_MEMO:
        _MEMO.clear()
    _MEMO[key] = (result, tuple(found))
    if isinstance(result, Unlowerable):
        raise result
    return result


_META: dict = {}


def meta(tensors: tuple, device) -> torch.Tensor:
    """int64 (MAX_TENSORS, 2 * MAX_DIMS) on ``device``: per captured tensor its strides, then its sizes
    (zeros past its rank), cached by those numbers (no copy to the device after the first call)."""
    rows = []
    for i in range(MAX_TENSORS):
        if i < len(tensors):
            t = tensors[i]
            st = list(t.stride()) + [0] * (MAX_DIMS - t.dim())
            sz = list(t.shape) + [0] * (MAX_DIMS - t.dim())
            rows.append(tuple(st + sz))
        else:
            rows.append((0,) * (2 * MAX_DIMS))
    key = (str(device), tuple(rows))
    m = _META.get(key)
    if m is None:
        m = torch.tensor(rows, dtype=torch.int64, device=device)
        if len(_META) > 1024:
            _META.clear()
        _META[key] = m
    return m
