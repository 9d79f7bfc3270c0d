"""The third-party peers as backends: ``flash_attn4``, ``flex_flash``, ``xformers``.

On the CPU (no package, no GPU): each is listed as unavailable with its reason; the capability rules that do
not depend on the device; and the argument translation, run against stand-in modules injected into
``sys.modules`` that implement the peers' documented semantics in float64 (FA4's ``mask.py`` window rules,
which read a -1 side literally; xFormers' bias classes as their ``materialize`` defines them), so a wrong
translation (a -1 passed through, top-left causal, heads expanded the wrong way, lse in the wrong shape)
gives a wrong answer against attnkit's reference.

On the GPU (``@pytest.mark.cuda``, each test skipped where its package does not import): every feature each
backend claims against the float64 oracle (tests/oracle.py), forward, lse and gradients, and refusals with
reasons for what it does not claim. tests/test_backends.py also runs its generic cases over them.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import pytest
import torch

import attnkit
import oracle
from attnkit import UnsupportedError, dispatch, masks
from attnkit.backends import _cute, _flex_common, _optional
from attnkit.backends import flash_attn4 as fa4_backend
from attnkit.backends import flex_flash as flex_flash_backend
from attnkit.backends import xformers as xformers_backend
from attnkit.backends.reference import reference_forward

F64 = torch.float64
PEERS = {"flash_attn4": "flash_attn.cute", "flex_flash": "flash_attn.cute", "xformers": "xformers.ops"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------
# availability and listing
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PEERS))
def test_peer_is_listed_with_a_reason_when_unavailable(name):
    rec = {r.name: r for r in attnkit.backends()}[name]
    if _installed(PEERS[name]) and torch.cuda.is_available():
        pytest.skip(f"{PEERS[name]} is installed here")
    assert not rec.available
    assert rec.reason and (PEERS[name] in rec.reason or "CUDA" in rec.reason or "SM" in rec.reason)


@pytest.mark.parametrize("name", list(PEERS))
def test_unavailable_peer_named_explicitly_raises(name):
    rec = {r.name: r for r in attnkit.backends()}[name]
    if rec.available:
        pytest.skip(f"{name} is available here")
    q, k, v, kw = oracle.make_inputs(B=1, Hq=2, Sq=8, D=16)
    with pytest.raises(UnsupportedError) as info:
        attnkit.attention(q, k, v, backend=name, **kw)
    assert info.value.reasons == [rec.reason]
    assert attnkit.explain(q, k, v, **kw).chosen not in PEERS  # auto never picks an unavailable peer


def test_info_lists_every_optional_backend(capsys):
    from attnkit import cli

    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for name in [*PEERS, "flash_attn", "flash_attn3", "transformer_engine", "flashinfer"]:
        assert f"  {name} " in text, name
    probed = {r["name"]: r for r in _optional.probe()}
    assert set(probed) == {"flash_attn", "flash_attn3", "transformer_engine", "flashinfer"}
    assert all(not r["available"] and r["reason"] for r in probed.values())


# ----------------------------------------------------------------------------------------------------------
# capability rules that do not depend on the device
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "D, Dv, major, ok",
    [
        (128, 128, 9, True),
        (256, 256, 9, True),
        (96, 64, 9, True),
        (264, 264, 9, False),
        (4, 4, 9, False),
        (100, 100, 9, False),  # not a multiple of 8
        (128, 128, 10, True),
        (192, 128, 10, True),
        (256, 256, 10, True),
        (192, 192, 10, False),
        (160, 160, 10, False),
    ],
)
def test_fa4_head_dims(D, Dv, major, ok):
    assert (not _cute.head_dim_reasons(D, Dv, major)) == ok


def test_fa4_sm100_hd256_softcap_backward_refused():
    assert _cute.head_dim_reasons(256, 256, 10, softcap=True, grad=True)
    assert not _cute.head_dim_reasons(256, 256, 10, softcap=True, grad=False)
    assert not _cute.head_dim_reasons(256, 256, 9, softcap=True, grad=True)


def _call(layout="bhsd", **kw):
    shape = {
        k: kw.pop(k)
        for k in list(kw)
        if k in ("B", "Hq", "Hk", "Sq", "Sk", "D", "Dv", "seqlens_q", "seqlens_k")
    }
    grad = kw.pop("requires_grad", False)
    q, k, v, base = oracle.make_inputs(layout, dtype=kw.pop("dtype", F64), requires_grad=grad, **shape)
    base.update(kw)
    return oracle.make_call(q, k, v, **base), (q, k, v, base)


def test_fa4_refuses_what_it_has_not():
    assert not fa4_backend.feature_reasons(_call(causal=True, window=(3, -1), softcap=5.0)[0])
    for kw in (
        dict(bias=torch.randn(1, 4, 8, 8, dtype=F64)),
        dict(alibi_slopes=oracle.alibi_slopes(4)),
        dict(score_mod=lambda s, b, h, i, j: s * 0.5),
        dict(mask=masks.chunked(4)),
    ):
        assert fa4_backend.feature_reasons(_call(**kw)[0]), kw
    cpu = fa4_backend.BACKEND.why_not(_call()[0])
    assert cpu and "CUDA" in cpu[0]


def test_fa4_refuses_varlen_window_backward_only():
    """FA4's varlen backward with a window gave wrong dQ on the H200: thd + window + grad is refused; the
    forward, the dense window backward and the varlen causal backward stay claimed."""
    thd = dict(layout="thd", Hq=2, D=8, seqlens_q=[6, 1, 4], seqlens_k=[6, 4, 9])
    reasons = fa4_backend.feature_reasons(_call(**thd, window=(2, 1), requires_grad=True)[0])
    assert reasons and "varlen" in reasons[0] and "window" in reasons[0]
    assert fa4_backend.feature_reasons(_call(**thd, causal=True, window=(2, -1), requires_grad=True)[0])
    assert not fa4_backend.feature_reasons(_call(**thd, window=(2, 1))[0])
    assert not fa4_backend.feature_reasons(_call(**thd, causal=True, requires_grad=True)[0])
    assert not fa4_backend.feature_reasons(_call(Sq=8, window=(2, 1), requires_grad=True)[0])


class _NoLseGrad(torch.autograd.Function):  # as flash-attn's cute/interface.py (2025-2026 sources) has it
    @staticmethod
    def forward(ctx, q):
        lse = q.sum(-1)
        ctx.mark_non_differentiable(lse)
        return q, lse

    @staticmethod
    def backward(ctx, dout, *args):
        return dout


class _LseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q):
        return q, q.sum(-1)

    @staticmethod
    def backward(ctx, dout, dlse):
        return dout + dlse[..., None]


class _LseIgnored(_LseGrad):
    @staticmethod
    def backward(ctx, dout, *args):
        return dout


def test_fa4_lse_gradient_read_from_its_interface():
    def iface(cls, varlen=None):
        return types.SimpleNamespace(FlashAttnFunc=cls, FlashAttnVarlenFunc=varlen or cls)

    assert "non-differentiable" in fa4_backend.lse_grad_problem_of(iface(_NoLseGrad))
    assert "no lse gradient" in fa4_backend.lse_grad_problem_of(iface(_LseIgnored))
    assert fa4_backend.lse_grad_problem_of(iface(_LseGrad)) is None
    assert fa4_backend.lse_grad_problem_of(iface(_LseGrad, _NoLseGrad))  # both must carry it
    assert "could not be read" in fa4_backend.lse_grad_problem_of(types.SimpleNamespace())


def test_flex_flash_refuses_grad_captures_and_lse_backward():
    call, _ = _call(causal=True, mask=masks.chunked(4))
    assert not flex_flash_backend.feature_reasons(call)
    bias = torch.randn(1, 4, 8, 8, dtype=F64, requires_grad=True)
    assert any(
        "bias" in r for r in flex_flash_backend.feature_reasons(_call(bias=bias, requires_grad=True)[0])
    )
    table = torch.randn(4, 15, dtype=F64, requires_grad=True)
    rel = attnkit.mods.relative_bias(table)
    reasons = flex_flash_backend.feature_reasons(_call(score_mod=rel, requires_grad=True)[0])
    assert any("score_mod" in r for r in reasons), reasons
    assert flex_flash_backend.feature_reasons(_call(return_lse=True, requires_grad=True)[0])
    assert not flex_flash_backend.feature_reasons(_call(return_lse=True)[0])
    assert flex_flash_backend.feature_reasons(_call(deterministic=True, requires_grad=True)[0])


@pytest.mark.parametrize(
    "kw, empty",
    [
        (dict(Sq=8, Sk=8, causal=True), False),
        (dict(Sq=8, Sk=5, causal=True), True),  # top rows see no key (bottom-right)
        (dict(Sq=8, Sk=5, window=(2, 3)), False),  # p + 3 >= 0 for the first row
        (dict(Sq=8, Sk=5, window=(2, 2)), True),
        (dict(Sq=8, Sk=5), False),
    ],
)
def test_xformers_empty_rows_dense(kw, empty):
    call, _ = _call(**kw)
    assert xformers_backend.empty_rows(call) == empty
    assert bool(xformers_backend.feature_reasons(call)) == empty


def test_xformers_feature_refusals():
    thd = dict(layout="thd", Hq=2, D=16)
    assert xformers_backend.empty_rows(_call(**thd, seqlens_q=[3, 2], seqlens_k=[3, 0])[0])
    assert xformers_backend.empty_rows(_call(**thd, seqlens_q=[3, 4], seqlens_k=[3, 2], causal=True)[0])
    assert not xformers_backend.empty_rows(_call(**thd, seqlens_q=[3, 0], seqlens_k=[5, 2], causal=True)[0])
    for kw in (
        dict(softcap=3.0),
        dict(return_lse=True),
        dict(dropout_p=0.1),
        dict(mask=masks.chunked(4)),
        dict(bias=torch.randn(1, 4, 8, 8, dtype=F64), causal=True),
        dict(deterministic=True, requires_grad=True),
    ):
        assert xformers_backend.feature_reasons(_call(**kw)[0]), kw
    assert xformers_backend.feature_reasons(_call(**thd, seqlens_q=[3, 2], window=(1, 1))[0])


# ----------------------------------------------------------------------------------------------------------
# stand-in flash_attn.cute: FA4's semantics in float64 (interface.py + mask.py), recording its arguments
# ----------------------------------------------------------------------------------------------------------
def _fa_semantics(q, k, v, scale, causal, window_size, softcap):
    """One problem in FA4's terms: q (B, Sq, Hq, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv) -> out, lse."""
    wl, wr = window_size
    if wl is not None and wr is not None and wl < 0 and wr < 0:  # _resolve_causal_local_window
        wl = wr = None
    if causal:
        wr = 0
    B, Sq, Hq, _ = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    g = Hq // Hk
    kk, vv = k.repeat_interleave(g, dim=2).to(F64), v.repeat_interleave(g, dim=2).to(F64)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(F64), kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None]
    vis = torch.ones(Sq, Sk, dtype=torch.bool)
    if wr is not None:  # a negative side is taken literally, as FA4's mask.py does
        vis &= j <= i + Sk - Sq + wr
    if wl is not None:
        vis &= j >= i + Sk - Sq - wl
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # (B, Hq, Sq), -inf on empty rows
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    return out.to(q.dtype), lse.float()


def _fake_fa4(record):
    def flash_attn_func(
        q,
        k,
        v,
        softmax_scale=None,
        causal=False,
        window_size=(None, None),
        softcap=0.0,
        deterministic=False,
        return_lse=False,
        **rest,
    ):
        record.append(dict(fn="dense", q=q, k=k, v=v, causal=causal, window_size=window_size, rest=rest))
        return _fa_semantics(q, k, v, softmax_scale, causal, window_size, softcap)

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        max_seqlen_q=None,
        max_seqlen_k=None,
        softmax_scale=None,
        causal=False,
        window_size=(None, None),
        softcap=0.0,
        deterministic=False,
        return_lse=False,
        **rest,
    ):
        record.append(
            dict(fn="varlen", q=q, k=k, cu=(cu_seqlens_q, cu_seqlens_k), max=(max_seqlen_q, max_seqlen_k))
        )
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        lse = torch.full((q.shape[1], q.shape[0]), -math.inf)  # (Hq, Tq)
        for n in range(len(cq) - 1):
            a, b, c, d = cq[n], cq[n + 1], ck[n], ck[n + 1]
            if b == a:
                continue
            o, l_ = _fa_semantics(
                q[None, a:b], k[None, c:d], v[None, c:d], softmax_scale, causal, window_size, softcap
            )
            out[a:b], lse[:, a:b] = o[0], l_[0]
        return out, lse

    mod = types.ModuleType("flash_attn.cute")
    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod


FA4_CASES = {
    "causal_sq<sk_gqa": dict(B=2, Hq=4, Hk=2, Sq=5, Sk=9, D=8, causal=True),
    "causal_sq>sk": dict(B=1, Hq=2, Sq=9, Sk=5, D=8, causal=True),
    "window_both": dict(B=1, Hq=2, Sq=7, Sk=11, D=8, window=(2, 1)),
    "window_left_only": dict(B=1, Hq=2, Sq=10, Sk=10, D=8, window=(3, -1)),
    "window_right_only": dict(B=1, Hq=2, Sq=10, Sk=6, D=8, window=(-1, 0)),
    "causal_and_window": dict(B=2, Hq=2, Sq=8, Sk=12, D=8, causal=True, window=(2, 5)),
    "softcap_mqa_dv": dict(layout="bshd", B=2, Hq=4, Hk=1, Sq=6, Sk=7, D=8, Dv=4, softcap=1.5, scale=0.8),
    "thd_ragged_causal": dict(
        layout="thd", Hq=4, Hk=2, D=8, seqlens_q=[3, 0, 5, 2], seqlens_k=[4, 2, 5, 0], causal=True
    ),
    "thd_window": dict(layout="thd", Hq=2, D=8, seqlens_q=[6, 1, 4], seqlens_k=[6, 4, 9], window=(2, 1)),
}


@pytest.mark.parametrize("case", list(FA4_CASES))
def test_fa4_translation_against_reference(case, monkeypatch):
    record = []
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _fake_fa4(record))
    call, (q, k, v, kw) = _call(**dict(FA4_CASES[case]), return_lse=True)
    out, lse = fa4_backend.BACKEND.run(call)
    ref_out, ref_lse = reference_forward(call)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-5, atol=1e-5)
    (rec,) = record
    if call.layout == "thd":
        assert (
            rec["fn"] == "varlen"
            and rec["cu"][0] is kw["cu_seqlens_q"]
            and rec["cu"][1] is kw["cu_seqlens_k"]
        )
        assert rec["max"] == (call.Sq, call.Sk)
    else:
        assert rec["fn"] == "dense"
        assert rec["k"].shape[2] == call.Hk, "K/V go in with Hk heads (FA4 does GQA itself)"
        assert rec["q"].stride(-1) == 1 and rec["q"].data_ptr() == q.data_ptr(), "a view, no copy"
        assert all(w is None or w >= 0 for w in rec["window_size"]), "a -1 side must become None"


def test_fa4_lse_only_when_asked(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _fake_fa4([]))
    call, _ = _call(B=1, Hq=2, Sq=4, D=8)
    assert fa4_backend.BACKEND.run(call)[1] is None


# ----------------------------------------------------------------------------------------------------------
# stand-in xformers.ops: the attn_bias classes as their ``materialize`` defines them
# ----------------------------------------------------------------------------------------------------------
class _LowerTriangularFromBottomRightMask:
    def visible(self, i, j, Sq, Sk):
        return j <= i + Sk - Sq


class _LowerTriangularFromBottomRightLocalAttentionMask:
    def __init__(self, window_size):
        self.w = window_size

    def visible(self, i, j, Sq, Sk):  # tril(shift) and triu(shift - window_size + 1)
        return (j <= i + Sk - Sq) & (j >= i + Sk - Sq - self.w + 1)


class _LocalAttentionFromBottomRightMask:
    def __init__(self, window_left, window_right):
        self.wl, self.wr = window_left, window_right

    def visible(self, i, j, Sq, Sk):  # triu(shift - window_left), tril(shift + window_right)
        return (j >= i + Sk - Sq - self.wl) & (j <= i + Sk - Sq + self.wr)


class _BlockDiagonalMask:
    def __init__(self, lq, lk, inner=None):
        self.lq, self.lk, self.inner = list(lq), list(lk), inner

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None, *, device=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)

    def make_causal_from_bottomright(self):
        assert all(b >= a for a, b in zip(self.lq, self.lk)), "xFormers: num_keys >= num_queries per block"
        return _BlockDiagonalMask(self.lq, self.lk, _LowerTriangularFromBottomRightMask())

    def make_local_attention_from_bottomright(self, window_size):
        return _BlockDiagonalMask(
            self.lq, self.lk, _LowerTriangularFromBottomRightLocalAttentionMask(window_size)
        )


def _xf_dense(q, k, v, bias, scale):
    """BMHK -> BMHK in float64 with an attn_bias object (visible(i, j, Sq, Sk)) or a (B, H, Sq, Sk) tensor."""
    Sq, Sk = q.shape[1], k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(F64), k.to(F64)) * scale
    if isinstance(bias, torch.Tensor):
        assert bias.stride(-2) % 8 == 0, "xFormers needs 16-byte aligned bias rows"
        s = s + bias.to(F64)
    elif bias is not None:
        vis = bias.visible(torch.arange(Sq)[:, None], torch.arange(Sk)[None], Sq, Sk)
        assert vis.any(-1).all(), (
            "xFormers leaves rows with no visible key undefined: the backend must refuse"
        )
        s = s.masked_fill(~vis, -math.inf)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.to(F64)).to(q.dtype)


def _fake_xformers(record):
    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        record.append(dict(q=q, k=k, v=v, bias=attn_bias))
        shape5 = q.dim() == 5
        if shape5:  # BMGHK, K/V expanded over H
            assert k.stride(3) == 0, "grouped K/V are expanded views"
            q, k, v = (t.flatten(2, 3) for t in (q, k, v))
        if isinstance(attn_bias, _BlockDiagonalMask):
            assert q.shape[0] == 1
            outs, r0, c0 = [], 0, 0
            for a, b in zip(attn_bias.lq, attn_bias.lk):
                qn, kn, vn = q[:, r0 : r0 + a], k[:, c0 : c0 + b], v[:, c0 : c0 + b]
                outs.append(
                    _xf_dense(qn, kn, vn, attn_bias.inner, scale) if a else qn.new_zeros(1, 0, *v.shape[2:])
                )
                r0, c0 = r0 + a, c0 + b
            out = torch.cat(outs, dim=1)
        else:
            out = _xf_dense(q, k, v, attn_bias, scale)
        return out.unflatten(2, (record[-1]["q"].shape[2], -1)) if shape5 else out

    ab = types.SimpleNamespace(
        LowerTriangularFromBottomRightMask=_LowerTriangularFromBottomRightMask,
        LowerTriangularFromBottomRightLocalAttentionMask=_LowerTriangularFromBottomRightLocalAttentionMask,
        LocalAttentionFromBottomRightMask=_LocalAttentionFromBottomRightMask,
        BlockDiagonalMask=_BlockDiagonalMask,
    )
    mod = types.ModuleType("xformers.ops")
    mod.fmha = types.SimpleNamespace(attn_bias=ab)
    mod.memory_efficient_attention = memory_efficient_attention
    return mod


XF_CASES = {
    "causal_sq<sk": dict(B=2, Hq=2, Sq=5, Sk=9, D=8, causal=True),
    "causal_window": dict(B=1, Hq=2, Sq=8, Sk=12, D=8, causal=True, window=(2, -1)),
    "window_both": dict(B=1, Hq=2, Sq=7, Sk=11, D=8, window=(2, 1)),
    "window_left_only": dict(B=1, Hq=2, Sq=10, Sk=10, D=8, window=(3, -1)),
    "gqa_fwd_5d": dict(layout="bshd", B=2, Hq=6, Hk=2, Sq=5, Sk=7, D=8),
    "gqa_grad_repeat": dict(B=1, Hq=4, Hk=2, Sq=5, Sk=7, D=8, causal=True, requires_grad=True),
    "bias_unaligned": dict(B=2, Hq=2, Sq=5, Sk=7, D=8, bias=torch.randn(1, 2, 1, 7, dtype=F64)),
    "thd_ragged": dict(layout="thd", Hq=4, Hk=2, D=8, seqlens_q=[3, 0, 5, 2], seqlens_k=[4, 2, 5, 3]),
    "thd_causal_window": dict(
        layout="thd", Hq=2, D=8, seqlens_q=[3, 5], seqlens_k=[6, 5], causal=True, window=(1, 0)
    ),
}


@pytest.mark.parametrize("case", list(XF_CASES))
def test_xformers_translation_against_reference(case, monkeypatch):
    record = []
    monkeypatch.setitem(sys.modules, "xformers.ops", _fake_xformers(record))
    call, _ = _call(**dict(XF_CASES[case]))
    assert not xformers_backend.feature_reasons(call)
    out, lse = xformers_backend.BACKEND.run(call)
    ref_out, _ = reference_forward(call)
    assert lse is None
    torch.testing.assert_close(out, ref_out, rtol=1e-9, atol=1e-9)
    (rec,) = record
    if case == "gqa_fwd_5d":
        assert rec["q"].dim() == 5
    if case == "gqa_grad_repeat":
        assert rec["k"].shape[2] == call.Hq
        out.sum().backward()  # gradients flow back through the repeated K/V


# ----------------------------------------------------------------------------------------------------------
# flex_flash: the flex lowering, with BACKEND=FLASH and a static compile
# ----------------------------------------------------------------------------------------------------------
def test_flex_flash_passes_flash_and_flex_lowering(monkeypatch):
    seen = []
    fa = _flex_common.flex_module()

    def fake_compiled(q, k, v, kernel_options=None, **kw):
        seen.append(dict(kernel_options, dynamic=torch._dynamo.config.automatic_dynamic_shapes))
        return fa.flex_attention(q, k, v, **kw)  # eager on the CPU, the same lowering

    monkeypatch.setattr(_flex_common, "compiled_flex", lambda: fake_compiled)
    # the stand-in runs flex's own kernels, whose lse needs no FLASH correction (whatever this torch's is)
    monkeypatch.setattr(flex_flash_backend, "lse_factor", lambda: 1.0)
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    call, _ = _call(
        B=1,
        Hq=4,
        Hk=2,
        Sq=8,
        D=16,
        dtype=torch.float32,
        mask=masks.document(doc),
        causal=True,
        softcap=2.0,
        return_lse=True,
    )
    out, lse = flex_flash_backend.BACKEND.run(call)
    ref_out, ref_lse = reference_forward(call)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert seen == [{"BACKEND": "FLASH", "dynamic": False}]


def _wrapper_with(finalize_args: str):
    """A stand-in for torch's ``flex_attention`` wrapper whose nested ``_finalize_outputs`` takes these."""
    ns: dict = {}
    exec(
        f"def flex_attention(q):\n    def _finalize_outputs({finalize_args}):\n        return out\n"
        "    return _finalize_outputs(q, None, None, return_aux=None, return_lse=False)\n",
        ns,
    )
    return ns["flex_attention"]


def test_flex_flash_reads_the_lse_convention_from_torch():
    """torch before pytorch#181824 multiplied FLASH's natural-log lse by ln 2 (no stats_are_log2 flag)."""
    old = _wrapper_with("out, lse, max_scores, *, return_aux, return_lse")
    new = _wrapper_with("out, lse, max_scores, *, return_aux, return_lse, stats_are_log2")
    assert flex_flash_backend.lse_factor_of(old) == pytest.approx(1 / math.log(2))
    assert flex_flash_backend.lse_factor_of(new) == 1.0
    assert flex_flash_backend.lse_factor_of(lambda q: q) is None
    installed = flex_flash_backend.lse_factor()
    assert installed == flex_flash_backend.lse_factor_of(_flex_common.flex_module().flex_attention)


@pytest.mark.parametrize("factor", [1.0, 1 / math.log(2), None])
def test_flex_flash_lse_is_natural_log_whatever_the_wrapper(factor, monkeypatch):
    fa = _flex_common.flex_module()
    scale = 1.0 if factor is None else 1 / factor  # what the stand-in wrapper does to the true lse

    def fake_compiled(q, k, v, kernel_options=None, **kw):
        out, aux = fa.flex_attention(q, k, v, **kw)
        return out, types.SimpleNamespace(lse=aux.lse * scale)

    monkeypatch.setattr(_flex_common, "compiled_flex", lambda: fake_compiled)
    monkeypatch.setattr(flex_flash_backend, "_LSE_FACTOR", [factor])
    call, _ = _call(B=1, Hq=2, Sq=8, Sk=11, D=16, dtype=torch.float32, causal=True, return_lse=True)
    if factor is None:
        assert any("ln 2" in r for r in flex_flash_backend.feature_reasons(call))
        return
    assert not flex_flash_backend.feature_reasons(call)
    out, lse = flex_flash_backend.BACKEND.run(call)
    ref_out, ref_lse = reference_forward(call)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# GPU: every claimed feature against the float64 oracle, and refusals (run by the lead on the H200)
# ----------------------------------------------------------------------------------------------------------
GPU_CLAIMS = {
    "flash_attn4": {
        "bhsd_d128": dict(B=2, Hq=4, Sq=200, Sk=333, D=128),
        "bshd_gqa_causal_sq<sk": dict(layout="bshd", B=2, Hq=8, Hk=2, Sq=150, Sk=301, D=64, causal=True),
        "causal_sq>sk": dict(B=1, Hq=4, Sq=300, Sk=170, D=128, causal=True),
        "window_both": dict(B=2, Hq=4, Sq=256, Sk=300, D=64, window=(40, 17), dtype=torch.float16),
        "window_left_causal": dict(B=1, Hq=4, Hk=1, Sq=280, Sk=280, D=128, causal=True, window=(64, -1)),
        "softcap_dv": dict(B=1, Hq=4, Sq=190, Sk=190, D=96, Dv=64, softcap=8.0),
        "thd_ragged_causal": dict(
            layout="thd",
            Hq=8,
            Hk=2,
            D=128,
            seqlens_q=[130, 0, 1, 257],
            seqlens_k=[200, 5, 1, 257],
            causal=True,
        ),
        "thd_window": dict(
            layout="thd", Hq=4, D=64, seqlens_q=[100, 33], seqlens_k=[140, 60], window=(16, 8)
        ),
    },
    "flex_flash": {
        "bhsd_d128": dict(B=2, Hq=4, Sq=256, Sk=384, D=128),
        "causal_gqa": dict(B=1, Hq=8, Hk=2, Sq=256, Sk=256, D=64, causal=True, dtype=torch.float16),
        "document_mask": dict(B=2, Hq=4, Sq=384, Sk=384, D=64, mask="document"),
        "sliding_window_mask": dict(B=1, Hq=4, Sq=512, Sk=512, D=128, mask="sliding"),
        "softcap_score_mod": dict(B=1, Hq=4, Sq=256, Sk=256, D=64, softcap=10.0, score_mod="distance"),
        "thd_causal": dict(
            layout="thd", Hq=4, D=64, seqlens_q=[100, 1, 150], seqlens_k=[100, 7, 150], causal=True
        ),
    },
    "xformers": {
        "bhsd_d128": dict(B=2, Hq=4, Sq=200, Sk=333, D=128),
        "causal_sq<sk_gqa": dict(layout="bshd", B=2, Hq=8, Hk=2, Sq=150, Sk=301, D=64, causal=True),
        "window_both": dict(B=1, Hq=4, Sq=256, Sk=300, D=64, window=(40, 17)),
        "causal_window": dict(
            B=1, Hq=4, Sq=256, Sk=256, D=128, causal=True, window=(64, 0), dtype=torch.float16
        ),
        "fp32_d256": dict(B=1, Hq=2, Sq=64, Sk=80, D=256, dtype=torch.float32),
        "bias_grad": dict(B=2, Hq=4, Sq=100, Sk=123, D=64, bias="grad"),
        "thd_ragged_causal": dict(
            layout="thd", Hq=4, D=64, seqlens_q=[100, 1, 150], seqlens_k=[130, 7, 150], causal=True
        ),
    },
}
# claimed forward-only (the backward is refused, with a reason: test_peer_claims_hold_on_gpu checks it)
GPU_FORWARD_ONLY = {("flash_attn4", "thd_window")}  # FA4's varlen backward with a window: wrong dQ
GPU_REFUSALS = {
    "flash_attn4": [
        dict(bias="plain"),
        dict(dropout_p=0.1),
        dict(mask="document", Sq=96),  # (doc ids for Sq = Sk)
        dict(dtype=torch.float32),
        dict(layout="thd", seqlens_q=[70, 33], seqlens_k=[90, 60], window=(16, 8), grad=True),
    ],
    "flex_flash": [dict(bias="grad"), dict(return_lse=True), dict(dropout_p=0.1)],
    "xformers": [
        dict(softcap=5.0),
        dict(return_lse=True),
        dict(Sq=300, causal=True),
        dict(mask="document", Sq=96),
    ],
}


def _gpu_backend(name):
    pytest.importorskip(PEERS[name])
    rec = {r.name: r for r in attnkit.backends()}[name]
    if not rec.available:
        pytest.skip(f"{name} unavailable: {rec.reason}")
    return dispatch.get(name)


def _gpu_inputs(spec, dtype, grad):
    spec = dict(spec)
    layout = spec.pop("layout", "bhsd")
    shape = {
        k: spec.pop(k)
        for k in list(spec)
        if k in ("B", "Hq", "Hk", "Sq", "Sk", "D", "Dv", "seqlens_q", "seqlens_k")
    }
    dtype = spec.pop("dtype", dtype)
    q, k, v, kw = oracle.make_inputs(layout, dtype=dtype, device="cuda", requires_grad=grad, **shape)
    B, Sq, Sk = shape.get("B", 1), shape.get("Sq", 8), shape.get("Sk", shape.get("Sq", 8))
    mask = spec.pop("mask", None)
    if mask == "document":
        ids = torch.sort(torch.randint(0, 4, (B, Sq), device="cuda"), dim=1).values
        kw["mask"] = masks.document(ids) & masks.causal()
    elif mask == "sliding":
        kw["mask"] = masks.sliding_window(100) & masks.chunked(
            128
        )  # not foldable into flags: a real mask_mod
    mod = spec.pop("score_mod", None)
    if mod == "distance":
        kw["score_mod"] = lambda s, b, h, i, j: s - 0.01 * (i - j).abs() * (h + 1)
    bias = spec.pop("bias", None)
    if bias is not None:
        kw["bias"] = oracle.randn(
            (B, shape.get("Hq", 4), Sq, Sk), dtype, "cuda", requires_grad=bias == "grad"
        )
    kw.update(spec)
    return q, k, v, kw


def _run(name):
    def run(q, k, v, return_lse=True, **kw):
        return attnkit.attention(q, k, v, backend=name, return_lse=return_lse, **kw)

    return run


@pytest.mark.cuda
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize(
    "name, case", [(n, c) for n, cases in GPU_CLAIMS.items() for c in cases], ids=lambda x: str(x)
)
def test_peer_claims_hold_on_gpu(name, case, grad):
    """bf16, except the cases that name a dtype (few: each CuTe DSL kernel compile costs seconds)."""
    be = _gpu_backend(name)
    q, k, v, kw = _gpu_inputs(GPU_CLAIMS[name][case], torch.bfloat16, grad)
    fa4_lse_grad = name == "flash_attn4" and not fa4_backend.lse_grad_problem()
    with_lse = (name == "flash_attn4" and (not grad or fa4_lse_grad)) or (name == "flex_flash" and not grad)
    call = oracle.make_call(q, k, v, return_lse=with_lse, **kw)
    if grad and (name, case) in GPU_FORWARD_ONLY:
        assert be.why_not(call), f"{name} must refuse the backward of {case}"
        return
    assert be.why_not(call) == [], f"{name} should claim {case}: {be.why_not(call)}"
    bias = kw.pop("bias", None)
    if with_lse:
        oracle.check_against_oracle(_run(name), q, k, v, bias=bias, **kw)
    else:
        run = lambda q, k, v, return_lse=True, **kw: (_run(name)(q, k, v, return_lse=False, **kw), None)  # noqa: E731
        oracle.check_against_oracle(run, q, k, v, bias=bias, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name, i", [(n, i) for n, cases in GPU_REFUSALS.items() for i in range(len(cases))], ids=lambda x: str(x)
)
def test_peer_refusals_on_gpu(name, i):
    be = _gpu_backend(name)
    spec = dict(GPU_REFUSALS[name][i])
    if spec.get("layout") != "thd":
        spec = {**dict(B=1, Hq=4, Sq=128, Sk=96, D=64), **spec}
    else:
        spec = {**dict(Hq=4, D=64), **spec}
    grad = spec.pop("grad", False) or spec.get("bias") == "grad" or spec.get("return_lse", False)
    q, k, v, kw = _gpu_inputs(spec, torch.bfloat16, grad)
    call = oracle.make_call(q, k, v, **kw)
    reasons = be.why_not(call)
    assert reasons, f"{name} should refuse {GPU_REFUSALS[name][i]}"
    with pytest.raises(UnsupportedError) as info:
        attnkit.attention(q, k, v, backend=name, **kw)
    assert info.value.reasons == reasons


@pytest.mark.cuda
def test_fa4_lse_gradient_is_right_or_refused():
    """A loss through the lse (as context parallelism's merge has): where FA4 claims return_lse with
    gradients, dq/dk from the lse match the float64 oracle's; elsewhere the call is refused."""
    be = _gpu_backend("flash_attn4")
    q, k, v, kw = oracle.make_inputs(
        B=1, Hq=4, Hk=2, Sq=200, Sk=300, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    call = oracle.make_call(q, k, v, causal=True, return_lse=True, **kw)
    problem = fa4_backend.lse_grad_problem()
    if problem:
        assert any(problem in r for r in be.why_not(call)), be.why_not(call)
        return
    assert be.why_not(call) == []
    _, lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend="flash_attn4", **kw)
    g = torch.randn_like(lse)
    (lse * g).sum().backward()
    ref = [oracle.clone_leaf(t, F64) for t in (q, k, v)]
    (oracle.attention64(*ref, causal=True, **kw)[1] * g.double()).sum().backward()
    base = [oracle.clone_leaf(t) for t in (q, k, v)]  # plain bf16 PyTorch: the error budget's baseline
    base_call = oracle.make_call(*base, causal=True, return_lse=True, **kw)
    (reference_forward(base_call, upcast=False)[1] * g).sum().backward()
    for i, name in enumerate("qk"):
        oracle.assert_close(
            (q, k)[i].grad, ref[i].grad, base[i].grad, dtype=q.dtype, name=f"grad {name} through lse"
        )


@pytest.mark.cuda
def test_fa4_deterministic_backward_is_bitwise_repeatable():
    _gpu_backend("flash_attn4")
    q, k, v, kw = oracle.make_inputs(
        "bshd", B=2, Hq=8, Hk=2, Sq=512, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    g = torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        attnkit.attention(q, k, v, causal=True, deterministic=True, backend="flash_attn4", **kw).backward(g)
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.cuda
def test_auto_picks_fa4_where_it_is_fastest():
    _gpu_backend("flash_attn4")
    q, k, v, kw = oracle.make_inputs(
        B=4, Hq=16, Sq=4096, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    report = attnkit.explain(q, k, v, **kw)
    assert report.chosen == "flash_attn4", str(report)


def test_flex_flash_remembers_a_failed_compile(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("BACKEND='FLASH' but flash attention cannot be used: NYI")

    monkeypatch.setattr(_flex_common, "compiled_flex", lambda: broken)
    monkeypatch.setattr(flex_flash_backend, "_FAILED", {})
    call, _ = _call(B=1, Hq=2, Sq=8, D=16, dtype=torch.float32, softcap=2.0)
    with pytest.raises(RuntimeError):
        flex_flash_backend.BACKEND.run(call)
    assert "NYI" in flex_flash_backend._FAILED[flex_flash_backend._family(call)]
    other, _ = _call(B=1, Hq=2, Sq=8, D=16, dtype=torch.float32)
    assert flex_flash_backend._family(other) not in flex_flash_backend._FAILED
