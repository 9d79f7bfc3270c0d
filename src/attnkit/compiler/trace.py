"""Step 1 of the score-mod compiler: trace a score mod into a ``torch.fx`` graph of aten ops.

``trace(mod)`` runs ``mod._fn(score, b, h, q_idx, kv_idx, off)`` (a :class:`attnkit.mods.ScoreMod`; ``off``
is ``Sk - Sq``, which library mods read and user callables ignore) under ``make_fx`` in fake mode, on
example tensors of shape (1,): score float32, the indices int32, as the kernels pass them. Tensors the mod
captures (closure cells, globals, a library mod's table) become ``get_attr`` nodes whose values are the
captured tensors themselves. A data-dependent Python branch (``if score > 0:``) cannot be traced and is
refused, naming the user's source line.
"""

from __future__ import annotations

import inspect
import linecache
import traceback
from dataclasses import dataclass

import torch


class Unlowerable(Exception):
    """A score mod the compiler cannot turn into Triton code; ``str()`` is the reason (op and source line)."""


@dataclass
class Traced:
    """A traced score mod: ``gm`` the graph module (placeholders score, b, h, q, kv, off) and ``captured``
    the tensors its ``get_attr`` nodes name, by target."""

    gm: torch.fx.GraphModule
    captured: dict


def user_fn(mod):
    """The callable whose source the user wrote (a wrapped callable's, else the library mod's function)."""
    src = getattr(mod, "source", None)
    return src if callable(src) and src is not mod else getattr(mod, "_fn", mod)


def source_line(fn, tb=None) -> str:
    """``file:line: code`` of the innermost frame of ``tb`` inside ``fn``'s file, else ``fn``'s first line."""
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    if tb is not None and path is not None:
        for frame in reversed(traceback.extract_tb(tb)):
            if frame.filename == path:
                return f"{path}:{frame.lineno}: {(frame.line or '').strip()}"
    try:
        lines, start = inspect.getsourcelines(fn)
        return f"{path}:{start}: {lines[0].strip()}"
    except (OSError, TypeError):
        return f"{getattr(fn, '__qualname__', fn)} (no source)"


def examples(device=None) -> list[torch.Tensor]:
    """Fresh example inputs: score float32 (1,), b, h, q_idx, kv_idx, off int32 (1,) (distinct objects), on
    ``device`` (that of the tensors the mod captures: an index on another device than the table it reads
    fails to trace)."""
    score = torch.zeros(1, dtype=torch.float32, device=device)
    return [score] + [torch.zeros(1, dtype=torch.int32, device=device) for _ in range(5)]


def trace(mod, device=None) -> Traced:
    """Trace ``mod`` (a ScoreMod) into aten ops, with example inputs on ``device``; raises
    :class:`Unlowerable` where it cannot be traced."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = mod._fn
    try:
        gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*examples(device))
    except Exception as e:  # noqa: BLE001 (any failure to trace is a refusal with its reason)
        what = type(e).__name__
        if "DataDependent" in what or "data-dependent" in str(e) or "data dependent" in str(e):
            what = "a data-dependent Python branch or value (.item(), if/while on a tensor)"
        line = source_line(user_fn(mod), e.__traceback__)
        raise Unlowerable(f"score_mod cannot be traced: {what} at {line}") from None
    captured = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            captured[node.target] = getattr(gm, node.target)
    return Traced(gm, captured)


def op_line(mod, op) -> str:
    """The user's source line that calls aten op ``op``: the mod run once on real example tensors under a
    dispatch mode that stops at ``op``'s first call (the traceback then names the line)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Stop(Exception):
        pass

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is op or getattr(func, "overloadpacket", None) is getattr(op, "overloadpacket", op):
                raise _Stop
            return func(*args, **(kwargs or {}))

    fn = user_fn(mod)
    try:
        with torch.no_grad(), _Mode():
            mod._fn(*examples())
    except _Stop as e:
        return source_line(fn, e.__traceback__)
    except Exception:  # noqa: BLE001 (best effort: the mod's first line instead)
        pass
    linecache.checkcache()
    return source_line(fn)
