"""One block of context-parallel attention: local queries against one segment of keys, with every
constraint (causal, window, mask) moved from global positions to the block's local indices.

Notation (global positions; keys aligned as in docs/api.md §1 with the global lengths Sq, Sk, so a query at
global row ``qg`` stands at key position ``qg + (Sk - Sq)``): the block holds ``m`` queries whose first one
stands at key position ``qa`` and ``n`` keys starting at ``ko``. Inside the block, ``attention`` aligns
bottom-right with its own lengths, so local row ``i`` stands at local key position ``i + n - m``, and::

    global (query position - key)  =  local (query position - key)  +  delta,   delta = (qa + m) - (ko + n)

A global window ``(L, R)`` (causal is ``R = 0``) is then the local window ``(L - delta, R + delta)``: a side
past the block's range is dropped (-1), a block outside it is empty (skipped: no call at all), and a side that
lands inside the block but below zero (only windows whose size is not a multiple of the chunk do this) goes
into a small index predicate. Masks see global indices: document masks are sliced (data stays data), other
masks are wrapped in a ``mask_mod`` that adds the block's offsets. Nothing of size S x S is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import attnkit
from attnkit.masks import Mask, document, from_mask_mod
from attnkit.merge import merge_attention


@dataclass(frozen=True)
class Plan:
    """How one block is called: ``attention(..., causal=causal, window=window)`` and the extra predicate
    ``lo <= local (query position - key) <= hi`` (None: no bound) when a side could not be a window."""

    causal: bool
    window: tuple[int, int] | None
    lo: int | None
    hi: int | None


def plan_block(qa: int, m: int, ko: int, n: int, L: int, R: int) -> Plan | None:
    """The block's local flags for the global window ``(L, R)`` (-1 = unbounded), or None when empty."""
    delta = (qa + m) - (ko + n)
    dmin, dmax = 1 - m, n - 1  # range of local (query position - key) over the block
    hi = None if L < 0 else L - delta  # local diff <= hi
    lo = None if R < 0 else -(R + delta)  # local diff >= lo
    if hi is not None and hi >= dmax:
        hi = None
    if lo is not None and lo <= dmin:
        lo = None
    if max(dmin, lo if lo is not None else dmin) > min(dmax, hi if hi is not None else dmax):
        return None
    left = -1 if hi is None or hi < 0 else hi
    right = -1 if lo is None or lo > 0 else -lo
    extra_hi = hi if hi is not None and hi < 0 else None
    extra_lo = lo if lo is not None and lo > 0 else None
    if (left, right) == (-1, -1):
        return Plan(False, None, extra_lo, extra_hi)
    if (left, right) == (-1, 0):
        return Plan(True, None, extra_lo, extra_hi)
    return Plan(False, (left, right), extra_lo, extra_hi)


# -- masks -------------------------------------------------------------------------------------------
def split_mask(mask, causal: bool, window):
    """Fold the flag-like parts of a top-level ``&`` chain into a global window; return ``(L, R, rest)``.

    ``rest`` is the list of remaining Mask parts (each evaluated in global positions)."""
    L, R = (-1, -1) if window is None else (int(window[0]), int(window[1]))

    def tighter(a, b):
        return b if a < 0 else a if b < 0 else min(a, b)

    if causal:
        R = tighter(R, 0)
    rest = []
    stack = [] if mask is None else [mask]
    while stack:
        mk = stack.pop()
        if not isinstance(mk, Mask):
            if type(mk).__name__ == "BlockMask" and hasattr(mk, "mask_mod"):
                mk = mk.mask_mod
            mk = from_mask_mod(mk)
        if mk.kind == "and":
            stack.extend(mk.parts)
        elif mk.kind == "full":
            pass
        elif mk.kind == "causal":
            R = tighter(R, 0)
        elif mk.kind == "sliding_window":
            L, R = tighter(L, mk.params["left"]), tighter(R, mk.params["right"])
        else:
            rest.append(mk)
    return L, R, rest


def is_data(mk: Mask) -> bool:
    """True when the mask moves to a block as sliced data (no per-block predicate)."""
    if mk.kind == "document":
        return True
    return mk.kind in ("or", "not") and all(is_data(p) for p in mk.parts)


def shift_mask(mk: Mask, qo: int, m: int, ko: int, n: int, Sq: int, Sk: int) -> Mask:
    """``mk`` (global positions, lengths Sq x Sk) as seen by the block of queries [qo, qo+m) (global rows)
    and keys [ko, ko+n)."""
    if mk.kind == "document":
        ids, kv_ids = mk.params["doc_ids"], mk.params["kv_doc_ids"]
        kv_ids = ids if kv_ids is None else kv_ids
        return document(ids[..., qo : qo + m], kv_ids[..., ko : ko + n])
    if mk.kind == "and":
        return shift_mask(mk.parts[0], qo, m, ko, n, Sq, Sk) & shift_mask(mk.parts[1], qo, m, ko, n, Sq, Sk)
    if mk.kind == "or":
        return shift_mask(mk.parts[0], qo, m, ko, n, Sq, Sk) | shift_mask(mk.parts[1], qo, m, ko, n, Sq, Sk)
    if mk.kind == "not":
        return ~shift_mask(mk.parts[0], qo, m, ko, n, Sq, Sk)
    bound = mk.bind(Sq, Sk)
    return from_mask_mod(
        lambda b, h, q_idx, kv_idx: bound(b, h, q_idx + qo, kv_idx + ko), f"{mk.name}@q{qo}k{ko}"
    )


def _diff_mask(m: int, n: int, lo, hi) -> Mask:
    def fn(b, h, q_idx, kv_idx):
        d = q_idx + (n - m) - kv_idx
        ok = torch.ones_like(d, dtype=torch.bool)
        if lo is not None:
            ok = ok & (d >= lo)
        if hi is not None:
            ok = ok & (d <= hi)
        return ok

    return from_mask_mod(fn, f"diff[{lo},{hi}]")


def attend_block(q, k, v, plan: Plan, rest, *, qo, ko, Sq, Sk, seq_dim, layout, opts):
    """``(out, lse)`` of the local queries ``q`` against the keys ``k``/``v`` of one block."""
    m, n = q.shape[seq_dim], k.shape[seq_dim]
    parts = [shift_mask(mk, qo, m, ko, n, Sq, Sk) for mk in rest]
    if plan.lo is not None or plan.hi is not None:
        parts.append(_diff_mask(m, n, plan.lo, plan.hi))
    mask = None
    for p in parts:
        mask = p if mask is None else mask & p
    return attnkit.attention(
        q, k, v, layout=layout, causal=plan.causal, window=plan.window, mask=mask, return_lse=True, **opts
    )


# -- the per-chunk loop pieces shared by both methods -------------------------------------------------
def chunks(x, sd, pieces):
    """``x`` (a rank's shard) cut into its pieces: ``[(tensor, global start, doc, local start)]``."""
    out, at = [], 0
    for start, c, doc in pieces:
        out.append((x.narrow(sd, at, c), start, doc, at))
        at += c
    return out


def block(qc, qo, kc, vc, ko, g, qdoc=None, kdoc=None):
    if qdoc != kdoc:  # packed (thd) documents never see each other
        return None
    m, n = qc.shape[g["sd"]], kc.shape[g["sd"]]
    plan = plan_block(qo + g["Sk"] - g["Sq"], m, ko, n, g["L"], g["R"])
    if plan is None:
        return None
    return attend_block(
        qc,
        kc,
        vc,
        plan,
        g["rest"],
        qo=qo,
        ko=ko,
        Sq=g["Sq"],
        Sk=g["Sk"],
        seq_dim=g["sd"],
        layout=g["layout"],
        opts=g["opts"],
    )


def finish(q_chunks, parts, dv: int, layout: str, sd: int):
    """Merge each query chunk's block results and concatenate the chunks: ``(out, lse)`` of this rank."""
    outs, lses = [], []
    for (qc, *_), p in zip(q_chunks, parts):
        if p:
            o, s = merge_attention([x[0] for x in p], [x[1] for x in p], layout=layout)
        else:  # no key visible to any query of this chunk
            shape = list(qc.shape)
            shape[-1] = dv
            o = qc.new_zeros(shape)
            B, H, m = (qc.shape[0], qc.shape[2], qc.shape[1]) if layout == "bshd" else qc.shape[:3]
            s = torch.full((B, H, m), float("-inf"), device=qc.device)
        outs.append(o)
        lses.append(s.float())
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=sd)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)
    return out, lse
