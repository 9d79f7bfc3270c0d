"""Find the tensors a callable captures (closures, globals, bound objects, modules).

Used to tell whether a ``score_mod``/``mask`` holds learnable tensors (then the call needs a backward) and
to fingerprint a mask for caching its block structure (tensor identity and in-place version counters).
"""

from __future__ import annotations

import torch


def captured_tensors(obj, depth: int = 0, seen: set | None = None) -> list[torch.Tensor]:
    """Tensors reachable from ``obj`` through function closures, the module-level names a function
    reads, bound methods, attnkit Mask/ScoreMod objects, containers, plain objects' attributes and
    nn.Module parameters and buffers, a few levels deep. What it cannot see into counts as nothing."""
    seen = set() if seen is None else seen
    if obj is None or depth > 6 or id(obj) in seen or torch.compiler.is_compiling():
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters()) + list(obj.buffers())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [t for x in obj for t in captured_tensors(x, depth + 1, seen)]
    if isinstance(obj, dict):
        return [t for x in obj.values() for t in captured_tensors(x, depth + 1, seen)]
    out: list[torch.Tensor] = []
    inner = getattr(obj, "_fn", None)  # attnkit Mask / ScoreMod
    if inner is not None and callable(inner):
        out += captured_tensors(inner, depth + 1, seen)
    if hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # bound method
        out += captured_tensors(obj.__self__, depth + 1, seen)
        out += captured_tensors(obj.__func__, depth + 1, seen)
    code, globs = getattr(obj, "__code__", None), getattr(obj, "__globals__", None)
    if code is not None and globs is not None:
        for name in code.co_names:
            val = globs.get(name)
            if isinstance(val, (torch.Tensor, torch.nn.Module)):
                out += captured_tensors(val, depth + 1, seen)
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            out += captured_tensors(cell.cell_contents, depth + 1, seen)
        except ValueError:  # an empty cell
            continue
    if code is None and inner is None and hasattr(obj, "__dict__") and not isinstance(obj, type):
        out += [t for x in vars(obj).values() for t in captured_tensors(x, depth + 1, seen)]
    return out
