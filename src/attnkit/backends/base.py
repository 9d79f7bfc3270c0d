"""What every backend module provides, and helpers they share (layouts, work estimates).

A backend answers two questions: ``why_not(call)`` (empty list = it can serve the call exactly) and
``run(call) -> (out, lse or None)``. It also estimates its own time with ``cost(call)`` so the dispatcher
can rank capable backends, and may attach ``notes(call)`` (caveats shown by ``attnkit.explain``). The
estimate is a roofline: ``max(compute_seconds, memory_seconds) + overhead_seconds``, the memory side from
the one rule in ``_roofline.py`` with the backend's grid (``memory_traffic``).
Backends never import each other; the dispatcher owns the choice.
"""

from __future__ import annotations

import torch

from attnkit._call import AttentionCall
from attnkit.backends import _roofline


class Backend:
    """Base class. Subclasses set ``name`` and override the methods below."""

    name: str = "?"
    description: str = ""

    _availability: tuple[bool, str | None] | None = None

    def available(self) -> tuple[bool, str | None]:
        """(True, None), or (False, why) when this backend cannot run here at all (checked once)."""
        if self._availability is None:
            try:
                self._availability = self._check_available()
            except Exception as e:  # an optional package that fails to import is simply unavailable
                self._availability = (False, f"{type(e).__name__}: {e}")
        return self._availability

    def import_problem(self) -> str | None:
        """Why a backend that :meth:`available` found installed still cannot run, where finding out costs
        seconds (importing a large package): asked by ``attnkit.backends()`` / ``attnkit info`` and by the
        backend's own ``why_not`` at its first call, never at ``import attnkit``. None: no such check."""
        return None

    def _check_available(self) -> tuple[bool, str | None]:
        return True, None

    def why_not(self, call: AttentionCall) -> list[str]:
        raise NotImplementedError

    def run(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def cost(self, call: AttentionCall) -> float:
        """Estimated seconds for this call (only the ranking matters): the slower of computing and moving
        its bytes, plus launch overheads; at least the host's time for the call (which runs ahead of the
        device, so it shows only where the device work is shorter)."""
        device = max(self.compute_seconds(call), self.memory_seconds(call)) + self.overhead_seconds(call)
        return max(device, self.host_seconds(call))

    def compute_seconds(self, call: AttentionCall) -> float:
        """Seconds of arithmetic (FLOPs over the backend's measured rate)."""
        return float("inf")

    def overhead_seconds(self, call: AttentionCall) -> float:
        """Seconds added to the roofline: launches, building masks, host loops."""
        return 0.0

    def host_seconds(self, call: AttentionCall) -> float:
        """Seconds of host work a call costs however small it is (a floor under :meth:`cost`, not added)."""
        return 0.0

    def memory_traffic(self, call: AttentionCall) -> tuple[int | None, float, float]:
        """(programs, kv_reads, extra_bytes) of this backend's kernel (``_roofline.memory_seconds``):
        by default a grid that fills the device and reads K and V once."""
        return None, 1.0, 0.0

    def bandwidth_share(self, call: AttentionCall) -> float:
        """The share of the device's bandwidth this backend's kernel reaches with a full grid (measured; 1.0
        by default)."""
        return 1.0

    def memory_seconds(self, call: AttentionCall) -> float:
        """Seconds to move the call's bytes with this backend's grid (one rule: ``_roofline``) at its
        :meth:`bandwidth_share`."""
        return _roofline.memory_seconds(call, *self.memory_traffic(call)) / self.bandwidth_share(call)

    def memory_notes(self, call: AttentionCall) -> list[str]:
        """``["memory-bound: reads X MB of K/V ..."]`` where the memory term wins, else []."""
        if not self.memory_seconds(call) > self.compute_seconds(call):
            return []
        programs, kv_reads, _ = self.memory_traffic(call)
        return [_roofline.memory_note(call, programs, kv_reads)]

    def notes(self, call: AttentionCall) -> list[str]:
        return []


# -- layouts --------------------------------------------------------------------------------------------
def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a (B, S, H, D) tensor as (B, H, S, D); bhsd passes through."""
    return x.transpose(1, 2) if layout == "bshd" else x


def seqlens(call: AttentionCall) -> tuple[list[int], list[int]]:
    """Host lists of the query and key lengths of a thd call (reads cu_seqlens when not known yet)."""
    if call.seqlens_q is not None:
        return call.seqlens_q, call.seqlens_k
    cq, ck = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    return [b - a for a, b in zip(cq, cq[1:])], [b - a for a, b in zip(ck, ck[1:])]


def host_lengths_known(call: AttentionCall) -> bool:
    """False for thd calls traced by torch.compile or captured in a CUDA graph (lengths stay on device)."""
    return call.layout != "thd" or call.seqlens_q is not None


# -- work estimates ---------------------------------------------------------------------------------------
def visible_pairs_bound(call: AttentionCall) -> float:
    """Number of (query, key) pairs per head that causal/window leave visible (masks not counted)."""
    if call.layout == "thd":
        if not host_lengths_known(call):  # bound: every query row against the longest key sequence
            return float(call.q.shape[0] * call.Sk)
        lq, lk = seqlens(call)
        return float(sum(visible_pairs(a, b, call.causal, call.window) for a, b in zip(lq, lk)))
    return float(call.batch * visible_pairs(call.Sq, call.Sk, call.causal, call.window))


def dense_pairs(call: AttentionCall) -> float:
    if call.layout == "thd":
        if not host_lengths_known(call):
            return float(call.q.shape[0] * call.Sk)
        lq, lk = seqlens(call)
        return float(sum(a * b for a, b in zip(lq, lk)))
    return float(call.batch * call.Sq * call.Sk)


def _sum_linear(a: int, b: int, c0: int, c1: int) -> int:
    """sum of c0 + c1 * d for integer d in [a, b] (0 when empty)."""
    if b < a:
        return 0
    n = b - a + 1
    return n * c0 + c1 * (a + b) * n // 2


def visible_pairs(Sq: int, Sk: int, causal: bool, window) -> int:
    """Exact count of visible (i, j) pairs under bottom-right causal / window constraints, in O(1).

    Visible pairs lie on diagonals d = j - i in a band [d_lo, d_hi]; the diagonal d of an Sq x Sk grid
    holds min(Sq + d, Sk - d, Sq, Sk) pairs, a concave piecewise-linear function with kinks at
    d = min(0, Sk - Sq) and d = max(0, Sk - Sq), summed piece by piece.
    """
    if Sq <= 0 or Sk <= 0:
        return 0
    off = Sk - Sq
    left, right = window if window is not None else (-1, -1)
    d_lo = -(Sq - 1) if left < 0 else max(-(Sq - 1), off - left)
    d_hi = Sk - 1 if right < 0 else min(Sk - 1, off + right)
    if causal:
        d_hi = min(d_hi, off)
    k1, k2 = min(0, off), max(0, off)
    total = _sum_linear(d_lo, min(d_hi, k1 - 1), Sq, 1)  # rising edge: Sq + d
    total += (min(d_hi, k2) - max(d_lo, k1) + 1) * min(Sq, Sk) if min(d_hi, k2) >= max(d_lo, k1) else 0
    total += _sum_linear(max(d_lo, k2 + 1), d_hi, Sk, -1)  # falling edge: Sk - d
    return total


def attention_flops(call: AttentionCall, backward: bool = False, dense: bool = False) -> float:
    """Matmul FLOPs of the call: 2*D + 2*Dv per visible pair and query head (x3.5 with backward)."""
    pairs = dense_pairs(call) if dense else visible_pairs_bound(call)
    f = pairs * call.Hq * 2.0 * (call.D + call.Dv)
    return f * (3.5 if backward else 1.0)
