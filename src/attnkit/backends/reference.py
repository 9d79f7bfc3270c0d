"""The one exact oracle: the whole score pipeline of docs/api.md in plain PyTorch, any device, with autograd.

Memory bound: scores are never materialised for more than one chunk at a time. A chunk covers a group of
query heads and query rows of one batch element (one sequence for ``thd``) against all Sk keys of that
element, sized so that ``heads x rows x Sk <= CHUNK_ELEMENTS`` (2**24, i.e. 64 MiB of float32 scores) or one
row of one head when a single row is larger. A handful of temporaries of that size live at once (scores,
mask, probabilities), so a 32k x 32k problem peaks at a few hundred MiB whatever its batch and heads.
With autograd, every chunk runs under activation checkpointing, so backward recomputes the chunk instead
of keeping its scores: the bound holds for backward too (the gradient of a full ``bias`` is, of course,
as large as the bias).

Computation is in float32 for half-precision inputs and in the input dtype otherwise; ``upcast=False``
keeps half precision throughout (tests use it to measure what plain low-precision PyTorch gets wrong).
A query row with no visible key gets ``out = 0`` and ``lse = -inf`` with finite (zero) gradients.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from attnkit._call import AttentionCall
from attnkit._semantics import index_grid, modify_scores, slopes_for, visibility
from attnkit.backends.base import Backend, attention_flops, to_bhsd

CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if upcast and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _chunk_sizes(H: int, Sq: int, Sk: int) -> tuple[int, int]:
    """(heads per chunk, rows per chunk) with heads*rows*Sk <= CHUNK_ELEMENTS (at least 1 x 1)."""
    per_row = max(Sk, 1)
    rows = max(1, min(Sq, CHUNK_ELEMENTS // per_row))
    heads = max(1, min(H, CHUNK_ELEMENTS // (per_row * max(rows, 1))))
    return heads, rows


def _attend_chunk(qs, ks, vs, bias_blk, *, call, b, h0, h1, r0, off, mask_mod, score_mod, keep_fn):
    """One chunk: qs (Hn, C, D), ks (Hn, Sk, D), vs (Hn, Sk, Dv) -> out (Hn, C, Dv), lse (Hn, C)."""
    Hn, C, _ = qs.shape
    Sk = ks.shape[1]
    s = torch.matmul(qs, ks.transpose(-1, -2)) * call.scale  # (Hn, C, Sk)
    bi, hi, qi, ki = index_grid(
        b, torch.arange(h0, h1), torch.arange(r0, r0 + C), torch.arange(Sk), qs.device
    )
    s = modify_scores(
        s.unsqueeze(0),
        softcap=call.softcap,
        bias=bias_blk,
        slopes=slopes_for(call.alibi_slopes, b, h0, h1),
        score_mod=score_mod,
        b=bi,
        h=hi,
        q=qi,
        kv=ki,
        off=off,
    )
    s = s.expand(1, Hn, C, Sk)[0]
    vis = visibility(
        causal=call.causal, window=call.window, mask_mod=mask_mod, b=bi, h=hi, q=qi, kv=ki, off=off
    )
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    if vis is not None:
        s = torch.where(vis.expand(1, Hn, C, Sk)[0], s, neg_inf)
    m = s.detach().amax(dim=-1, keepdim=True)  # (Hn, C, 1); -inf on fully masked rows
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    safe = torch.where(has_key, denom, torch.ones_like(denom))
    lse = torch.where(has_key, m + torch.log(safe), neg_inf).squeeze(-1)
    p = p / safe
    if call.dropout_p > 0:
        keep = (
            keep_fn(b, h0, h1, r0, C, Sk, p.device)
            if keep_fn is not None
            else (torch.rand(p.shape, device=p.device) >= call.dropout_p)
        )
        p = p * keep.to(p.dtype) / (1.0 - call.dropout_p)
    out = torch.matmul(p.to(vs.dtype), vs)
    return out, lse


def _attend(call, qb, kb, vb, bias_b, *, b, off, mask_mod, score_mod, upcast, keep_fn):
    """One batch element / sequence: qb (Hq, Sq, D), kb (Hk, Sk, D), vb (Hk, Sk, Dv)."""
    Hq, Sq, _ = qb.shape
    Sk, Dv = kb.shape[1], vb.shape[2]
    cdt = _compute_dtype(qb.dtype, upcast)
    qb, kb, vb = qb.to(cdt), kb.to(cdt), vb.to(cdt)
    heads, rows = _chunk_sizes(Hq, Sq, Sk)
    group = Hq // kb.shape[0]
    use_ckpt = torch.is_grad_enabled() and call.requires_grad
    out_h, lse_h = [], []
    for h0 in range(0, Hq, heads):
        h1 = min(Hq, h0 + heads)
        kv_heads = torch.arange(h0, h1, device=qb.device) // group
        ks, vs = kb.index_select(0, kv_heads), vb.index_select(0, kv_heads)
        out_r, lse_r = [], []
        for r0 in range(0, Sq, rows):
            r1 = min(Sq, r0 + rows)
            qs = qb[h0:h1, r0:r1]
            bias_blk = None if bias_b is None else bias_b[:, h0:h1, r0:r1, :]
            kwargs = dict(
                call=call,
                b=b,
                h0=h0,
                h1=h1,
                r0=r0,
                off=off,
                mask_mod=mask_mod,
                score_mod=score_mod,
                keep_fn=keep_fn,
            )
            if Sk == 0:
                o = qs.new_zeros(h1 - h0, r1 - r0, Dv)
                lse = qs.new_full((h1 - h0, r1 - r0), float("-inf"))
            elif use_ckpt:
                o, lse = checkpoint(_attend_chunk, qs, ks, vs, bias_blk, use_reentrant=False, **kwargs)
            else:
                o, lse = _attend_chunk(qs, ks, vs, bias_blk, **kwargs)
            out_r.append(o)
            lse_r.append(lse)
        out_h.append(torch.cat(out_r, dim=1) if out_r else qb.new_zeros(h1 - h0, 0, Dv))
        lse_h.append(torch.cat(lse_r, dim=1) if lse_r else qb.new_zeros(h1 - h0, 0))
    return torch.cat(out_h, dim=0), torch.cat(lse_h, dim=0).float()


def _bias_view(call: AttentionCall, shape):
    if call.bias is None:
        return None
    bias = call.bias
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(*shape)


def reference_forward(call: AttentionCall, *, upcast: bool = True, dropout_keep=None):
    """Run the oracle on a validated call. ``dropout_keep(b, h0, h1, r0, rows, Sk, device) -> bool
    (heads, rows, Sk)`` supplies the dropout keep-mask (tests use it to replay a kernel's RNG)."""
    q, k, v = call.q, call.k, call.v
    out_dtype = q.dtype
    outs, lses = [], []
    if call.layout == "thd":
        from attnkit.backends.base import seqlens

        lq, lk = seqlens(call)
        bias = _bias_view(call, (call.batch, call.Hq, call.Sq, call.Sk))
        cq = [0]
        ck = [0]
        for a, c in zip(lq, lk):
            cq.append(cq[-1] + a)
            ck.append(ck[-1] + c)
        for n in range(call.batch):
            qn = q[cq[n] : cq[n + 1]].transpose(0, 1)
            kn = k[ck[n] : ck[n + 1]].transpose(0, 1)
            vn = v[ck[n] : ck[n + 1]].transpose(0, 1)
            bias_n = None if bias is None else bias[n : n + 1, :, : lq[n], : lk[n]]
            o, lse = _attend(
                call,
                qn,
                kn,
                vn,
                bias_n,
                b=n,
                off=lk[n] - lq[n],
                mask_mod=call.bound_mask_mod(lq[n], lk[n]),
                score_mod=call.bound_score_mod(lq[n], lk[n]),
                upcast=upcast,
                keep_fn=dropout_keep,
            )
            outs.append(o.transpose(0, 1))
            lses.append(lse)
        out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, call.Hq, call.Dv)
        lse = torch.cat(lses, dim=1) if lses else q.new_zeros(call.Hq, 0, dtype=torch.float32)
    else:
        qh, kh, vh = (to_bhsd(t, call.layout) for t in (q, k, v))
        bias = _bias_view(call, (call.batch, call.Hq, call.Sq, call.Sk))
        mask_mod = call.bound_mask_mod(call.Sq, call.Sk)
        score_mod = call.bound_score_mod(call.Sq, call.Sk)
        for b in range(call.batch):
            o, lse = _attend(
                call,
                qh[b],
                kh[b],
                vh[b],
                None if bias is None else bias[b : b + 1],
                b=b,
                off=call.Sk - call.Sq,
                mask_mod=mask_mod,
                score_mod=score_mod,
                upcast=upcast,
                keep_fn=dropout_keep,
            )
            outs.append(o)
            lses.append(lse)
        if outs:
            out = torch.stack(outs)
            lse = torch.stack(lses)
        else:
            out = q.new_zeros(0, call.Hq, call.Sq, call.Dv)
            lse = q.new_zeros(0, call.Hq, call.Sq, dtype=torch.float32)
        if call.layout == "bshd":
            out = out.transpose(1, 2)
    out = out.to(out_dtype)
    if call.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
        # No key anywhere: the result is constant, but callers still expect a graph to backprop through.
        out = out + 0.0 * (q.sum() + k.sum() + v.sum()).to(out_dtype)
    return out, lse


class ReferenceBackend(Backend):
    name = "reference"
    description = "exact PyTorch oracle (chunked, float32 accumulation); every feature, any device"

    def why_not(self, call):
        return []

    def run(self, call):
        return reference_forward(call)

    def compute_seconds(self, call):
        # Plain PyTorch at a few percent of the chip.
        if call.device.type == "cuda":
            rate = 20e12
        else:  # measured on a 2-core CPU: ~6x slower than SDPA's CPU flash kernel for fwd+bwd
            rate = 3e9 if call.requires_grad else 10e9
        return attention_flops(call, call.requires_grad, dense=True) / rate

    def overhead_seconds(self, call):
        return 1e-3  # per-chunk Python overhead

    def notes(self, call):
        return ["exact oracle: chunked dense scores, meant for checking, not speed"]


BACKEND = ReferenceBackend()
