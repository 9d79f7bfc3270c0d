"""Launcher of the combine kernel (``kernels/combine.py``): merge P partial (out, lse) results.

:func:`combine_into` is the host side used by the split-KV decode and by ``attnkit.merge_attention``;
:func:`merge` serves ``merge_attention`` (forward only: the differentiable path is
``attnkit.merge.merge_reference``): the ``torch.library`` custom op :func:`merge_stacked` under
``torch.compile``, its function directly in eager calls (a custom op's dispatch costs tens of microseconds
a call, more than the merge of a decode step on the GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.backends.triton.runtime import capability as _cap
from attnkit.backends.triton.runtime import launch as _launch

_COMBINE = None


def _kernel():
    global _COMBINE
    if _COMBINE is None:
        from attnkit.backends.triton.kernels.combine import combine

        _COMBINE = _launch.Launch(combine)
    return _COMBINE


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _pow2(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


def combine_plan(parts, part_lse, out, lse) -> tuple | None:
    """The launch of :func:`combine_into` for tensors of these shapes and strides (any tensors or meta
    tensors): ``(grid, scalars, constexprs)``, the tensors ``(parts, part_lse, out, lse)`` to go first;
    None when there is no row. Host values only, so a caller may keep it for later calls of one shape."""
    P, d0, d1, d2, Dv = parts.shape
    if min(d0, d1, d2) == 0:
        return None
    block_r = 16 if _cap.interpreting() else min(64, _pow2(d2))
    grid = (_cdiv(d2, block_r), d1, d0)
    scalars = (P, d2, *parts.stride()[:4], *part_lse.stride(), *out.stride()[:3], *lse.stride())
    return grid, scalars, dict(DV=Dv, BLOCK_R=block_r, BLOCK_DV=_pow2(Dv), num_warps=4)


def launch_combine(plan: tuple, parts: Tensor, part_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Launch a :func:`combine_plan` on tensors of the shapes and strides it was made for."""
    grid, scalars, consts = plan
    _kernel()[grid](parts, part_lse, out, lse, *scalars, **consts)


def combine_into(parts: Tensor, part_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Merge ``parts`` (P, d0, d1, d2, Dv) with ``part_lse`` (P, d0, d1, d2) into ``out`` (d0, d1, d2, Dv)
    and ``lse`` (float32, (d0, d1, d2)); any strides, but the last dim of ``parts`` and ``out`` unit."""
    plan = combine_plan(parts, part_lse, out, lse)
    if plan is not None:
        launch_combine(plan, parts, part_lse, out, lse)


def _rows_view(t: Tensor, layout: str, lse: bool) -> Tensor:
    """View a (stacked, leading P) out or lse of ``layout`` as (P, d0, d1, d2[, Dv]) = (P, B, H, S[, Dv])."""
    if lse:
        return t.unsqueeze(1) if layout == "thd" else t  # (P, H, T) -> (P, 1, H, T)
    if layout == "bshd":
        return t.transpose(2, 3)  # (P, B, S, H, Dv) -> (P, B, H, S, Dv)
    if layout == "thd":
        return t.transpose(1, 2).unsqueeze(1)  # (P, T, H, Dv) -> (P, 1, H, T, Dv)
    return t


def _merge_stacked(outs: Tensor, lses: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """outs (P, *out shape of layout), lses float32 (P, *lse shape of layout) -> (out, lse) of that layout."""
    if outs.stride(-1) != 1:
        outs = outs.contiguous()
    out = torch.empty(outs.shape[1:], dtype=outs.dtype, device=outs.device)
    lse = torch.empty(lses.shape[1:], dtype=torch.float32, device=lses.device)
    combine_into(
        _rows_view(outs, layout, False),
        _rows_view(lses, layout, True),
        _rows_view(out.unsqueeze(0), layout, False)[0],
        _rows_view(lse.unsqueeze(0), layout, True)[0],
    )
    return out, lse


merge_stacked = torch.library.custom_op("attnkit::merge_stacked", mutates_args=())(_merge_stacked)


@merge_stacked.register_fake
def _(outs, lses, layout):
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:], dtype=torch.float32)


def merge(outs: Tensor, lses: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """:func:`merge_stacked` under ``torch.compile`` (traced through the custom op), its function eagerly."""
    if torch.compiler.is_compiling():
        return merge_stacked(outs, lses, layout)
    return _merge_stacked(outs, lses, layout)
