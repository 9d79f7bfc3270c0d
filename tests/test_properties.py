"""Hypothesis property tests: attention(backend="auto") and each CPU backend vs the direct float64 formula,
over layouts, GQA ratios, head dims (incl. 80 and 96), ragged thd batches (with length-0 and length-1
sequences), causal/windows, composed masks and the fully masked rows they produce.

Profiles: HYPOTHESIS_PROFILE=ci (default, few examples) or dev (many); see conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnkit
import oracle
from attnkit import UnsupportedError, dispatch, masks

CPU_BACKENDS = [r.name for r in attnkit.backends() if r.name != "triton"]


def base_masks():
    return st.one_of(
        st.just(masks.causal()),
        st.builds(masks.sliding_window, st.integers(-1, 3), st.integers(-1, 3)),
        st.builds(masks.chunked, st.integers(1, 4)),
        st.builds(masks.prefix_lm, st.integers(0, 4)),
        st.just(masks.full()),
        st.sampled_from([0, 1, 2]).map(
            lambda r: masks.from_mask_mod(lambda b, h, qi, ki: (qi + ki + h) % 3 != r, f"mod3!={r}")
        ),
    )


mask_strategy = st.recursive(
    base_masks(),
    lambda inner: st.one_of(
        st.tuples(inner, inner).map(lambda t: t[0] & t[1]),
        st.tuples(inner, inner).map(lambda t: t[0] | t[1]),
        inner.map(lambda m: ~m),
    ),
    max_leaves=3,
)


@st.composite
def problems(draw):
    """(q, k, v, kwargs) of a random small problem, fp32 on the CPU."""
    layout = draw(st.sampled_from(["bhsd", "bshd", "thd"]))
    Hk = draw(st.sampled_from([1, 2]))
    Hq = Hk * draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([8, 16, 80, 96]))
    Dv = draw(st.sampled_from([D, D, 8, 96]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = dict(Hq=Hq, Hk=Hk, D=D, Dv=Dv, generator=gen, requires_grad=draw(st.booleans()))
    if layout == "thd":
        n = draw(st.integers(1, 4))
        lq = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
        same = draw(st.booleans())
        lk = lq if same else draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
        if sum(lq) == 0 or sum(lk) == 0:  # keep something to compute (empty batches are tested elsewhere)
            lq, lk = lq + [1], lk + [1]
        shape.update(seqlens_q=lq, seqlens_k=lk)
    else:
        shape.update(B=draw(st.integers(1, 2)), Sq=draw(st.integers(1, 11)), Sk=draw(st.integers(1, 11)))
    q, k, v, kw = oracle.make_inputs(layout, **shape)
    kw["causal"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 4)), draw(st.integers(-1, 4)))
    if draw(st.booleans()):
        kw["mask"] = draw(mask_strategy)
    return q, k, v, kw


def _run(name):
    def run(q, k, v, return_lse=True, **kw):
        return attnkit.attention(q, k, v, backend=name, return_lse=True, **kw)

    return run


@given(problems())
def test_auto_matches_float64_formula(problem):
    q, k, v, kw = problem
    oracle.check_against_oracle(_run("auto"), q, k, v, **kw)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@given(problem=problems(), with_lse=st.booleans())
def test_each_backend_matches_float64_formula(name, problem, with_lse):
    rec = next(r for r in attnkit.backends() if r.name == name)
    if not rec.available:
        pytest.skip(f"{name} unavailable: {rec.reason}")
    q, k, v, kw = problem
    be = dispatch.get(name)
    reasons = be.why_not(oracle.make_call(q, k, v, return_lse=with_lse, **kw))
    if reasons:
        with pytest.raises(UnsupportedError):
            attnkit.attention(q, k, v, backend=name, return_lse=with_lse, **kw)
        return

    def run(q, k, v, return_lse=True, **kw2):
        res = attnkit.attention(q, k, v, backend=name, return_lse=with_lse, **kw2)
        return res if with_lse else (res, None)

    oracle.check_against_oracle(run, q, k, v, **kw)


@given(problems())
def test_fully_masked_rows_are_zero_with_minus_inf_lse(problem):
    """Wherever the float64 formula finds no visible key, out is exactly 0 and lse exactly -inf."""
    q, k, v, kw = problem
    out, lse = attnkit.attention(q, k, v, return_lse=True, **kw)
    _, lse64 = oracle.attention64(q.detach(), k.detach(), v.detach(), **kw)
    dead = torch.isinf(lse64)
    assert torch.equal(torch.isinf(lse), dead)
    o = out.detach()
    if kw["layout"] == "thd":
        o = o.permute(1, 0, 2)  # (Hq, T, Dv), lines up with lse (Hq, T)
    elif kw["layout"] == "bshd":
        o = o.transpose(1, 2)
    assert torch.all(o[dead] == 0)
    assert not torch.isnan(o).any()
