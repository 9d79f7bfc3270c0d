"""``attnkit.merge_attention`` (docs/api.md §4): parts over disjoint key sets merge to attention over all.

Parts come from the reference on key subsets; the merge is held to the float64 oracle on the whole key set
(tests/oracle.py). Both paths run: the differentiable PyTorch merge (with gradients) and the fused combine
kernel (no gradient; the Triton interpreter on the CPU).
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import attnkit  # noqa: E402
import oracle  # noqa: E402
from attnkit.merge import _fused, merge_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("bhsd", "bshd", "thd")


def _split_attention(q, k, v, kw, cuts, backend="reference"):
    """Attention of q against consecutive key ranges split at ``cuts`` (positions along the key dim, per
    sequence for thd): list of (out, lse). No causal flags: the parts are plain subsets."""
    layout = kw["layout"]
    outs, lses = [], []
    bounds = [0, *cuts, None]
    for a, b in zip(bounds, bounds[1:]):
        if layout == "thd":
            ck = kw["cu_seqlens_k"].tolist()
            idx = []
            lens = []
            for n in range(len(ck) - 1):
                L = ck[n + 1] - ck[n]
                hi = L if b is None else min(b, L)
                lo = min(a, hi)
                idx += list(range(ck[n] + lo, ck[n] + hi))
                lens.append(hi - lo)
            idx = torch.tensor(idx, dtype=torch.long, device=k.device)
            kp, vp = k.index_select(0, idx), v.index_select(0, idx)
            pkw = dict(kw, cu_seqlens_k=oracle.cu_seqlens(lens, k.device), max_seqlen_k=max(lens))
        else:
            dim = 2 if layout == "bhsd" else 1
            n = k.shape[dim]
            hi = n if b is None else min(b, n)
            kp, vp = k.narrow(dim, a, hi - a), v.narrow(dim, a, hi - a)
            pkw = kw
        o, lse = attnkit.attention(q, kp, vp, return_lse=True, backend=backend, **pkw)
        outs.append(o)
        lses.append(lse)
    return outs, lses


def _inputs(layout, dtype, requires_grad=False):
    if layout == "thd":
        return oracle.make_inputs(
            "thd",
            Hq=4,
            Hk=2,
            D=16,
            seqlens_q=[3, 1, 4],
            seqlens_k=[9, 2, 13],
            dtype=dtype,
            device=DEV,
            requires_grad=requires_grad,
        )
    return oracle.make_inputs(
        layout, B=2, Hq=4, Hk=2, Sq=5, Sk=19, D=16, dtype=dtype, device=DEV, requires_grad=requires_grad
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("grad", [False, True], ids=["fused", "autograd"])
def test_merge_equals_full_attention(layout, dtype, grad):
    q, k, v, kw = _inputs(layout, dtype, requires_grad=grad)

    def run(q, k, v, bias=None, return_lse=True, **kw):
        outs, lses = _split_attention(q, k, v, kw, cuts=[4, 11])
        assert _fused(outs, lses) == (not grad)
        return attnkit.merge_attention(outs, lses, layout=kw["layout"])

    oracle.check_against_oracle(run, q, k, v, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_parts_and_all_empty_rows(layout):
    """Parts that saw no key (lse = -inf, out anything) contribute nothing; rows empty in every part give
    0 and -inf; gradients stay finite (no NaN) through the autograd path."""
    q, k, v, kw = _inputs(layout, torch.float32)
    outs, lses = _split_attention(q, k, v, kw, cuts=[7])
    # a third part that is empty everywhere, with garbage (NaN) output
    outs.append(torch.full_like(outs[0], float("nan")))
    lses.append(torch.full_like(lses[0], float("-inf")))
    # make some rows empty in every part
    dead = torch.zeros_like(lses[0], dtype=torch.bool)
    dead.view(-1)[::3] = True
    lses = [torch.where(dead, float("-inf"), s) for s in lses]
    ref_out, ref_lse = attnkit.merge_attention(outs[:2], [s for s in lses[:2]], layout=layout)
    out, lse = attnkit.merge_attention(outs, lses, layout=layout)  # fused
    assert not torch.isnan(out).any()
    assert torch.equal(torch.isinf(lse), dead)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    # rows dead everywhere are exactly 0
    from attnkit.merge import _lse_view

    assert torch.equal(out * _lse_view(dead, layout), torch.zeros_like(out))

    # autograd path: finite gradients, no NaN, even through all -inf rows
    parts = [o.detach().clone().nan_to_num(0.0).requires_grad_(True) for o in outs]
    ls = [s.detach().clone().requires_grad_(True) for s in lses]
    o2, l2 = attnkit.merge_attention(parts, ls, layout=layout)
    (o2.sum() + l2[torch.isfinite(l2)].sum()).backward()
    for t in parts + ls:
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_fused_matches_reference_on_random_lses():
    """Random parts and lses (some -inf) in every layout: the kernel against the PyTorch definition."""
    for layout, shape, lshape in (
        ("bhsd", (2, 3, 7, 24), (2, 3, 7)),
        ("bshd", (2, 7, 3, 24), (2, 3, 7)),
        ("thd", (9, 3, 24), (3, 9)),
    ):
        outs = [torch.randn(shape, device=DEV) for _ in range(4)]
        lses = [torch.randn(lshape, device=DEV) * 3 for _ in range(4)]
        for s in lses:
            s[torch.rand(lshape, device=DEV) < 0.3] = -math.inf
        out, lse = attnkit.merge_attention(outs, lses, layout=layout)
        ref_out, ref_lse = merge_reference(outs, lses, layout)
        torch.testing.assert_close(out, ref_out, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=2e-6)


def test_single_part_and_errors():
    o = torch.randn(1, 2, 3, 4)
    s = torch.randn(1, 2, 3)
    out, lse = attnkit.merge_attention([o], [s])
    assert out is o and torch.equal(lse, s)
    with pytest.raises(attnkit.AttentionInputError, match="lses"):
        attnkit.merge_attention([o, o], [s])
    with pytest.raises(attnkit.AttentionInputError, match=r"lses\[1\]"):
        attnkit.merge_attention([o, o], [s, s.transpose(1, 2)])
    with pytest.raises(attnkit.AttentionInputError, match=r"outs\[1\]"):
        attnkit.merge_attention([o, o.half()], [s, s])
    with pytest.raises(attnkit.AttentionInputError, match="layout"):
        attnkit.merge_attention([o, o], [s, s], layout="bsd")
