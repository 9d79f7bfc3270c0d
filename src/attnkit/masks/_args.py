"""Argument checks shared by the mask factories, and the window predicate they share."""

from __future__ import annotations

import torch

from attnkit.errors import AttentionInputError


def int_arg(factory: str, name: str, val, minimum: int):
    """Validate a factory's int argument (``val >= minimum``) and return it."""
    if not isinstance(val, int) or isinstance(val, bool) or val < minimum:
        raise AttentionInputError(name, f"{factory}: an int >= {minimum}", f"{type(val).__name__} {val!r}")
    return val


def int_tensor_arg(factory: str, name: str, val, dims: tuple[int, ...], shape_txt: str):
    """Validate a factory's integer tensor argument of one of the ranks ``dims``."""
    if (
        not isinstance(val, torch.Tensor)
        or val.dim() not in dims
        or val.is_floating_point()
        or val.is_complex()
        or val.dtype == torch.bool
    ):
        got = (
            f"tensor of shape {tuple(val.shape)}, dtype {val.dtype}"
            if isinstance(val, torch.Tensor)
            else (f"{type(val).__name__} {val!r}")
        )
        raise AttentionInputError(name, f"{factory}: an integer tensor of shape {shape_txt}", got)
    return val


def mask_error(expected: str, got, hint: str | None = None):
    """The error a mask's :meth:`Mask.check` raises: it names ``mask``, the argument of ``attention``."""
    raise AttentionInputError("mask", expected, got, hint)


def batch_check(factory: str, name: str, t, B: int, layout: str):
    """A per-batch tensor's first dim must be the call's batch (the number of sequences for thd)."""
    if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] != B:
        who = "the number of sequences N" if layout == "thd" else "the batch size B"
        mask_error(f"{factory}: `{name}` with a first dim of {B} ({who})", f"shape {tuple(t.shape)}")


def host_values(t: torch.Tensor):
    """``t.tolist()`` where reading values costs no device sync (a CPU tensor, eager), else None."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return t.tolist()


def window_ok(pos, kv, left: int, right: int):
    """``pos - left <= kv <= pos + right`` (-1 = unbounded side), as a bool tensor."""
    ok = torch.ones_like(pos + kv, dtype=torch.bool)
    if left >= 0:
        ok = ok & (kv >= pos - left)
    if right >= 0:
        ok = ok & (kv <= pos + right)
    return ok
