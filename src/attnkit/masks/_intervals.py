"""Masks as data: the lowering of a library :class:`Mask` to column intervals for our Triton kernels.

For every key column ``j`` of a (batch element or sequence, head) the masked query ROWS are
``[a_j, b_j) U [c_j, d_j)`` (rows ``i`` inside the sequence, 0-based; an empty interval is ``[0, 0)``),
on top of the call's causal / window flags, which the kernels keep applying themselves::

    document & causal (ids 0 0 1 1 1), key j = 2:   rows [0, 2) masked (other doc), [5, INF) masked,
                                                    causal adds rows 0..1 (already masked)

The lowering is a handful of O(Sk) torch ops on the device (no host reads of values: CUDA-graph safe, and a
new packing compiles nothing; only the tensors change): ``startend`` int32 (B', H', K, 4) with K = Sk per
batch row for bhsd/bshd (B' = B) or K = Tk packed keys for thd (B' = 1, one row per packed key, rows
counted inside its sequence), and its per-16-key-block summary ``summary`` int32 (B', H', ceil(K/16), 8) =
(min a, max a, min b, max b, min c, max c, min d, max d), from which the kernels classify a (query tile,
key tile) as empty (skipped), full (no mask work) or partial (elementwise intervals).

Lowerable: ``document`` (query doc ids non-decreasing per sequence), ``prefix_lm``, ``chunked``, ``full``,
the native flags (``causal``, ``sliding_window``) and ``&`` of these while the masked rows stay two
intervals per column. Anything else (``|``, ``~``, callables, ``neighborhood_2d``, ...) gives a reason.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from attnkit.masks._mask import Mask, _merge_windows

INF = 1 << 30  # "no upper bound" for a row (kernels compare int32 rows against it)
SUMMARY_BLOCK = 16  # keys per summary entry (the smallest key tile the kernels use)
_SHIFT = 1 << 33  # packs (sequence, doc id) into one sortable int64 (doc ids within +-2**32)


@dataclass
class Intervals:
    """A lowered mask. ``startend`` (B', H', K, 4) and ``summary`` (B', H', ceil(K/16), 8), int32 on the
    call's device (see the module docstring); ``causal`` / ``window`` are flags to merge into the call's."""

    startend: torch.Tensor
    summary: torch.Tensor
    causal: bool = False
    window: tuple[int, int] | None = None
    holes: bool = False  # a row's visible keys may have gaps inside its range (see _HOLES)
    band: bool = False  # the visible keys of a row are a band along the diagonal (see _BANDS)


@dataclass
class _Coords:
    """Per packed key u (K = B*Sk dense, Tk thd) and packed query t: sequence index, position, lengths."""

    kn: torch.Tensor  # (K,) int64 sequence (batch) index of key u
    kj: torch.Tensor  # (K,) int64 position of key u inside its sequence
    qn: torch.Tensor  # (Tq,) sequence index of packed query t
    qi: torch.Tensor  # (Tq,) row of query t inside its sequence
    q_start: torch.Tensor  # (N,) first packed query of each sequence
    off: torch.Tensor  # (K,) Sk - Sq of key u's sequence
    batch: int  # N
    dense_sk: int | None  # Sk for bhsd/bshd (startend is (B, 1, Sk, 4)), None for thd


def _coords(call) -> _Coords:
    dev = call.device
    if call.layout == "thd":
        cu_q, cu_k = call.cu_seqlens_q.long(), call.cu_seqlens_k.long()
        tk, tq = call.k.shape[0], call.q.shape[0]
        u = torch.arange(tk, device=dev)
        t = torch.arange(tq, device=dev)
        kn = torch.searchsorted(cu_k[1:], u, right=True)
        qn = torch.searchsorted(cu_q[1:], t, right=True)
        lq, lk = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
        return _Coords(kn, u - cu_k[kn], qn, t - cu_q[qn], cu_q[:-1], (lk - lq)[kn], call.batch, None)
    B, Sq, Sk = call.batch, call.Sq, call.Sk
    key = (B, Sq, Sk, dev)
    hit = _DENSE_COORDS.get(key)
    if hit is not None:
        return hit
    u = torch.arange(B * Sk, device=dev)
    t = torch.arange(B * Sq, device=dev)
    q_start = torch.arange(B, device=dev) * Sq
    c = _Coords(u // Sk, u % Sk, t // Sq, t % Sq, q_start, torch.full_like(u, Sk - Sq), B, Sk)
    if _host_values_allowed(u):  # (shapes only: reused across calls, never made inside a graph capture)
        if len(_DENSE_COORDS) >= 64:
            _DENSE_COORDS.clear()
        _DENSE_COORDS[key] = c
    return c


_DENSE_COORDS: dict = {}  # (B, Sq, Sk, device) -> _Coords of a dense call


def _per_seq(x, n: torch.Tensor):
    """An int, or a (N,) tensor indexed by the sequence: its value for each element of ``n``."""
    return x[n].long() if isinstance(x, torch.Tensor) else x


# -- one function per factory: (a, b) pairs of masked rows per key, in key order ------------------------
def _document(params, c: _Coords, call):
    ids, kv_ids = params["doc_ids"], params["kv_doc_ids"]
    kv_ids = ids if kv_ids is None else kv_ids

    def at(t, n, pos):
        return (t[pos] if t.dim() == 1 else t[n, pos]).long()

    g = c.qn * _SHIFT + at(ids, c.qn, c.qi)  # sorted iff every sequence's query ids are non-decreasing
    val = c.kn * _SHIFT + at(kv_ids, c.kn, c.kj)
    start = c.q_start[c.kn]
    lo = torch.searchsorted(g, val) - start
    hi = torch.searchsorted(g, val, right=True) - start
    return [(0, lo), (hi, INF)]  # (well formed already: 0 <= lo <= hi <= Sq)


def _prefix_lm(params, c: _Coords, call):
    p = _per_seq(params["prefix_len"], c.kn)
    b = torch.where(c.kj >= p, c.kj - c.off, 0)
    return [(torch.zeros_like(b), b)]


def _chunked(params, c: _Coords, call):
    size = params["chunk_size"]
    cs = (c.kj // size) * size
    return [(torch.zeros_like(cs), cs - c.off), (cs + size - c.off, torch.full_like(cs, INF))]


def _global_sliding(params, c: _Coords, call):
    g, left, right = params["num_global"], params["left"], params["right"]
    # visible: j < G, or p < G, or p - left <= j <= p + right (p = i + off); masked rows of j >= G:
    # i >= G - off and (i < j - right - off or i > j + left - off)
    start = g - c.off
    glob = c.kj < g
    lo_end = torch.where(glob | (right < 0), 0, c.kj - right - c.off)
    hi_start = torch.where(glob | (left < 0), INF, torch.maximum(start, c.kj + left - c.off + 1))
    return [(start.expand_as(c.kj), lo_end), (hi_start, torch.full_like(c.kj, INF))]


def _shared_prefix(params, c: _Coords, call):
    """Causal (flag) and, per key, rows from the end of its segment on masked: a prompt key is seen up to the
    end of the last response, a response key up to the end of its response, keys past the end by nobody."""
    P = _per_seq(params["prefix_len"], c.kn)
    lens = params["response_lens"]
    if not isinstance(lens, torch.Tensor):
        lens = torch.tensor(list(lens), dtype=torch.long, device=c.kj.device).view(1, -1)
    lens = lens.to(c.kj.device).long()
    R = lens.shape[-1]
    rows = lens[c.kn] if lens.shape[0] > 1 else lens.expand(c.kj.shape[0], R)  # (K, R)
    ends = rows.cumsum(-1) + (P.unsqueeze(-1) if isinstance(P, torch.Tensor) else P)  # (K, R)
    if R == 0:
        e = torch.where(c.kj < P, P, 0)
    else:
        seg = (ends <= c.kj.unsqueeze(-1)).sum(-1)  # response of key j (R: past the last)
        own = ends.gather(-1, seg.clamp(max=R - 1).unsqueeze(-1)).squeeze(-1)
        e = torch.where(c.kj < P, ends[:, -1], torch.where(seg < R, own, 0))
    return [(e, torch.full_like(e, INF))]


def _flashmask(params, c: _Coords, call):
    T, causal = params["startend_row_indices"], params["causal"]
    col = T[c.kn if T.shape[0] > 1 else torch.zeros_like(c.kn), :, c.kj].long()  # (K, H', C)
    col = col.transpose(0, 1)  # (H', K, C)
    inf = torch.full_like(col[..., 0], INF)
    C = T.shape[-1]
    if causal and C == 1:
        return [(col[..., 0], inf)]
    if causal:
        return [(col[..., 0], col[..., 1])]
    if C == 2:
        return [(torch.zeros_like(inf), col[..., 1]), (col[..., 0], inf)]
    return [(col[..., 0], col[..., 1]), (col[..., 2], col[..., 3])]


_LOWER = {
    "document": _document,
    "prefix_lm": _prefix_lm,
    "chunked": _chunked,
    "global_sliding": _global_sliding,
    "shared_prefix": _shared_prefix,
    "flashmask": _flashmask,
}
# masked-row intervals each kind takes (one per key column, or two), and whether it adds the causal flag
_SLOTS = {"prefix_lm": 1, "shared_prefix": 1}
_WELL_FORMED = {"document"}  # kinds whose bounds need no clamping (0 <= a <= b <= INF, empty as [0, 0))
_CAUSAL = {"shared_prefix"}
# kinds under which a query row's visible keys can have gaps inside the range the kernels narrow it to (a
# response skips the other responses; global keys then the window; FlashMask's inner intervals): the kernels
# then skip empty key tiles by a branch (on the H200, B=2 H=16 S=8k D=128, forward: shared prefix 2.38 ->
# 1.68 ms, global_sliding 2.75 -> 1.16), which costs where there are no gaps (documents 0.71 -> 0.83,
# prefix-LM 2.25 -> 2.85: docs/results/2026-12-02-h200-c/sweep.txt)
_HOLES = {"shared_prefix", "global_sliding", "flashmask"}
# Kinds whose visible keys are a band along the diagonal (a sliding window as intervals): both edges of the
# band cross every query tile's keys, so most visited tiles are partial; the Hopper Gluon forward (128-query
# tiles) ran them slower than the Triton one (H200, global+window, B=2 H=16 S=8k D=128: 0.639 against 0.565
# ms, 2026-12-03 run G): ``runtime/capability.gluon_listed_eligible``
_BANDS = {"global_sliding"}


def _check_document(params, call) -> str | None:
    """A reason the document mask cannot be carried as intervals (shapes; query ids out of order)."""
    ids, kv_ids = params["doc_ids"], params["kv_doc_ids"]
    for name, t, need in (("doc_ids", ids, call.Sq), ("kv_doc_ids", kv_ids, call.Sk)):
        if t is None:
            continue
        if t.is_floating_point() or t.is_complex() or t.device != call.device:
            return f"document {name}: an int tensor on the device of q is needed"
        if t.dim() == 2 and t.shape[0] != call.batch:
            return f"document {name}: shape {tuple(t.shape)} has no row per batch element ({call.batch})"
        if t.shape[-1] < max(need, call.Sk if kv_ids is None else 0):
            return f"document {name}: {t.shape[-1]} positions for sequences of up to {need}"
    rows = call.Sq if call.layout != "thd" else ids.shape[-1]
    if not _sorted(ids, rows):
        return "document: query doc ids are not non-decreasing (interleaved documents are no intervals)"
    return None


_SORTED: dict = {}  # (id, version, address, rows) of a doc-id tensor -> its first `rows` ids are sorted


def _sorted(ids: torch.Tensor, rows: int) -> bool:
    """Whether ``ids[..., :rows]`` is non-decreasing along the last dim: one host read per tensor (and
    in-place version), cached, so a training loop pays it once per new packing, not once per layer. Trusted
    (True) where host reads are not allowed (torch.compile, CUDA-graph capture)."""
    if not _host_values_allowed(ids):
        return True
    key = (id(ids), ids._version, ids.data_ptr(), rows)
    ok = _SORTED.get(key)
    if ok is None:
        d = ids[..., :rows]
        ok = d.shape[-1] <= 1 or bool((d[..., 1:] >= d[..., :-1]).all())
        if len(_SORTED) >= 256:
            _SORTED.clear()
        _SORTED[key] = ok
    return ok


def _host_values_allowed(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _conjuncts(mask: Mask) -> list[Mask]:
    if mask.kind == "and":
        return [m for part in mask.parts for m in _conjuncts(part)]
    return [mask]


def why_not(mask: Mask, call) -> str | None:
    """Why ``mask`` cannot be lowered for ``call`` (None: :func:`lower` will succeed)."""
    slots = 0
    for m in _conjuncts(mask):
        if m.native is not None or m.kind == "full":
            continue
        if m.kind not in _LOWER:
            what = "a mask_mod callable" if m.kind == "mask_mod" else f"{m.kind!r}"
            where = "" if m is mask else f" (the part {m.name})"
            return f"{what}{where} has no interval lowering"
        if m.kind == "document":
            reason = _check_document(m.params, call)
            if reason:
                return reason
        if m.kind == "prefix_lm" and isinstance(m.params["prefix_len"], torch.Tensor):
            p = m.params["prefix_len"]
            if p.dim() != 1 or p.shape[0] != call.batch or p.is_floating_point() or p.device != call.device:
                shape = tuple(p.shape)
                return f"prefix_lm: prefix_len of shape {shape}, need ({call.batch},) ints on q's device"
        if m.kind == "flashmask":
            T = m.params["startend_row_indices"]
            if T.device != call.device:
                return "flashmask: startend_row_indices on another device than q"
            if T.shape[1] not in (1, call.Hq):
                return f"flashmask: {T.shape[1]} heads in startend_row_indices for Hq = {call.Hq}"
        if m.kind in ("shared_prefix", "flashmask") and call.layout != "thd" and call.Sq != call.Sk:
            return f"{m.kind}: needs Sq == Sk"
        if m.kind == "flashmask" and m.params["causal"]:
            slots += 1
        else:
            slots += _SLOTS.get(m.kind, 2)
        if slots > 2:
            return "more than two masked row intervals per key column"
    return None


def _norm(a: torch.Tensor, b: torch.Tensor):
    a = a.clamp(0, INF)
    b = b.clamp(0, INF)
    empty = b <= a
    return torch.where(empty, 0, a), torch.where(empty, 0, b)


def _data_tensors(mask: Mask, out: list) -> list:
    for v in mask.params.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
    for part in mask.parts:
        _data_tensors(part, out)
    return out


def _memo_key(mask: Mask, call):
    """What a lowering depends on: the call's shapes and the tensors it reads (the mask's data and, for
    thd, cu_seqlens) by identity and in-place version. Held as weak references, so a new tensor that
    reuses a freed one's address and id never matches."""
    tensors = _data_tensors(mask, [])
    if call.layout == "thd":
        tensors += [call.cu_seqlens_q, call.cu_seqlens_k]
    shape = (call.layout, call.batch, call.Hq, call.Sq, call.Sk, call.q.shape[0], call.k.shape[0])
    shape += (call.device,)
    return shape, tensors


def lower(mask: Mask, call) -> Intervals | None:
    """Column intervals for ``mask`` on ``call`` (an AttentionCall), or None if it does not lower.

    Memoized on the mask: every layer of a model that passes one mask object pays the lowering once per
    new packing (a handful of small device ops), not once per call."""
    shape, tensors = _memo_key(mask, call)
    versions = [_version(t) for t in tensors]
    if torch.compiler.is_compiling() or None in versions:
        return _lower(mask, call)
    memo = mask.__dict__.get("_lowered")
    if (
        memo is not None
        and memo[0] == shape
        and len(memo[1]) == len(tensors)
        and all(r() is t and v == u for (r, v), t, u in zip(memo[1], tensors, versions))
    ):
        return memo[2]
    iv = _lower(mask, call)
    if iv is not None and _host_values_allowed(call.q):  # (never keep tensors made inside a graph capture)
        mask.__dict__["_lowered"] = (shape, [(weakref.ref(t), v) for t, v in zip(tensors, versions)], iv)
    return iv


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors keep no version counter: never memoized
        return None


def _lower(mask: Mask, call) -> Intervals | None:
    if why_not(mask, call) is not None:  # (also for every new doc-id tensor: dispatch caches by structure)
        return None
    causal, window, pairs = False, None, []
    c = None
    holes = band = False
    for m in _conjuncts(mask):
        if m.native is not None:
            causal = causal or m.native.get("causal", False)
            w = m.native.get("window")
            if w is not None:
                window = w if window is None else _merge_windows(window, w)
            continue
        if m.kind == "full":
            continue
        c = _coords(call) if c is None else c
        holes = holes or m.kind in _HOLES
        band = band or m.kind in _BANDS
        got = _LOWER[m.kind](m.params, c, call)
        pairs += got if m.kind in _WELL_FORMED else [_norm(a, b) for a, b in got]
        causal = causal or m.kind in _CAUSAL or (m.kind == "flashmask" and m.params["causal"])
    if c is None:
        c = _coords(call)
    zero = torch.zeros_like(c.kj)
    pairs += [(zero, zero)] * (2 - len(pairs))
    cols = [x if isinstance(x, torch.Tensor) else torch.full_like(c.kj, x) for ab in pairs for x in ab]
    cols = torch.broadcast_tensors(*cols)
    se = torch.stack(cols, dim=-1).to(torch.int32)  # (K, 4) or (H', K, 4)
    se = se.view((1,) * (3 - se.dim()) + tuple(se.shape))  # (1 | H', K, 4)
    if c.dense_sk is not None:  # (H', B * Sk, 4) -> (B, H', Sk, 4)
        se = se.view(se.shape[0], call.batch, c.dense_sk, 4).transpose(0, 1)
    else:
        se = se.unsqueeze(0)
    window = None if window == (-1, -1) else window
    se = se.contiguous()
    return Intervals(se, summarize(se), causal, window, holes, band)


def summarize(startend: torch.Tensor) -> torch.Tensor:
    """(B', H', K, 4) -> (B', H', ceil(K / 16), 8): per block of 16 keys, min and max of each bound."""
    K = startend.shape[2]
    nblk = -(-K // SUMMARY_BLOCK)
    if K == 0:
        return startend.new_zeros(startend.shape[:2] + (0, 8))
    pad = nblk * SUMMARY_BLOCK - K
    if pad:  # repeat the last key: neutral for min and max
        startend = torch.cat([startend, startend[:, :, -1:].expand(-1, -1, pad, -1)], dim=2)
    blocks = startend.view(startend.shape[:2] + (nblk, SUMMARY_BLOCK, 4))
    lo, hi = blocks.amin(dim=3), blocks.amax(dim=3)  # (B', H', nblk, 4)
    return torch.stack([lo, hi], dim=-1).flatten(-2).contiguous()  # (min a, max a, min b, max b, ...)


def dense_from_intervals(iv: Intervals, B: int, H: int, Sq: int, Sk: int) -> torch.Tensor:
    """Test helper (dense layouts): bool (B, H, Sq, Sk), True where the intervals leave a query visible
    (flags not applied)."""
    se = iv.startend.long().expand(B, H, Sk, 4)
    i = torch.arange(Sq, device=se.device).view(1, 1, Sq, 1)
    a, b, c, d = (se[..., k].unsqueeze(2) for k in range(4))
    return ~(((i >= a) & (i < b)) | ((i >= c) & (i < d)))


def visible_pairs(iv: Intervals, call, causal: bool, window) -> torch.Tensor | None:
    """Visible (query, key) pairs per head under the intervals and the flags (a 0-dim float64 tensor on the
    device, O(K) work; reading it is the caller's choice), or None for thd (rows per sequence)."""
    if call.layout == "thd":
        return None
    se = iv.startend.long()  # (B', H', Sk, 4)
    Sq, Sk = call.Sq, call.Sk
    p = torch.arange(Sk, device=se.device) - (Sk - Sq)  # the query row at j's own position
    lo = torch.zeros_like(p)
    hi = torch.full_like(p, Sq)
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if right >= 0:  # j <= i + off + right  <=>  i >= j - off - right
        lo = (p - right).clamp(min=0)
    if left >= 0:  # j >= i + off - left  <=>  i <= j - off + left
        hi = (p + left + 1).clamp(0, Sq)

    def span(x, y):
        return (torch.minimum(y, hi) - torch.maximum(x, lo)).clamp(min=0)

    a, b, c, d = se.unbind(-1)
    vis = span(lo, hi) - span(a, b) - span(c, d) + span(torch.maximum(a, c), torch.minimum(b, d))
    scale = call.batch / se.shape[0] / se.shape[1]
    return vis.sum().double() * scale
