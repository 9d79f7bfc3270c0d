"""One test per malformed-input case: each raises AttentionInputError (a ValueError) naming the argument.

Also: an explicit backend that cannot serve raises UnsupportedError listing its reasons (never a silent
fallback), ATTNKIT_BACKEND forces a backend the same way, and ATTNKIT_DEBUG=1 logs each new choice once.
"""

from __future__ import annotations

import logging

import pytest
import torch

import attnkit
import oracle
from attnkit import AttentionInputError, UnsupportedError


def qkv(layout="bhsd", **kw):
    shape = dict(B=2, Hq=4, Hk=2, Sq=5, Sk=6, D=8)
    shape.update(kw)
    if layout == "thd":
        shape.setdefault("seqlens_q", [2, 3])
        shape.setdefault("seqlens_k", [4, 2])
    return oracle.make_inputs(layout, **shape)


def expect_error(arg, q, k, v, **kw):
    with pytest.raises(AttentionInputError) as info:
        attnkit.attention(q, k, v, **kw)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.arg == arg, f"error names `{err.arg}`, expected `{arg}`: {err}"
    assert f"`{arg}`" in str(err), str(err)
    assert "expected" in str(err) and "got" in str(err)
    return err


def test_error_is_value_error():
    assert issubclass(AttentionInputError, ValueError)


# -- tensors -----------------------------------------------------------------------------------------------
def test_q_not_a_tensor():
    q, k, v, _ = qkv()
    expect_error("q", q.tolist(), k, v)


def test_q_wrong_rank():
    q, k, v, _ = qkv()
    expect_error("q", q[0], k, v)


def test_k_wrong_rank():
    q, k, v, _ = qkv()
    expect_error("k", q, k.unsqueeze(0), v)


def test_v_wrong_rank_thd():
    q, k, v, kw = qkv("thd")
    expect_error("v", q, k, v.unsqueeze(0), **kw)


def test_first_culprit_is_named():
    """With several malformed tensors, the error names the same one every time: ranks and dtypes of q, k,
    v in that order first, then k's and v's device and dtype against q's."""
    q, k, v, _ = qkv()
    expect_error("q", q[0], k.to(torch.int32), v)
    expect_error("k", q, k.to(torch.int32), v[0])
    expect_error("v", q, torch.empty(k.shape, device="meta"), v.to(torch.int32))
    expect_error("k", q, torch.empty(k.shape, device="meta"), v.double())
    expect_error("k", q, k.double(), v.half())


def test_bad_layout():
    q, k, v, _ = qkv()
    expect_error("layout", q, k, v, layout="bhds")


def test_mismatched_batch_k():
    q, k, v, _ = qkv()
    expect_error("k", q, k[:1], v)


def test_mismatched_batch_v():
    q, k, v, _ = qkv()
    expect_error("v", q, k, v[:1])


def test_mismatched_kv_length():
    q, k, v, _ = qkv()
    expect_error("v", q, k, v[:, :, :-1])


def test_mismatched_kv_heads():
    q, k, v, _ = qkv(Hk=2)
    expect_error("v", q, k, v[:, :1])


def test_mismatched_head_dim_k():
    q, k, v, _ = qkv()
    expect_error("k", q, k[..., :-1], v)


def test_zero_head_dim():
    q, k, v, _ = qkv()
    expect_error("v", q, k, v[..., :0])


def test_hq_not_multiple_of_hk():
    q, k, v, _ = qkv(Hq=4, Hk=3)
    expect_error("k", q, k, v)


def test_hq_not_multiple_of_hk_bshd():
    q, k, v, kw = qkv("bshd", Hq=6, Hk=4)
    expect_error("k", q, k, v, **kw)


def test_mixed_dtypes():
    q, k, v, _ = qkv()
    expect_error("k", q, k.double(), v)


def test_mixed_dtypes_v():
    q, k, v, _ = qkv()
    expect_error("v", q, k, v.half())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    q, k, v, _ = qkv()
    expect_error("q", q.to(dtype), k.to(dtype), v.to(dtype))


def test_unsupported_dtype_float8():
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is None:
        pytest.skip("no float8 in this torch")
    q, k, v, _ = qkv()
    expect_error("q", q.to(f8), k.to(f8), v.to(f8))


def test_mixed_devices():
    q, k, v, _ = qkv()
    try:
        k_meta = k.to("meta")
    except Exception:  # pragma: no cover - meta tensors are always available in supported torch versions
        pytest.skip("no meta device")
    expect_error("k", q, k_meta, v)


def test_mixed_devices_v():
    q, k, v, _ = qkv()
    expect_error("v", q, k, v.to("meta"))


@pytest.mark.cuda
def test_mixed_devices_cuda():
    q, k, v, _ = qkv()
    expect_error("k", q, k.cuda(), v)


# -- packed sequences ---------------------------------------------------------------------------------------
def test_cu_seqlens_missing_for_thd():
    q, k, v, kw = qkv("thd")
    kw.pop("cu_seqlens_q")
    expect_error("cu_seqlens_q", q, k, v, **kw)


def test_cu_seqlens_k_missing_for_thd():
    q, k, v, kw = qkv("thd")
    kw.pop("cu_seqlens_k")
    expect_error("cu_seqlens_k", q, k, v, **kw)


def test_cu_seqlens_not_int32():
    q, k, v, kw = qkv("thd")
    kw["cu_seqlens_q"] = kw["cu_seqlens_q"].long()
    expect_error("cu_seqlens_q", q, k, v, **kw)


def test_cu_seqlens_not_a_tensor():
    q, k, v, kw = qkv("thd")
    kw["cu_seqlens_k"] = [0, 4, 6]
    expect_error("cu_seqlens_k", q, k, v, **kw)


def test_cu_seqlens_wrong_rank():
    q, k, v, kw = qkv("thd")
    kw["cu_seqlens_q"] = kw["cu_seqlens_q"].view(1, -1)
    expect_error("cu_seqlens_q", q, k, v, **kw)


def test_cu_seqlens_too_short():
    q, k, v, kw = qkv("thd")
    kw["cu_seqlens_q"] = torch.tensor([5], dtype=torch.int32)
    expect_error("cu_seqlens_q", q, k, v, **kw)


def test_cu_seqlens_not_starting_at_zero():
    q, k, v, kw = qkv("thd")
    kw["cu_seqlens_q"] = torch.tensor([1, 2, 5], dtype=torch.int32)
    expect_error("cu_seqlens_q", q, k, v, **kw)


def test_cu_seqlens_decreasing():
    q, k, v, kw = qkv("thd", seqlens_q=[2, 3], seqlens_k=[4, 2])
    kw["cu_seqlens_k"] = torch.tensor([0, 7, 6], dtype=torch.int32)
    expect_error("cu_seqlens_k", q, k, v, **kw)


def test_cu_seqlens_last_not_total():
    q, k, v, kw = qkv("thd")
    kw["cu_seqlens_q"] = torch.tensor([0, 2, 4], dtype=torch.int32)  # q has 5 rows
    expect_error("cu_seqlens_q", q, k, v, **kw)


def test_cu_seqlens_different_counts():
    q, k, v, kw = qkv("thd", seqlens_q=[2, 3], seqlens_k=[4, 2])
    kw["cu_seqlens_k"] = torch.tensor([0, 1, 3, 6], dtype=torch.int32)
    expect_error("cu_seqlens_k", q, k, v, **kw)


def test_cu_seqlens_wrong_device():
    q, k, v, kw = qkv("thd")
    kw["cu_seqlens_q"] = kw["cu_seqlens_q"].to("meta")
    expect_error("cu_seqlens_q", q, k, v, **kw)


def test_cu_seqlens_given_for_bhsd():
    q, k, v, _ = qkv()
    expect_error("cu_seqlens_q", q, k, v, cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32))


def test_max_seqlen_given_for_bshd():
    q, k, v, kw = qkv("bshd")
    expect_error("max_seqlen_k", q, k, v, max_seqlen_k=6, **kw)


def test_max_seqlen_too_small():
    q, k, v, kw = qkv("thd", seqlens_q=[2, 3], seqlens_k=[4, 2])
    expect_error("max_seqlen_q", q, k, v, max_seqlen_q=2, **kw)


def test_max_seqlen_k_too_small():
    q, k, v, kw = qkv("thd", seqlens_q=[2, 3], seqlens_k=[4, 2])
    expect_error("max_seqlen_k", q, k, v, max_seqlen_k=3, **kw)


def test_max_seqlen_not_int():
    q, k, v, kw = qkv("thd")
    expect_error("max_seqlen_q", q, k, v, max_seqlen_q=3.0, **kw)


# -- flags and scalars ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [(2,), (1, 2, 3), (-2, 0), (0, -5), (1.5, 0), "2,0", 3, (True, 0)])
def test_window_bad(window):
    q, k, v, _ = qkv()
    expect_error("window", q, k, v, window=window)


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), float("inf"), "3", True])
def test_softcap_bad(cap):
    q, k, v, _ = qkv()
    expect_error("softcap", q, k, v, softcap=cap)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True])
def test_scale_bad(scale):
    q, k, v, _ = qkv()
    expect_error("scale", q, k, v, scale=scale)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", None])
def test_dropout_p_out_of_range(p):
    q, k, v, _ = qkv()
    expect_error("dropout_p", q, k, v, dropout_p=p)


@pytest.mark.parametrize("flag", ["causal", "return_lse", "deterministic"])
@pytest.mark.parametrize("value", [1, "yes", None, torch.tensor(True)])
def test_non_bool_flags(flag, value):
    q, k, v, _ = qkv()
    expect_error(flag, q, k, v, **{flag: value})


# -- additive terms ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 6), (2, 4, 5, 6, 1), (2, 2, 5, 6)])
def test_bias_wrong_shape(shape):
    q, k, v, _ = qkv()
    expect_error("bias", q, k, v, bias=torch.randn(shape))


def test_bias_bool():
    q, k, v, _ = qkv()
    expect_error("bias", q, k, v, bias=torch.ones(5, 6, dtype=torch.bool))


def test_bias_int():
    q, k, v, _ = qkv()
    expect_error("bias", q, k, v, bias=torch.ones(5, 6, dtype=torch.int64))


def test_bias_not_tensor():
    q, k, v, _ = qkv()
    expect_error("bias", q, k, v, bias=0.5)


def test_bias_wrong_device():
    q, k, v, _ = qkv()
    expect_error("bias", q, k, v, bias=torch.randn(5, 6, device="meta"))


def test_bias_thd_wrong_shape():
    q, k, v, kw = qkv("thd", seqlens_q=[2, 3], seqlens_k=[4, 2])
    expect_error("bias", q, k, v, bias=torch.randn(2, 4, 5, 6), **kw)  # (N, Hq, max_Sq=3, max_Sk=4)


def test_alibi_wrong_dtype():
    q, k, v, _ = qkv()
    expect_error("alibi_slopes", q, k, v, alibi_slopes=oracle.alibi_slopes(4).double())


def test_alibi_half_dtype():
    q, k, v, _ = qkv()
    expect_error("alibi_slopes", q, k, v, alibi_slopes=oracle.alibi_slopes(4).half())


@pytest.mark.parametrize("shape", [(2,), (3, 4), (2, 2), (1, 2, 4), (8,)])
def test_alibi_wrong_shape(shape):
    q, k, v, _ = qkv()
    expect_error("alibi_slopes", q, k, v, alibi_slopes=torch.rand(shape))


def test_alibi_not_tensor():
    q, k, v, _ = qkv()
    expect_error("alibi_slopes", q, k, v, alibi_slopes=[0.5, 0.25, 0.125, 0.0625])


def test_alibi_wrong_device():
    q, k, v, _ = qkv()
    expect_error("alibi_slopes", q, k, v, alibi_slopes=torch.rand(4, device="meta"))


# -- programmable parts, backend -----------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [3, "causal", torch.ones(5, 6, dtype=torch.bool)])
def test_mask_bad_type(mask):
    q, k, v, _ = qkv()
    expect_error("mask", q, k, v, mask=mask)


@pytest.mark.parametrize("mod", [3, "softcap", torch.randn(5, 6)])
def test_score_mod_bad_type(mod):
    q, k, v, _ = qkv()
    expect_error("score_mod", q, k, v, score_mod=mod)


def test_unknown_backend():
    q, k, v, _ = qkv()
    err = expect_error("backend", q, k, v, backend="no_such_backend")
    assert "reference" in str(err)  # lists the known names


def test_backend_not_a_string():
    q, k, v, _ = qkv()
    expect_error("backend", q, k, v, backend=None)


def test_unknown_backend_from_env(monkeypatch):
    q, k, v, _ = qkv()
    monkeypatch.setenv("ATTNKIT_BACKEND", "no_such_backend")
    expect_error("backend", q, k, v)


def test_explain_validates_too():
    q, k, v, _ = qkv()
    with pytest.raises(AttentionInputError, match="`softcap`"):
        attnkit.explain(q, k, v, softcap=-1.0)


# -- UnsupportedError and the environment --------------------------------------------------------------------
def _available(name):
    return any(r.name == name and r.available for r in attnkit.backends())


def test_unsupported_explicit_backend_raises():
    """sdpa_math has no softcap: asking for it explicitly raises UnsupportedError with the reason."""
    if not _available("sdpa_math"):
        pytest.skip("sdpa_math not available")
    q, k, v, _ = qkv()
    with pytest.raises(UnsupportedError) as info:
        attnkit.attention(q, k, v, softcap=5.0, backend="sdpa_math")
    assert info.value.backend == "sdpa_math"
    assert any("softcap" in r for r in info.value.reasons)
    assert "softcap" in str(info.value)


@pytest.mark.cuda
def test_unsupported_sdpa_flash_softcap_cuda():
    q, k, v, _ = qkv(device="cuda", dtype=torch.float16)
    with pytest.raises(UnsupportedError, match="softcap"):
        attnkit.attention(q, k, v, softcap=5.0, backend="sdpa_flash")


def test_unavailable_backend_raises_unsupported():
    """A registered backend that cannot run here at all is refused explicitly, with its reason."""
    missing = [r for r in attnkit.backends() if not r.available]
    if not missing:
        pytest.skip("every backend is available here")
    q, k, v, _ = qkv()
    with pytest.raises(UnsupportedError) as info:
        attnkit.attention(q, k, v, backend=missing[0].name)
    assert missing[0].reason in str(info.value)


def test_env_forces_backend_and_raises_the_same_way(monkeypatch):
    if not _available("sdpa_math"):
        pytest.skip("sdpa_math not available")
    q, k, v, _ = qkv()
    monkeypatch.setenv("ATTNKIT_BACKEND", "sdpa_math")
    with pytest.raises(UnsupportedError, match="softcap"):
        attnkit.attention(q, k, v, softcap=5.0)
    # And it is really the one that runs when it can:
    from attnkit import dispatch

    call = oracle.make_call(q, k, v)
    assert dispatch.choose(call).name == "sdpa_math"
    assert attnkit.explain(q, k, v).chosen == "sdpa_math"


def test_env_forces_reference(monkeypatch):
    from attnkit import dispatch

    q, k, v, _ = qkv()
    monkeypatch.setenv("ATTNKIT_BACKEND", "reference")
    assert dispatch.choose(oracle.make_call(q, k, v)).name == "reference"
    assert "ATTNKIT_BACKEND" in attnkit.explain(q, k, v).requested


def test_debug_logs_each_choice_once(monkeypatch, caplog):
    from attnkit import dispatch

    monkeypatch.setenv("ATTNKIT_DEBUG", "1")
    monkeypatch.setattr(dispatch, "_LOGGED", set())
    q, k, v, _ = qkv(Sq=7, Sk=3, D=16)
    with caplog.at_level(logging.DEBUG, logger="attnkit"):
        for _ in range(3):
            attnkit.attention(q, k, v, causal=True)
        first = [r for r in caplog.records if r.name == "attnkit"]
        assert len(first) == 1, [r.getMessage() for r in first]
        assert "Sq=7" in first[0].getMessage()
        attnkit.attention(q, k, v, causal=False)  # a new choice: logged once more
        attnkit.attention(q, k, v, causal=False)
    assert len([r for r in caplog.records if r.name == "attnkit"]) == 2


def test_no_debug_log_by_default(monkeypatch, caplog):
    from attnkit import dispatch

    monkeypatch.setattr(dispatch, "_LOGGED", set())
    q, k, v, _ = qkv()
    with caplog.at_level(logging.DEBUG, logger="attnkit"):
        attnkit.attention(q, k, v)
    assert not [r for r in caplog.records if r.name == "attnkit"]


def test_mask_capturing_a_tensor_on_another_device():
    q = torch.randn(1, 2, 8, 16)
    ids = torch.zeros(8, dtype=torch.long, device="meta")
    with pytest.raises(AttentionInputError, match="`mask`"):
        attnkit.attention(q, q, q, mask=attnkit.masks.document(ids))


def test_score_mod_capturing_a_tensor_on_another_device():
    q = torch.randn(1, 2, 8, 16)
    table = torch.zeros(2, 15, device="meta")
    with pytest.raises(AttentionInputError, match="`score_mod`"):
        attnkit.attention(q, q, q, score_mod=attnkit.mods.relative_bias(table))


def test_autocast_runs_attention_in_the_autocast_dtype():
    """Under autocast, mixed q/k/v dtypes are cast like SDPA does (not rejected as mixed dtypes)."""
    q = torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(AttentionInputError, match="`v`"):
        attnkit.attention(q, q, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnkit.attention(q, q, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q, q, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() < 2e-2
