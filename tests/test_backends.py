"""Every registered backend (except ``triton``, which has tests/test_triton.py) against the float64 oracle.

Generic over ``attnkit.backends()``: a newly registered backend is picked up without editing this file.
For each case, the backend's own ``why_not(call)`` decides: if it claims the call, its forward, lse (when
asked) and gradients must meet the oracle rule (tests/oracle.py) and the backend's ``run`` must really have
been the one that ran; if it refuses, calling it explicitly must raise UnsupportedError with those reasons.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
import oracle
from attnkit import UnsupportedError, dispatch, masks
from attnkit.backends.reference import reference_forward

SKIP = {"triton"}  # tested in its own file
NAMES = [r.name for r in attnkit.backends() if r.name not in SKIP]


def backend_or_skip(name):
    rec = next(r for r in attnkit.backends() if r.name == name)
    if not rec.available:
        pytest.skip(f"{name} unavailable: {rec.reason}")
    return dispatch.get(name)


def _doc_mask(B, S):
    """A document mask built on the device of the call (a mask's tensors live where q lives)."""

    def make(dtype, device, grad):
        ids = torch.sort(torch.randint(0, 3, (B, S), device=device), dim=1).values
        return masks.document(ids) & masks.causal()

    return make


# Each case: a function (dtype, device, grad) -> (q, k, v, kwargs); kwargs may carry a bias.
def _mk(layout="bhsd", **shape):
    def make(dtype, device, grad, **extra):
        q, k, v, kw = oracle.make_inputs(layout, dtype=dtype, device=device, requires_grad=grad, **shape)
        kw.update(extra)
        return q, k, v, kw

    return make


def _case(make, **features):
    def build(dtype, device, grad):
        q, k, v, kw = make(dtype, device, grad)
        for key, val in features.items():
            built = callable(val) and (
                key in ("bias", "alibi_slopes") or getattr(val, "__name__", "") == "make"
            )
            kw[key] = val(dtype, device, grad) if built else val
        return q, k, v, kw

    return build


def _bias(shape):
    return lambda dtype, device, grad: oracle.randn(shape, dtype, device, requires_grad=grad)


def _slopes(H, per_batch=None):
    def make(dtype, device, grad):
        s = oracle.alibi_slopes(H, device)
        return s if per_batch is None else s * torch.rand(per_batch, 1, device=device) * 3

    return make


RAGGED_Q, RAGGED_K = [5, 0, 1, 9, 3], [7, 2, 1, 9, 0]

CASES = {
    "bhsd": _case(_mk(B=2, Hq=4, Sq=16, Sk=16, D=16)),
    "bhsd_gqa_causal_sq<sk": _case(_mk(B=2, Hq=4, Hk=2, Sq=8, Sk=19, D=16), causal=True),
    "bhsd_causal_sq>sk": _case(_mk(B=1, Hq=2, Sq=19, Sk=8, D=16), causal=True),
    "bhsd_causal_square": _case(_mk(B=2, Hq=2, Sq=24, Sk=24, D=32), causal=True),
    "bshd_gqa": _case(_mk("bshd", B=2, Hq=6, Hk=2, Sq=12, Sk=10, D=16)),
    "bshd_mqa_dv": _case(_mk("bshd", B=2, Hq=4, Hk=1, Sq=9, Sk=13, D=16, Dv=8), causal=True),
    "thd_ragged": _case(_mk("thd", Hq=4, Hk=2, D=16, seqlens_q=RAGGED_Q, seqlens_k=RAGGED_K)),
    "thd_ragged_causal": _case(
        _mk("thd", Hq=4, Hk=2, D=16, seqlens_q=RAGGED_Q, seqlens_k=RAGGED_K), causal=True
    ),
    "thd_window": _case(
        _mk("thd", Hq=2, D=16, seqlens_q=[6, 1, 0, 8], seqlens_k=[6, 4, 3, 8]), window=(3, 1)
    ),
    "window_left": _case(_mk(B=2, Hq=2, Sq=16, Sk=16, D=16), window=(4, 0)),
    "window_both_sq<sk": _case(_mk(B=1, Hq=2, Sq=8, Sk=17, D=16), window=(2, 3)),
    "mask_document": _case(_mk(B=2, Hq=2, Sq=16, Sk=16, D=16), mask=_doc_mask(2, 16)),
    "mask_callable": _case(_mk(B=2, Hq=2, Sq=12, Sk=12, D=16), mask=lambda b, h, i, j: (i + j + h) % 3 != 1),
    "mask_combo_sq<sk": _case(_mk(B=1, Hq=2, Sq=6, Sk=14, D=16), mask=masks.chunked(4) | ~masks.causal()),
    "fully_masked_rows": _case(
        _mk(B=2, Hq=2, Sq=10, Sk=10, D=16), mask=lambda b, h, i, j: (i % 3 != 0) & (j <= i)
    ),
    "bias_full": _case(_mk(B=2, Hq=2, Sq=8, Sk=12, D=16), bias=_bias((2, 2, 8, 12))),
    "bias_broadcast_causal": _case(
        _mk(B=2, Hq=4, Hk=2, Sq=8, Sk=12, D=16), bias=_bias((1, 4, 1, 12)), causal=True
    ),
    "bias_thd": _case(
        _mk("thd", Hq=2, D=16, seqlens_q=[3, 0, 5], seqlens_k=[4, 2, 5]), bias=_bias((3, 2, 5, 5))
    ),
    "alibi": _case(_mk(B=2, Hq=4, Sq=10, Sk=14, D=16), alibi_slopes=_slopes(4), causal=True),
    "alibi_per_batch_thd": _case(
        _mk("thd", Hq=4, Hk=2, D=16, seqlens_q=[3, 1, 6], seqlens_k=[5, 0, 6]),
        alibi_slopes=_slopes(4, per_batch=3),
    ),
    "softcap": _case(_mk(B=2, Hq=2, Sq=8, Sk=8, D=16), softcap=2.0, scale=1.0),
    "score_mod": _case(
        _mk(B=2, Hq=2, Sq=8, Sk=11, D=16), score_mod=lambda s, b, h, i, j: s - 0.1 * (i - j).abs() * (h + 1)
    ),
    "scale": _case(_mk(B=1, Hq=2, Sq=8, Sk=8, D=16), scale=0.9),
    "deterministic": _case(_mk(B=1, Hq=2, Sq=8, Sk=8, D=16), deterministic=True, causal=True),
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _dtypes(device):
    return (
        [torch.float32, torch.bfloat16] if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]
    )


def _runner(name, with_lse):
    def run(q, k, v, return_lse=True, **kw):
        res = attnkit.attention(q, k, v, backend=name, return_lse=with_lse, **kw)
        return res if with_lse else (res, None)

    return run


def _check_one(name, case, device, dtype, grad, with_lse, monkeypatch):
    be = backend_or_skip(name)
    q, k, v, kw = CASES[case](dtype, device, grad)
    call = oracle.make_call(q, k, v, return_lse=with_lse, **kw)
    reasons = be.why_not(call)
    if reasons:
        with pytest.raises(UnsupportedError) as info:
            attnkit.attention(q, k, v, backend=name, return_lse=with_lse, **kw)
        assert info.value.backend == name and info.value.reasons == reasons
        return "refused"
    ran = []
    real_run = be.run

    def spy(c):
        ran.append(c)
        return real_run(c)

    monkeypatch.setattr(be, "run", spy)
    bias = kw.pop("bias", None)
    oracle.check_against_oracle(_runner(name, with_lse), q, k, v, bias=bias, **kw)
    assert ran, f"{name} claimed the call but its run() was not the one that ran"
    return "served"


@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "lse"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_backend_vs_oracle_fp32_cpu(name, case, grad, with_lse, monkeypatch):
    _check_one(name, case, "cpu", torch.float32, grad, with_lse, monkeypatch)


LOW_PRECISION_CASES = [
    "bhsd_gqa_causal_sq<sk",
    "thd_ragged_causal",
    "mask_document",
    "bias_broadcast_causal",
    "fully_masked_rows",
    "softcap",
]


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_backend_vs_oracle_bf16_cpu(name, case, grad, monkeypatch):
    _check_one(name, case, "cpu", torch.bfloat16, grad, False, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("with_lse", [False, True], ids=["out", "lse"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_backend_vs_oracle_cuda(name, case, grad, with_lse, dtype, monkeypatch):
    _check_one(name, case, "cuda", dtype, grad, with_lse, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_backend_bigger_shapes_cuda(name, causal, monkeypatch):
    """Longer sequences and D=128 on the GPU (tiles and split paths the tiny cases never reach)."""
    be = backend_or_skip(name)
    q, k, v, kw = oracle.make_inputs(
        "bhsd",
        B=2,
        Hq=8,
        Hk=2,
        Sq=1000,
        Sk=1037,
        D=128,
        dtype=torch.bfloat16,
        device="cuda",
        requires_grad=True,
    )
    call = oracle.make_call(q, k, v, causal=causal, **kw)
    if be.why_not(call):
        pytest.skip(f"{name} refuses: {be.why_not(call)}")
    oracle.check_against_oracle(_runner(name, False), q, k, v, causal=causal, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_backend_refusal_is_never_silent(name):
    """A feature set no backend but the reference serves (softcap + score_mod + lse + ALiBi per batch on a
    ragged thd batch with dropout) runs on the named backend or raises; it never quietly runs elsewhere."""
    be = backend_or_skip(name)
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=8, seqlens_q=[3, 0, 2])
    kw.update(
        softcap=3.0,
        score_mod=lambda s, b, h, i, j: s * 0.5,
        alibi_slopes=torch.rand(3, 2),
        dropout_p=0.1,
        return_lse=True,
    )
    call = oracle.make_call(q, k, v, **kw)
    reasons = be.why_not(call)
    if not reasons:
        out, lse = attnkit.attention(q, k, v, backend=name, **kw)
        assert out.shape == q.shape and lse.shape == (2, 5)
        return
    with pytest.raises(UnsupportedError) as info:
        attnkit.attention(q, k, v, backend=name, **kw)
    for r in reasons:
        assert r in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_backend_dropout_semantics(name):
    """Backends that serve dropout: with v = identity the output is the attention matrix; kept entries
    equal the no-dropout probabilities times 1/(1-p), and about a fraction p is dropped."""
    be = backend_or_skip(name)
    p, Sk = 0.25, 64
    q, k, _, _ = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=32, Sk=Sk, D=16)
    v = torch.eye(Sk).expand(2, 2, Sk, Sk).contiguous()
    call = oracle.make_call(q, k, v, dropout_p=p)
    if be.why_not(call):
        with pytest.raises(UnsupportedError):
            attnkit.attention(q, k, v, dropout_p=p, backend=name)
        return
    probs = attnkit.attention(q, k, v, backend="reference")
    out = attnkit.attention(q, k, v, dropout_p=p, backend=name)
    kept = out != 0
    assert kept.any()
    budget, _, _ = oracle.error_budget(probs.double() / (1 - p), probs / (1 - p), torch.float32)
    assert (out[kept].double() - probs[kept].double() / (1 - p)).abs().max() <= budget
    frac = 1 - kept.double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / kept.numel()), f"dropped {frac:.4f}, expected {p}"


def test_auto_matches_oracle_on_every_case(monkeypatch):
    """backend='auto' on every case (fp32, CPU, with gradients): whichever backend it picks is correct."""
    for case in CASES:
        q, k, v, kw = CASES[case](torch.float32, "cpu", True)
        bias = kw.pop("bias", None)
        oracle.check_against_oracle(_runner("auto", False), q, k, v, bias=bias, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["auto", "flex", "triton", "sdpa_efficient", "sdpa_math"])
def test_float32_mqa_head_dim_80_on_gpu(backend, causal):
    """The H200 case of issue 13 (float32 multi-query attention, Hq=8 Hk=1, D=80, Sq=Sk=65) once exceeded
    the float32 budget on auto and flex: every backend that claims it is held to the oracle, with grads."""
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=8, Hk=1, Sq=65, Sk=65, D=80, dtype=torch.float32, device="cuda", requires_grad=True
    )
    call = attnkit._call.normalize(q, k, v, causal=causal, return_lse=True)
    if backend != "auto" and dispatch.get(backend).why_not(call):
        pytest.skip(f"{backend} refuses: {dispatch.get(backend).why_not(call)}")
    oracle.check_against_oracle(
        lambda *a, **k2: attnkit.attention(*a, backend=backend, **k2), q, k, v, causal=causal, **kw
    )


def test_flex_forward_under_no_grad_with_inputs_that_require_grad(device):
    """Under ``torch.no_grad`` no gradient is wanted even if q/k/v require grad: flex runs (on the CPU
    FlexAttention used to raise "does not support backward on CPU") and matches the reference."""
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (oracle.randn((1, 2, 16, 16), dt, device, requires_grad=True) for _ in range(3))
    mask = masks.prefix_lm(5)
    with torch.no_grad():
        out = attnkit.attention(q, k, v, mask=mask, backend="flex")
        want, _ = reference_forward(attnkit._call.normalize(q, k, v, mask=mask))
    assert not out.requires_grad and (out.float() - want.float()).abs().max() < 2e-2


@pytest.mark.cuda
def test_cudnn_takes_gqa_decode_as_it_is():
    """Where torch's cuDNN kernel takes GQA natively (torch 2.11 on an H200), ``sdpa_cudnn`` runs a decode
    call with its K/V as they are (not expanded: 28x faster at B=16, 32k keys) and matches the oracle."""
    from attnkit.backends import sdpa

    q, k, v, kw = oracle.make_inputs(
        "bshd", B=2, Hq=32, Hk=8, Sq=1, Sk=4096, D=128, dtype=torch.bfloat16, device="cuda"
    )
    call = oracle.make_call(q, k, v, **kw)
    if not sdpa.cudnn_takes_gqa(call):
        pytest.skip("this torch's cuDNN check refuses GQA as it is")
    oracle.check_against_oracle(_runner("sdpa_cudnn", False), q, k, v, check_lse=False, **kw)
    assert dispatch.get("sdpa_cudnn").memory_traffic(call)[1] == 1.0  # K/V read once
