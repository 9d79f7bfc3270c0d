"""The score-mod compiler: a FlexAttention-style ``score_mod`` (a :class:`attnkit.mods.ScoreMod`) ->
a ``@triton.jit`` function the Triton backend's kernels inline, forward and backward.

Steps, one module each: :mod:`.trace` (``make_fx`` in fake mode -> aten graph, captured tensors),
:mod:`.lower` (graph -> Triton source of the value and its derivative in the score; :mod:`.masked` adds,
for a mask folded into a mod, its condition and inner mod apart: the Triton backend's tile states),
:mod:`.cache` (source -> imported module, on disk and in process). :func:`compile_score_mod` runs them,
memoized per mod (by its structure and the identity of the tensors it captures: tracing costs
milliseconds); :func:`meta` builds the int64 strides/sizes table the generated code reads.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from attnkit.compiler.cache import GENERATED, module_for
from attnkit.compiler.lower import MAX_DIMS, MAX_TENSORS, lower, lower_grads
from attnkit.compiler.masked import lower_masked
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
_MEMO: dict = {}  # trace key -> (fn, bwd, module key, grad slots, slot -> place among the mod's tensors)
_MAX_MEMO = 256


def _leaves(obj, tensors: list, values: list, depth: int = 0) -> None:
    """What a mod can read, in a fixed walk order: tensors into ``tensors``, numbers and strings into
    ``values`` (a trace bakes those in). A ScoreMod's params, parts and function; a function's closure
    cells, defaults and the globals its code names."""
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        values.append(obj)
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            _leaves(x, tensors, values, depth + 1)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            values.append(k if isinstance(k, (bool, int, float, str)) else None)
            _leaves(x, tensors, values, depth + 1)
    elif hasattr(obj, "_fn") and hasattr(obj, "params"):  # a ScoreMod / Mask
        _leaves(obj.params, tensors, values, depth + 1)
        _leaves(list(obj.parts), tensors, values, depth + 1)
        _leaves(obj._fn, tensors, values, depth + 1)
        if getattr(obj, "source", obj) is not obj:
            _leaves(obj.source, tensors, values, depth + 1)
    else:
        func = getattr(obj, "__func__", obj)
        code = getattr(func, "__code__", None)
        if code is None:
            return
        for cell in func.__closure__ or ():
            with contextlib.suppress(ValueError):  # (an empty cell)
                _leaves(cell.cell_contents, tensors, values, depth + 1)
        _leaves(func.__defaults__ or (), tensors, values, depth + 1)
        g = getattr(func, "__globals__", {})
        for name in code.co_names:
            v = g.get(name)
            if v is None or isinstance(v, (torch.Tensor, bool, int, float, str)):
                _leaves(v, tensors, values, depth + 1)


def compile_score_mod(mod) -> Compiled:
    """Trace, lower and load ``mod`` (a ScoreMod); raises :class:`Unlowerable` with the op and source line.

    Memoized by what a trace depends on: the mod's structure (``dispatch._structure``: code objects,
    tensors' dtypes, ranks, devices, requires_grad), the numbers it reads (baked into the code), its
    tensors' shapes and which of them are one object; never their values. A hit skips the trace and takes
    the captured tensors from this mod (the memo keeps no tensor alive). Mods of one structure over other
    tensors generate the same source, so share one module either way."""
    from attnkit.dispatch import _structure

    found: list = []
    values: list = []
    _leaves(mod, found, values)
    first: dict = {}
    alias = tuple([first.setdefault(id(t), i) for i, t in enumerate(found)])
    shapes = tuple([(tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in found])
    try:
        key = (_structure(mod), tuple(values), shapes, alias)
        hash(key)
    except TypeError:  # (an unhashable value somewhere: no memo)
        key = None
    hit = _MEMO.get(key) if key is not None else None
    if hit is not None:
        if isinstance(hit, Unlowerable):
            raise hit
        fn, bwd, name, grad_slots, slot_map = hit
        return Compiled(fn, bwd, name, tuple([found[j] for j in slot_map]), grad_slots)
    try:
        traced = trace(mod, found[0].device if found else None)
        src, tensors = lower(traced, mod)
        grad_slots = tuple(i for i, t in enumerate(tensors) if t.requires_grad and t.is_floating_point())
        bwd = lower_grads(traced, mod, set(grad_slots)) if grad_slots else None
        # a mask folded into the mod (``kind="masked"``): its condition and inner mod apart, for tile states
        split = _split(traced, mod) if getattr(mod, "kind", None) == "masked" else None
        module = module_for("\n\n".join(x for x in (src, bwd, split) if x is not None))
        name = module.__name__
        REGISTRY[name] = module
        fn_bwd = getattr(module, "score_mod_bwd", None)
        result = Compiled(module.score_mod, fn_bwd, name, tuple(tensors), grad_slots if fn_bwd else ())
    except Unlowerable as e:
        result = e
    if key is not None:
        if len(_MEMO) >= _MAX_MEMO:
            _MEMO.clear()
        if isinstance(result, Unlowerable):
            _MEMO[key] = result
        else:  # slots by their place in the walk (a tensor made inside the mod has none: no memo then)
            ids = {id(t): i for i, t in reversed(list(enumerate(found)))}
            slot_map = tuple([ids.get(id(t)) for t in result.tensors])
            if None not in slot_map:
                _MEMO[key] = (result.fn, result.bwd, result.key, result.grad_slots, slot_map)
    if isinstance(result, Unlowerable):
        raise result
    return result


def _split(traced, mod) -> str | None:
    """:func:`lower_masked`'s source, or None where it fails (the mod then runs without tile states)."""
    try:
        return lower_masked(traced, mod)
    except Exception:  # noqa: BLE001 (an optimization: never a reason to refuse a mod that compiles)
        return None


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
