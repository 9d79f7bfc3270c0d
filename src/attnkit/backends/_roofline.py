"""The memory side of every backend's cost: the time a call needs to move its bytes (one rule for all).

A backend's estimate is ``max(compute seconds, memory seconds) + launch overhead`` (``Backend.cost``).
The memory seconds are the bytes the call must move (q, k, v and the bias read, the output written, each
once; three times that with a backward, which reads q, k, v, out, dout and writes dq, dk, dv) over an
effective bandwidth: the device's peak scaled by the fraction of its multiprocessors the kernel's grid
keeps busy. Kernels that split the key range over programs (SDPA's decode paths, ``triton_decode``) fill
the GPU; kernels with one program per (batch, head, query tile) do not when queries are few: at B=1 with
8 KV heads FA4 runs 8 programs on 132 SMs (H200, bf16, 2026-12-02: 0.40 TB/s of K+V read, SDPA 3.83).
For long sequences the memory term is far below the compute term and changes no ranking.
"""

from __future__ import annotations

import math

import torch

from attnkit._call import AttentionCall

# Bytes a second a kernel that fills the device reaches reading K and V. H200: SDPA's split-KV decode read
# 3.83-4.42 TB/s, a device copy 4.3 TB/s (2026-12-02, issue 15). CPU: a rough figure for a 2-core machine.
PEAK_BANDWIDTH = {"cuda": 4.0e12, "cpu": 20e9}
DEFAULT_SMS = 132  # the H200's, where the device cannot be asked (no CUDA here, or a fake device in tests)
_SMS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (asked of the driver once per device); DEFAULT_SMS elsewhere."""
    if device.type != "cuda":
        return DEFAULT_SMS
    idx = device.index
    if idx in _SMS:
        return _SMS[idx]
    try:
        idx = torch.cuda.current_device() if idx is None else idx
        if idx not in _SMS:
            _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    except (RuntimeError, AssertionError):  # no CUDA driver (a fake CUDA call in tests): not cached
        return DEFAULT_SMS
    return _SMS[idx]


def distinct_bytes(t: torch.Tensor | None) -> float:
    """Bytes of the distinct elements of ``t`` (broadcast dims, stride 0, count once); 0 for None."""
    if t is None:
        return 0.0
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0)
    return float(n * t.element_size())


def kv_read_bytes(call: AttentionCall) -> float:
    """Bytes of K and V, each read once."""
    return distinct_bytes(call.k) + distinct_bytes(call.v)


def io_bytes(call: AttentionCall, kv_reads: float = 1.0, extra_bytes: float = 0.0) -> float:
    """Bytes the call moves: q, K and V (``kv_reads`` times), the bias, the output, and ``extra_bytes`` (a
    backend's own traffic, e.g. materialised scores); x3 with a backward (reads q, k, v, out, dout, writes
    dq, dk, dv: twice the forward's bytes again)."""
    rows_q = call.q.shape[0] if call.layout == "thd" else call.batch * call.Sq
    out = float(rows_q * call.Hq * call.Dv * call.q.element_size())
    n = distinct_bytes(call.q) + kv_read_bytes(call) * kv_reads + distinct_bytes(call.bias) + out
    return (n + extra_bytes) * (3.0 if call.requires_grad else 1.0)


def tile_programs(call: AttentionCall, tile_rows: int = 128, pack_gqa: bool = False) -> int:
    """Programs of a grid with one program per (batch, head, tile of query rows) and the whole key range
    in each: B * Hq * ceil(Sq / tile_rows), or with GQA heads packed into the rows of a tile (FA4's
    pack_gqa, flex's decoding kernel) B * Hk * ceil(Sq * group / tile_rows)."""
    if pack_gqa:
        return call.batch * call.Hk * -(-call.Sq * call.group // tile_rows)
    return call.batch * call.Hq * -(-call.Sq // tile_rows)


def fill(call: AttentionCall, programs: int | None) -> float:
    """Fraction of the device's bandwidth a grid of ``programs`` reaches (None: a grid that fills it)."""
    if programs is None or call.device.type != "cuda":
        return 1.0
    return min(1.0, max(programs, 1) / sm_count(call.device))


def memory_seconds(
    call: AttentionCall, programs: int | None = None, kv_reads: float = 1.0, extra_bytes: float = 0.0
) -> float:
    """Seconds to move the call's bytes (:func:`io_bytes`) at the peak bandwidth scaled by :func:`fill`.

    ``programs``: the grid's programs (None: the kernel splits the key range and fills the device);
    ``kv_reads``: how often the kernel reads K and V (one program per query head reads its group's K/V
    once each: ``call.group``, an upper bound where the L2 cache serves some of it)."""
    bw = PEAK_BANDWIDTH.get(call.device.type, PEAK_BANDWIDTH["cpu"]) * fill(call, programs)
    return io_bytes(call, kv_reads, extra_bytes) / bw


def memory_note(call: AttentionCall, programs: int | None = None, kv_reads: float = 1.0) -> str:
    """The explain note of a call whose memory term wins: how much K/V it reads, and why it is slow."""
    text = f"memory-bound: reads {kv_read_bytes(call) * kv_reads / 1e6:.4g} MB of K/V"
    if kv_reads > 1:
        text += f" (K/V read {kv_reads:g}x)"
    if fill(call, programs) < 1.0:
        text += f"; its grid of {programs} programs fills {programs}/{sm_count(call.device)} SMs"
    return text
