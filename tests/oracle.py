"""Test oracle, shared by every test file (``import oracle``).

(a) :func:`attention64`: docs/api.md's score pipeline written out directly as a dense float64 formula. It
    deliberately does not call attnkit's reference or ``_semantics``: the reference is checked against it,
    so the oracle is not its own judge. It only uses attnkit to *bind* a ``Mask``/``ScoreMod`` to the
    sequence lengths (their own meaning is checked against hand-written dense masks in test_masks_mods.py).
(b) :func:`assert_close` / :func:`check_against_oracle`: the oracle rule. A result's max error against
    the float64 formula must be at most twice the error of the same computation done by plain PyTorch in the
    input dtype (``reference_forward(call, upcast=False)`` on the same low-precision inputs), plus a floor of
    a few units in the last place of the input dtype at the magnitude of the values. NaN never passes;
    infinities (lse = -inf on fully masked rows) must match exactly.
(c) Random input makers: every layout, GQA ratios, D != Dv, ragged ``thd`` batches with empty and
    length-1 sequences.
"""

from __future__ import annotations

import math

import torch

from attnkit._call import normalize
from attnkit.backends.reference import reference_forward
from attnkit.masks import Mask
from attnkit.mods import ScoreMod

F64 = torch.float64


# Floor of the oracle rule, in units of the input dtype's epsilon at the magnitude of the reference values.
# It matters only where the plain computation happens to be exact (e.g. a row with one visible key): a
# correct kernel that sums in another order can still be a few units in the last place off there.
FLOOR_ULPS = 2


# ----------------------------------------------------------------------------------------------------------
# (a) the direct float64 formula
# ----------------------------------------------------------------------------------------------------------
def _bind_mask(mask, Sq, Sk):
    if mask is None:
        return None
    if isinstance(mask, Mask):
        return mask.bind(Sq, Sk)
    if type(mask).__name__ == "BlockMask":
        return mask.mask_mod
    return mask


def _bind_mod(score_mod, Sq, Sk):
    if isinstance(score_mod, ScoreMod):
        return score_mod.bind(Sq, Sk)
    return score_mod


def visibility(B, Hq, Sq, Sk, b_idx=None, *, causal=False, window=None, mask_mod=None, device=None):
    """(B, Hq, Sq, Sk) bool: which keys each query sees (flags bottom-right aligned, then ``mask_mod(b, h,
    i, j)`` on broadcast index grids); ``b_idx`` (B,) the batch (or sequence) index of each row, default
    0..B-1."""
    b_idx = torch.arange(B) if b_idx is None else b_idx
    b = b_idx.to(device).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=device).view(1, Hq, 1, 1)
    i = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
    j = torch.arange(Sk, device=device).view(1, 1, 1, Sk)
    pos = i + (Sk - Sq)  # bottom-right alignment
    vis = torch.ones(B, Hq, Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= pos)
    if window is not None:
        left, right = window
        if left >= 0:
            vis = vis & (j >= pos - left)
        if right >= 0:
            vis = vis & (j <= pos + right)
    if mask_mod is not None:
        vis = vis & torch.as_tensor(mask_mod(b, h, i, j), device=device).to(torch.bool)
    return vis


def dense_bhsd64(
    q,
    k,
    v,
    *,
    b_idx,
    scale,
    causal=False,
    window=None,
    softcap=None,
    slopes=None,
    bias=None,
    score_mod=None,
    mask_mod=None,
    keep=None,
    dropout_p=0.0,
):
    """One dense problem. q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv), all float64; ``b_idx`` (B,)
    the batch (or sequence) index of each row of the batch; bias broadcastable to (B, Hq, Sq, Sk); keep a
    bool dropout keep-mask (B, Hq, Sq, Sk). Returns out (B, Hq, Sq, Dv) and lse (B, Hq, Sq), float64."""
    B, Hq, Sq, _ = q.shape
    Hk, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Sq == 0 or Sk == 0:
        out = q.new_zeros(B, Hq, Sq, Dv) + 0.0 * (q.sum() + k.sum() + v.sum())
        return out, q.new_full((B, Hq, Sq), -math.inf).detach()
    g = Hq // Hk
    k = k.repeat_interleave(g, dim=1)  # query head h reads kv head h // g
    v = v.repeat_interleave(g, dim=1)
    s = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    dev = q.device
    b = b_idx.to(dev).view(B, 1, 1, 1)
    h = torch.arange(Hq, device=dev).view(1, Hq, 1, 1)
    i = torch.arange(Sq, device=dev).view(1, 1, Sq, 1)
    j = torch.arange(Sk, device=dev).view(1, 1, 1, Sk)
    pos = i + (Sk - Sq)  # bottom-right alignment
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(F64)
    if slopes is not None:
        sl = slopes.to(F64)
        sl = sl.view(1, Hq, 1, 1) if sl.dim() == 1 else sl[b_idx].view(B, Hq, 1, 1)
        s = s - sl * (pos - j).abs().to(F64)
    if score_mod is not None:
        r = score_mod(s, b, h, i, j)
        r = r.to(F64) if isinstance(r, torch.Tensor) else torch.tensor(float(r), dtype=F64, device=dev)
        s = r.expand(B, Hq, Sq, Sk)
    vis = visibility(B, Hq, Sq, Sk, b_idx, causal=causal, window=window, mask_mod=mask_mod, device=dev)
    any_vis = vis.any(dim=-1, keepdim=True)
    s = torch.where(vis, s, torch.tensor(-math.inf, dtype=F64, device=dev))
    s = torch.where(any_vis, s, torch.zeros((), dtype=F64, device=dev))  # dummy finite row, zeroed below
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    p = torch.where(any_vis, p, torch.zeros((), dtype=F64, device=dev))
    lse = torch.where(any_vis.squeeze(-1), lse, torch.tensor(-math.inf, dtype=F64, device=dev))
    if keep is not None:
        p = p * keep.to(F64) / (1.0 - dropout_p)
    return p @ v, lse


def attention64(
    q,
    k,
    v,
    *,
    layout="bhsd",
    causal=False,
    window=None,
    softcap=None,
    alibi_slopes=None,
    bias=None,
    score_mod=None,
    mask=None,
    scale=None,
    dropout_p=0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    keep=None,
    **_ignored,
):
    """docs/api.md §1 in float64, densely. Takes the arguments of ``attnkit.attention`` (extra ones such as
    ``backend``/``return_lse`` are ignored) and returns ``(out, lse)`` in float64, in the call's layout.
    Tensors are converted with ``.to(float64)``, so float64 leaves receive gradients. ``keep``: optional
    bool dropout keep-mask (B, Hq, Sq, Sk) for dense layouts (used with ``dropout_p``)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if window is not None and tuple(window) == (-1, -1):
        window = None
    common = dict(scale=scale, causal=causal, window=window, softcap=softcap, slopes=alibi_slopes)
    if layout in ("bhsd", "bshd"):
        if layout == "bshd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        B, _, Sq, _ = q.shape
        Sk = k.shape[2]
        out, lse = dense_bhsd64(
            q,
            k,
            v,
            b_idx=torch.arange(B),
            bias=bias,
            score_mod=_bind_mod(score_mod, Sq, Sk),
            mask_mod=_bind_mask(mask, Sq, Sk),
            keep=keep,
            dropout_p=dropout_p,
            **common,
        )
        if layout == "bshd":
            out = out.transpose(1, 2)
        return out, lse
    assert layout == "thd"
    assert keep is None, "dropout keep-masks are only supported for dense layouts here"
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    N = len(cq) - 1
    lq = [cq[n + 1] - cq[n] for n in range(N)]
    lk = [ck[n + 1] - ck[n] for n in range(N)]
    Hq = q.shape[1]
    mq = max_seqlen_q if max_seqlen_q is not None else max(lq, default=0)
    mk = max_seqlen_k if max_seqlen_k is not None else max(lk, default=0)
    if bias is not None:
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(N, Hq, mq, mk)
    outs, lses = [], []
    for n in range(N):
        qn = q[cq[n] : cq[n + 1]].transpose(0, 1).unsqueeze(0)
        kn = k[ck[n] : ck[n + 1]].transpose(0, 1).unsqueeze(0)
        vn = v[ck[n] : ck[n + 1]].transpose(0, 1).unsqueeze(0)
        bn = None if bias is None else bias[n : n + 1, :, : lq[n], : lk[n]]
        o, lse = dense_bhsd64(
            qn,
            kn,
            vn,
            b_idx=torch.tensor([n]),
            bias=bn,
            score_mod=_bind_mod(score_mod, lq[n], lk[n]),
            mask_mod=_bind_mask(mask, lq[n], lk[n]),
            **common,
        )
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(0, Hq, v.shape[-1])
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros(Hq, 0)
    return out, lse


# ----------------------------------------------------------------------------------------------------------
# (b) the oracle rule
# ----------------------------------------------------------------------------------------------------------
def make_call(q, k, v, **kw):
    """A validated AttentionCall for ``attention(q, k, v, **kw)`` (``backend`` is ignored)."""
    return normalize(q, k, v, **{key: val for key, val in kw.items() if key != "backend"})


def _finite_max_abs(x: torch.Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.abs().max()) if x.numel() else 0.0


def error_budget(
    ref64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype, term_scale: float = 0.0
) -> tuple[float, float, float]:
    """(budget, baseline error, floor) of the oracle rule: ``2 * |baseline - ref|_max + floor``.

    ``floor = FLOOR_ULPS * (eps(dtype) * max(1, |ref|_max) + eps(float32) * term_scale)``. The second term
    covers gradients whose exact value comes from a cancellation (dS = P * (dP - rowsum(dO * O))) between
    terms of size ``term_scale``: any kernel forms those in float32 or better, in its own order, so it may be
    that far off where the naive computation cancels exactly."""
    r = ref64.detach().to(F64)
    bl = baseline.detach().to(F64)
    assert not torch.isnan(bl).any(), "the plain-PyTorch baseline itself produced NaN"
    fin = torch.isfinite(r) & torch.isfinite(bl)
    base_err = float((bl - r)[fin].abs().max()) if fin.any() else 0.0
    floor = FLOOR_ULPS * (
        torch.finfo(dtype).eps * max(1.0, _finite_max_abs(r)) + torch.finfo(torch.float32).eps * term_scale
    )
    return 2.0 * base_err + floor, base_err, floor


def assert_close(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor,
    *,
    dtype=None,
    name="out",
    term_scale: float = 0.0,
):
    """The oracle rule for one tensor (see the module docstring)."""
    dtype = dtype or baseline.dtype
    assert tuple(actual.shape) == tuple(ref64.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    )
    a = actual.detach().to(F64)
    r = ref64.detach().to(F64)
    assert not torch.isnan(r).any(), f"{name}: the float64 oracle produced NaN (test bug)"
    assert not torch.isnan(a).any(), f"{name}: NaN in result ({int(torch.isnan(a).sum())} elements)"
    inf_r, inf_a = torch.isinf(r), torch.isinf(a)
    assert torch.equal(inf_a, inf_r), (
        f"{name}: infinities differ ({int(inf_a.sum())} in result, {int(inf_r.sum())} in the float64 oracle)"
    )
    assert torch.equal(a[inf_a], r[inf_r]), f"{name}: infinities of the wrong sign"
    fin = ~inf_r
    err = float((a - r)[fin].abs().max()) if fin.any() else 0.0
    budget, base_err, floor = error_budget(r, baseline, dtype, term_scale)
    assert err <= budget, (
        f"{name}: max error {err:.3g} vs the float64 oracle exceeds the budget {budget:.3g} "
        f"(2 x plain-{dtype} error {base_err:.3g} + floor {floor:.3g})"
    )
    return err, budget


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(F64).norm(dim=-1)


def clone_leaf(t, dtype=None):
    if t is None:
        return None
    x = t.detach().clone()
    if dtype is not None:
        x = x.to(dtype)
    return x.requires_grad_(t.requires_grad)


def check_against_oracle(run, q, k, v, *, bias=None, check_lse=True, check_grads=True, **kw):
    """Run ``run(q, k, v, bias=..., return_lse=True, **kw) -> (out, lse or None)`` and hold its forward,
    lse and gradients (for every input that requires grad) to the oracle rule.

    The same inputs go, as float64 copies, through :func:`attention64`, and, as copies in their own
    dtype, through the plain-PyTorch baseline ``reference_forward(call, upcast=False)``. Returns a dict
    with the results, for further checks."""
    leaves = {"q": q, "k": k, "v": v, "bias": bias}
    mine = {n: clone_leaf(t) for n, t in leaves.items()}
    ref = {n: clone_leaf(t, F64) for n, t in leaves.items()}
    base = {n: clone_leaf(t) for n, t in leaves.items()}

    res = run(mine["q"], mine["k"], mine["v"], bias=mine["bias"], return_lse=True, **kw)
    out, lse = res if isinstance(res, tuple) else (res, None)
    out64, lse64 = attention64(ref["q"], ref["k"], ref["v"], bias=ref["bias"], **kw)
    call = make_call(base["q"], base["k"], base["v"], bias=base["bias"], return_lse=True, **kw)
    outb, lseb = reference_forward(call, upcast=False)

    assert out.dtype == q.dtype, f"out dtype {out.dtype} != q dtype {q.dtype}"
    assert_close(out, out64, outb, dtype=q.dtype, name="out")
    if check_lse and lse is not None:
        assert lse.dtype == torch.float32, f"lse dtype {lse.dtype}, expected float32"
        assert_close(lse, lse64, lseb, dtype=q.dtype, name="lse")

    wants_grad = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    if check_grads and wants_grad:
        g = torch.randn(out.shape, dtype=out.dtype, device=out.device)
        out.backward(g)
        out64.backward(g.to(F64))
        outb.backward(g.to(outb.dtype))
        # Size of the terms dP_ij = <dO_i, v_j> that cancel in dS (see error_budget).
        terms = float(_row_norms(g).max() * _row_norms(v).max()) if g.numel() and v.numel() else 0.0
        for n in wants_grad:
            assert mine[n].grad is not None, f"no gradient reached {n}"
            assert_close(
                mine[n].grad, ref[n].grad, base[n].grad, dtype=q.dtype, name=f"grad {n}", term_scale=terms
            )
    return dict(out=out, lse=lse, out64=out64, lse64=lse64, inputs=mine, ref_inputs=ref)


# ----------------------------------------------------------------------------------------------------------
# (c) random inputs
# ----------------------------------------------------------------------------------------------------------
def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


def ragged_lengths(
    n: int, max_len: int, generator=None, *, include_empty=True, include_one=True
) -> list[int]:
    """n random sequence lengths in [0, max_len]; with include_empty / include_one (and n >= 2) at least one
    sequence of length 0 and one of length 1 are present, at random places."""
    lens = torch.randint(0, max_len + 1, (n,), generator=generator).tolist()
    perm = torch.randperm(n, generator=generator).tolist()
    if include_empty and n >= 1:
        lens[perm[0]] = 0
    if include_one and n >= 2:
        lens[perm[1]] = 1
    return lens


def randn(shape, dtype=torch.float32, device="cpu", generator=None, requires_grad=False, std=1.0):
    x = torch.randn(shape, dtype=torch.float32, generator=generator) * std
    return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def make_inputs(
    layout="bhsd",
    *,
    B=2,
    Hq=4,
    Hk=None,
    Sq=8,
    Sk=None,
    D=16,
    Dv=None,
    dtype=torch.float32,
    device="cpu",
    seqlens_q=None,
    seqlens_k=None,
    requires_grad=False,
    generator=None,
):
    """Fresh random (q, k, v, kwargs) for ``attention(q, k, v, **kwargs)``.

    For ``thd`` give ``seqlens_q`` (and ``seqlens_k``, default the same); kwargs then carries the int32
    cu_seqlens. ``Hk`` defaults to ``Hq``, ``Sk`` to ``Sq``, ``Dv`` to ``D``."""
    Hk = Hq if Hk is None else Hk
    Sk = Sq if Sk is None else Sk
    Dv = D if Dv is None else Dv
    kw = {"layout": layout}
    if layout == "bhsd":
        shapes = (B, Hq, Sq, D), (B, Hk, Sk, D), (B, Hk, Sk, Dv)
    elif layout == "bshd":
        shapes = (B, Sq, Hq, D), (B, Sk, Hk, D), (B, Sk, Hk, Dv)
    elif layout == "thd":
        assert seqlens_q is not None, "thd needs seqlens_q"
        seqlens_k = seqlens_q if seqlens_k is None else seqlens_k
        Tq, Tk = sum(seqlens_q), sum(seqlens_k)
        shapes = (Tq, Hq, D), (Tk, Hk, D), (Tk, Hk, Dv)
        kw["cu_seqlens_q"] = cu_seqlens(seqlens_q, device)
        kw["cu_seqlens_k"] = cu_seqlens(seqlens_k, device)
    else:
        raise ValueError(layout)
    q, k, v = (randn(s, dtype, device, generator, requires_grad) for s in shapes)
    return q, k, v, kw


def batch_dims(q, kw) -> tuple[int, int, int]:
    """(B or N, max Sq, max Sk) of an input made by :func:`make_inputs` (for shaping bias/masks)."""
    layout = kw.get("layout", "bhsd")
    if layout == "thd":
        cq, ck = kw["cu_seqlens_q"], kw["cu_seqlens_k"]
        lq, lk = (cq[1:] - cq[:-1]).tolist(), (ck[1:] - ck[:-1]).tolist()
        return len(lq), max(lq, default=0), max(lk, default=0)
    raise NotImplementedError("use the shapes you made the inputs with")


def alibi_slopes(H: int, device="cpu") -> torch.Tensor:
    """The standard ALiBi slopes 2^(-8 (h+1) / H), float32 (H,)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float32, device=device)


def tri(q, k, v, **kw):
    """``attnkit.attention`` on the triton backend (the triton test modules' shorthand)."""
    import attnkit

    return attnkit.attention(q, k, v, backend="triton", **kw)
