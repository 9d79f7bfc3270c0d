"""What every backend module provides, and helpers they share (layouts, work estimates).

A backend answers two questions: ``why_not(call)`` (empty list = it can serve the call exactly) and
``run(call) -> (out, lse or None)``. It also estimates its own time with ``cost(call)`` so the dispatcher
can rank capable backends, and may attach ``notes(call)`` (caveats shown by ``attnkit.explain``).
Backends never import each other; the dispatcher owns the choice.
"""

from __future__ import annotations

import functools

import torch

from attnkit._call import AttentionCall


class Backend:
    """Base class. Subclasses set ``name`` and override the methods below."""

    name: str = "?"
    description: str = ""

    @functools.cached_property
    def _availability(self) -> tuple[bool, str | None]:
        try:
            return self._check_available()
        except Exception as e:  # an optional package that fails to import is simply unavailable
            return False, f"{type(e).__name__}: {e}"

    def available(self) -> tuple[bool, str | None]:
        """(True, None), or (False, why) when this backend cannot run here at all."""
        return self._availability

    def _check_available(self) -> tuple[bool, str | None]:
        return True, None

    def why_not(self, call: AttentionCall) -> list[str]:
        raise NotImplementedError

    def run(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def cost(self, call: AttentionCall) -> float:
        """Estimated seconds for this call (only the ranking matters)."""
        return float("inf")

    def notes(self, call: AttentionCall) -> list[str]:
        return []


# -- layouts --------------------------------------------------------------------------------------------
def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a (B, S, H, D) tensor as (B, H, S, D); bhsd passes through."""
    return x.transpose(1, 2) if layout == "bshd" else x


def from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2) if layout == "bshd" else x


def sequence_slices(call: AttentionCall):
    """For thd calls: yields (n, q_rows slice, k_rows slice) per sequence (reads cu_seqlens on the host)."""
    cq = call.cu_seqlens_q.tolist()
    ck = call.cu_seqlens_k.tolist()
    for n in range(len(cq) - 1):
        yield n, slice(cq[n], cq[n + 1]), slice(ck[n], ck[n + 1])


def seqlens(call: AttentionCall) -> tuple[list[int], list[int]]:
    if call.seqlens_q is not None:
        return call.seqlens_q, call.seqlens_k
    cq, ck = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    return [b - a for a, b in zip(cq, cq[1:])], [b - a for a, b in zip(ck, ck[1:])]


# -- work estimates ---------------------------------------------------------------------------------------
def visible_pairs_bound(call: AttentionCall) -> float:
    """Number of (query, key) pairs per head that causal/window leave visible (masks not counted)."""
    if call.layout == "thd":
        lq, lk = seqlens(call)
        return float(sum(_visible_pairs(a, b, call.causal, call.window) for a, b in zip(lq, lk)))
    return float(call.batch * _visible_pairs(call.Sq, call.Sk, call.causal, call.window))


def dense_pairs(call: AttentionCall) -> float:
    if call.layout == "thd":
        lq, lk = seqlens(call)
        return float(sum(a * b for a, b in zip(lq, lk)))
    return float(call.batch * call.Sq * call.Sk)


def _visible_pairs(Sq: int, Sk: int, causal: bool, window) -> int:
    """Exact count of visible pairs for bottom-right causal / window constraints."""
    if Sq == 0 or Sk == 0:
        return 0
    off = Sk - Sq
    lo_w, hi_w = window if window is not None else (-1, -1)
    total = 0
    # Per row i the visible keys are [max(0, i+off-l), min(Sk-1, i+off+r)] with causal capping r at 0.
    # Closed form would be fiddly with clipping; rows are cheap to sum in chunks with torch.
    i = torch.arange(Sq, dtype=torch.int64)
    pos = i + off
    lo = torch.zeros_like(pos) if lo_w < 0 else (pos - lo_w).clamp(min=0)
    hi_lim = pos if causal else torch.full_like(pos, Sk - 1)
    if hi_w >= 0:
        hi_lim = torch.minimum(hi_lim, pos + hi_w)
    hi = hi_lim.clamp(max=Sk - 1)
    total = int((hi - lo + 1).clamp(min=0).sum())
    return total


def attention_flops(call: AttentionCall, backward: bool = False, dense: bool = False) -> float:
    """Matmul FLOPs of the call: 2*D + 2*Dv per visible pair and query head (x3.5 with backward)."""
    pairs = dense_pairs(call) if dense else visible_pairs_bound(call)
    f = pairs * call.Hq * 2.0 * (call.D + call.Dv)
    return f * (3.5 if backward else 1.0)
