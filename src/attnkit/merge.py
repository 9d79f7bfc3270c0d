"""Merging partial attention: ``merge_attention(outs, lses)``.

Attention over disjoint key sets of the same queries (split-KV decoding, shared-prefix / cascade decoding,
context parallelism) combines exactly through the log-sum-exp of each part::

    lse = logsumexp_i lse_i            out = sum_i exp(lse_i - lse) * out_i

A part with ``lse = -inf`` (it saw no key) contributes nothing; a row where every part is ``-inf`` gives
``out = 0`` and ``lse = -inf``. This is the one definition of the combine step in attnkit: the split-KV
decode, the cascade and ``attnkit.distributed`` all call it.
"""

from __future__ import annotations

import torch

from attnkit.errors import AttentionInputError

_LAYOUTS = ("bhsd", "bshd", "thd")


def _lse_view(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of ``lse`` (docs/api.md §1 shape for ``layout``) broadcastable against ``out``."""
    if layout == "bhsd":  # out (B, H, S, Dv), lse (B, H, S)
        return lse.unsqueeze(-1)
    if layout == "bshd":  # out (B, S, H, Dv), lse (B, H, S)
        return lse.transpose(1, 2).unsqueeze(-1)
    return lse.transpose(0, 1).unsqueeze(-1)  # out (T, H, Dv), lse (H, T)


def _lse_shape(out_shape: torch.Size, layout: str) -> tuple[int, ...]:
    if layout == "bhsd":
        return tuple(out_shape[:3])
    if layout == "bshd":
        return (out_shape[0], out_shape[2], out_shape[1])
    return (out_shape[1], out_shape[0])


def _check(outs, lses, layout: str):
    if layout not in _LAYOUTS:
        raise AttentionInputError("layout", f"one of {_LAYOUTS}", repr(layout))
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise AttentionInputError(
            "outs", "a list of tensors (and lses a list of the same length)", type(outs)
        )
    if len(outs) == 0 or len(outs) != len(lses):
        raise AttentionInputError(
            "lses", f"a non-empty list as long as outs ({len(outs)} parts)", f"{len(lses)} parts"
        )
    rank = 3 if layout == "thd" else 4
    first = outs[0]
    for i, (o, s) in enumerate(zip(outs, lses)):
        if not isinstance(o, torch.Tensor) or o.dim() != rank:
            raise AttentionInputError(f"outs[{i}]", f"a {rank}-D tensor for layout={layout!r}", _desc(o))
        if o.shape != first.shape or o.dtype != first.dtype or o.device != first.device:
            raise AttentionInputError(
                f"outs[{i}]", f"the shape, dtype and device of outs[0] ({_desc(first)})", _desc(o)
            )
        want = _lse_shape(first.shape, layout)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != want or s.device != first.device:
            raise AttentionInputError(f"lses[{i}]", f"a tensor of shape {want} on {first.device}", _desc(s))
        if not s.is_floating_point():
            raise AttentionInputError(f"lses[{i}]", "a floating-point (float32) tensor", _desc(s))


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__}"


def merge_reference(outs, lses, layout: str = "bhsd"):
    """The merge in plain PyTorch (differentiable): the definition the kernels match. Arithmetic in float32,
    or in float64 where the parts are float64 (lse then comes back in float64 too)."""
    work = torch.promote_types(torch.float32, torch.promote_types(outs[0].dtype, lses[0].dtype))
    lse_stack = torch.stack([s.to(work) for s in lses])  # (P, *lse_shape)
    m = lse_stack.amax(dim=0)
    finite = torch.isfinite(m)  # False where every part is -inf (or the row saw no key at all)
    m = torch.where(finite, m, torch.zeros_like(m)).detach()
    w = torch.exp(lse_stack - m)  # (P, ...): 0 for empty parts, never NaN
    total = w.sum(dim=0)
    total = torch.where(finite, total, torch.ones_like(total))  # no log(0) (its gradient would be NaN)
    lse = torch.where(finite, m + torch.log(total), torch.full_like(m, float("-inf")))
    out = None
    for o, wi in zip(outs, w):
        term = o.to(work) * _lse_view(wi / total, layout)
        out = term if out is None else out + term
    return out.to(outs[0].dtype), lse.to(torch.promote_types(torch.float32, lses[0].dtype))


def merge_attention(outs, lses, *, layout: str = "bhsd"):
    """Combine attention computed over disjoint key sets of the same queries.

    Args:
        outs: list of P tensors of one shape in a layout of ``attnkit.attention``: (B, H, S, Dv) for
            ``bhsd``, (B, S, H, Dv) for ``bshd``, (T, H, Dv) for ``thd``.
        lses: list of P float32 tensors, the matching log-sum-exp of each part: (B, H, S) for ``bhsd`` and
            ``bshd``, (H, T) for ``thd`` (what ``attention(..., return_lse=True)`` returns).
        layout: the layout of ``outs``.

    Returns:
        ``(out, lse)``: ``lse = logsumexp_i lse_i``, ``out = sum_i exp(lse_i - lse) * out_i`` (dtype of
        ``outs[0]``; lse float32). Parts with ``lse = -inf`` contribute nothing; rows where every part is
        ``-inf`` give 0 and ``-inf``. Differentiable in every ``outs[i]`` and ``lses[i]``.

    Without a gradient to keep, on CUDA (and in the Triton interpreter), one fused kernel
    (``backends/triton/kernels/combine.py``) reads every part once; otherwise plain PyTorch
    (:func:`merge_reference`) computes it.
    """
    _check(outs, lses, layout)
    if len(outs) == 1:
        return outs[0], lses[0].to(torch.promote_types(torch.float32, lses[0].dtype))
    if _fused(outs, lses):
        from attnkit.backends.triton.ops.combine import merge

        return merge(torch.stack(outs), torch.stack([s.float() for s in lses]), layout)
    return merge_reference(outs, lses, layout)


def _fused(outs, lses) -> bool:
    """Whether the fused combine kernel serves this merge: no gradient needed, CUDA (or the Triton
    interpreter on the CPU), a kernel dtype and head dim. Otherwise :func:`merge_reference` runs."""
    o = outs[0]
    if o.dtype not in (torch.float16, torch.bfloat16, torch.float32) or o.shape[-1] > 512:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*outs, *lses)):
        return False
    if o.device.type != "cuda" and o.device.type != "cpu":
        return False
    try:
        from attnkit.backends.triton.runtime import capability
    except ImportError:  # no triton
        return False
    return o.device.type == "cuda" or capability.interpreting()


__all__ = ["merge_attention", "merge_reference"]
