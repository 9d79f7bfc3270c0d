"""Mistakes inside masks and score mods (issue 13 §4.3): each an AttentionInputError naming the argument,
what was expected and what came, found once per call signature (arity from the signature, sizes from the
mask's and mod's tensors, a probe of user callables on the call's corner indices)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import attnkit
import attnkit._probe
import oracle
from attnkit import AttentionInputError, masks, mods


def qkv(layout="bhsd", **kw):
    shape = dict(B=2, Hq=4, Hk=2, Sq=6, Sk=6, D=8)
    shape.update(kw)
    if layout == "thd":
        shape.setdefault("seqlens_q", [5, 0, 3])
    return oracle.make_inputs(layout, **shape)


def expect_error(arg, *, match=None, layout="bhsd", shape=None, **kw):
    """attention(...) on fresh inputs raises AttentionInputError naming ``arg`` (``match`` in its text)."""
    q, k, v, base = qkv(layout, **(shape or {}))
    with pytest.raises(AttentionInputError, match=match or arg) as info:
        attnkit.attention(q, k, v, backend="reference", **base, **kw)
    err = info.value
    assert err.arg == arg, f"error names `{err.arg}`, expected `{arg}`: {err}"
    assert "expected" in str(err) and "got" in str(err)
    return err


def runs(layout="bhsd", shape=None, **kw):
    q, k, v, base = qkv(layout, **(shape or {}))
    return attnkit.attention(q, k, v, backend="reference", **base, **kw)


# -- arity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mod", [lambda s, b, h, q: s, lambda s: s, lambda s, b, h, q, kv, extra: s], ids=["4", "1", "6"]
)
def test_score_mod_wrong_arity(mod):
    err = expect_error("score_mod", score_mod=mod)
    assert "5 positional arguments" in str(err)


@pytest.mark.parametrize("fn", [lambda b, h, q: q >= 0, lambda s, b, h, q, kv: q >= kv], ids=["3", "5"])
def test_mask_mod_wrong_arity(fn):
    err = expect_error("mask", mask=fn)
    assert "4 positional arguments" in str(err)


def test_arity_accepts_varargs_defaults_partials_and_callable_objects():
    class Mod:
        def __call__(self, score, b, h, q_idx, kv_idx):
            return score * 0.5

    def with_default(score, b, h, q_idx, kv_idx, scale=2.0):
        return score * scale

    def scaled(c, score, b, h, q_idx, kv_idx):
        return score * c

    for mod in (Mod(), with_default, functools.partial(scaled, 3.0), lambda *a: a[0]):
        out = runs(score_mod=mod)
        assert torch.isfinite(out).all()


def test_arity_of_a_callable_combined_into_a_mask_or_mods():
    with pytest.raises(AttentionInputError, match="fn"):
        masks.causal() & (lambda b, h, q: q >= 0)
    with pytest.raises(AttentionInputError, match="fn"):
        mods.compose(mods.softcap(2.0), lambda s, b, h: s)


# -- what a score_mod returns --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mod,what",
    [
        (lambda s, b, h, q, kv: 1.0, "float"),
        (lambda s, b, h, q, kv: torch.tensor(0.5), "0-dim"),
        (lambda s, b, h, q, kv: s > 0, "bool"),
        (lambda s, b, h, q, kv: (q - kv).abs(), "int64"),
        (lambda s, b, h, q, kv: s.sum(-1), "shape"),
        (lambda s, b, h, q, kv: s.reshape(-1), "shape"),
    ],
    ids=["number", "0-dim", "bool", "int", "reduced", "flat"],
)
def test_score_mod_bad_result(mod, what):
    err = expect_error("score_mod", score_mod=mod)
    assert what in str(err)


@pytest.mark.parametrize("layout", ["bhsd", "thd"])
def test_score_mod_bad_result_thd_too(layout):
    expect_error("score_mod", layout=layout, score_mod=lambda s, b, h, q, kv: 0.0)


def test_score_mod_reading_a_too_small_table():
    table = torch.randn(4, 5)  # indexed by kv position: Sk = 6 needs 6 columns
    err = expect_error("score_mod", match="IndexError", score_mod=lambda s, b, h, q, kv: s + table[h, kv])
    assert "Sk=6" in str(err)
    assert torch.isfinite(runs(score_mod=lambda s, b, h, q, kv: s + torch.randn(4, 6)[h, kv])).all()


def test_mask_mod_reading_a_too_small_tensor():
    ids = torch.tensor([0, 0, 1, 1, 1])  # 5 ids for 6 positions
    expect_error("mask", match="IndexError", mask=lambda b, h, q, kv: ids[q] == ids[kv])


def test_thd_probe_uses_each_sequence_length():
    """Per-sequence tables sized by the sequence's own positions are fine: the probe stays inside them."""
    q, k, v, kw = qkv("thd", seqlens_q=[5, 0, 3], seqlens_k=[2, 1, 4])
    table = torch.randn(3, 5, 4)  # (N, longest Sq, longest Sk)
    out = attnkit.attention(
        q, k, v, backend="reference", score_mod=lambda s, b, h, i, j: s + table[b, i, j], **kw
    )
    assert torch.isfinite(out).all()


# -- library masks and mods against the call's sizes ---------------------------------------------------------
@pytest.mark.parametrize("n", [5, 7])
def test_document_wrong_number_of_ids(n):
    err = expect_error("mask", match="doc_ids", mask=masks.document(torch.zeros(n, dtype=torch.long)))
    assert f"({n},)" in str(err)


def test_document_sq_ne_sk_needs_kv_ids():
    ids = torch.zeros(4, dtype=torch.long)
    err = expect_error("mask", match="doc_ids", shape=dict(Sq=4, Sk=6), mask=masks.document(ids))
    assert "kv_doc_ids" in str(err)
    expect_error("mask", match="kv_doc_ids", shape=dict(Sq=4, Sk=6), mask=masks.document(ids, ids))
    assert (
        runs(shape=dict(Sq=4, Sk=6), mask=masks.document(ids, torch.zeros(6, dtype=torch.long))).shape[2] == 4
    )


def test_document_per_batch_rows():
    expect_error("mask", match="doc_ids", mask=masks.document(torch.zeros(3, 6, dtype=torch.long)))
    expect_error(
        "mask", match="doc_ids", layout="thd", mask=masks.document(torch.zeros(3, 4, dtype=torch.long))
    )
    assert runs("thd", mask=masks.document(torch.zeros(3, 5, dtype=torch.long))).shape[0] == 8


def test_document_in_a_composition():
    expect_error(
        "mask", match="doc_ids", mask=masks.causal() & masks.document(torch.zeros(2, dtype=torch.long))
    )


def test_relative_bias_wrong_heads():
    expect_error("score_mod", match="table", score_mod=mods.relative_bias(torch.randn(2, 5)))
    expect_error(
        "score_mod",
        match="table",
        score_mod=mods.compose(mods.softcap(5.0), mods.relative_bias(torch.randn(3, 5))),
    )


def test_alibi_wrong_number_of_slopes():
    expect_error("score_mod", match="slopes", score_mod=mods.alibi(torch.rand(3)))
    expect_error("score_mod", match="slopes", score_mod=mods.alibi(torch.rand(3, 4)))  # B = 2
    expect_error("score_mod", match="slopes", layout="thd", score_mod=mods.alibi(torch.rand(2, 4)))  # N = 3


def test_t5_bias_wrong_heads():
    expect_error("score_mod", match="table", score_mod=mods.t5_bias(torch.randn(2, 8), 8, 20))


@pytest.mark.parametrize("shape", [(1, 1, 5, 1), (1, 2, 6, 1), (3, 1, 6, 1), (1, 4, 7, 1)])
def test_flashmask_wrong_shape_for_the_call(shape):
    T = torch.full(shape, 6, dtype=torch.int32)
    expect_error("mask", match="startend_row_indices", mask=masks.flashmask(T, True))


def test_flashmask_needs_equal_lengths():
    T = torch.full((1, 1, 6, 1), 6, dtype=torch.int32)
    expect_error("mask", match="Sq == Sk", shape=dict(Sq=4, Sk=6), mask=masks.flashmask(T, True))
    expect_error(
        "mask",
        match="sequence 0",
        layout="thd",
        shape=dict(seqlens_q=[5, 0, 3], seqlens_k=[6, 0, 3]),
        mask=masks.flashmask(T, True),
    )


@pytest.mark.parametrize(
    "bad,arg",
    [
        (lambda: masks.flashmask(torch.zeros(1, 1, 6, 1, dtype=torch.int64), True), "startend_row_indices"),
        (lambda: masks.flashmask(torch.zeros(1, 6, 1, dtype=torch.int32), True), "startend_row_indices"),
        (lambda: masks.flashmask(torch.zeros(1, 1, 6, 4, dtype=torch.int32), True), "startend_row_indices"),
        (lambda: masks.flashmask(torch.zeros(1, 1, 6, 1, dtype=torch.int32), False), "startend_row_indices"),
        (lambda: masks.flashmask(torch.zeros(1, 1, 6, 2, dtype=torch.int32), "yes"), "causal"),
        (lambda: masks.document([0, 1]), "doc_ids"),
        (lambda: masks.shared_prefix(2.5, [1]), "prefix_len"),
        (lambda: masks.shared_prefix(2, "12"), "response_lens"),
        (lambda: mods.relative_bias(torch.randn(4)), "table"),
        (lambda: mods.alibi([0.5]), "slopes"),
        (lambda: mods.t5_bias(torch.randn(2, 8), 16, 40), "table"),
        (lambda: mods.t5_bias(torch.randn(2, 8), 8, 1), "max_distance"),
        (lambda: masks.from_mask_mod(3), "fn"),
    ],
)
def test_factories_name_their_argument(bad, arg):
    with pytest.raises(AttentionInputError, match=arg) as info:
        bad()
    assert info.value.arg == arg


def test_shared_prefix_lengths_must_fit():
    expect_error("mask", match="response_lens", mask=masks.shared_prefix(2, [3, 2]))  # 7 > Sk = 6
    expect_error("mask", match="response_lens", mask=masks.shared_prefix(torch.tensor([1, 3]), [2, 2]))
    expect_error("mask", match="Sq == Sk", shape=dict(Sq=5, Sk=6), mask=masks.shared_prefix(1, [2, 2]))
    expect_error("mask", match="prefix_len", mask=masks.shared_prefix(torch.tensor([1, 2, 3]), [1, 1]))
    expect_error(
        "mask",
        match="sequence 2",
        layout="thd",
        mask=masks.shared_prefix(torch.tensor([1, 0, 2]), torch.tensor([[2, 2], [0, 0], [1, 1]])),
    )
    assert runs(mask=masks.shared_prefix(2, [2, 2])).shape == (2, 4, 6, 8)


def test_prefix_lm_per_batch_rows():
    expect_error("mask", match="prefix_len", mask=masks.prefix_lm(torch.tensor([1, 2, 3])))


# -- once per call signature ---------------------------------------------------------------------------------
def test_probe_runs_once_per_signature(monkeypatch):
    calls = []
    real = attnkit._probe._probe

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(attnkit._probe, "_probe", counting)

    def mod(s, b, h, q, kv):
        return s * 0.5

    def mask_mod(b, h, q, kv):
        return q >= kv

    for _ in range(3):
        runs(score_mod=mod, mask=mask_mod)
    assert calls == ["mask", "score_mod"]
    runs(shape=dict(Sq=5), score_mod=mod)  # another signature: probed again
    assert calls == ["mask", "score_mod", "score_mod"]
    runs(
        score_mod=mods.relative_bias(torch.randn(4, 5)), mask=masks.document(torch.zeros(6, dtype=torch.long))
    )
    assert len(calls) == 3  # library masks and mods are checked by shape, never probed


def test_fresh_lambdas_from_one_line_are_probed_once(monkeypatch):
    """A step that writes score_mod=lambda ... makes a new function per call: same code, same captures'
    shapes -> probed once; a capture of another shape is probed again (and its mistake found)."""
    calls = []
    real = attnkit._probe._probe
    monkeypatch.setattr(attnkit._probe, "_probe", lambda *a: (calls.append(a[0]), real(*a)))

    def step(table):
        return runs(score_mod=lambda s, b, h, q, kv: s + table[h, kv])

    for _ in range(3):
        step(torch.randn(4, 6))
    assert calls == ["score_mod"]
    with pytest.raises(AttentionInputError, match="score_mod"):
        step(torch.randn(4, 5))
    assert calls == ["score_mod", "score_mod"]


def test_mask_and_mod_checks_skip_under_compile(monkeypatch):
    """Under torch.compile nothing is probed (no host work is traced into the graph)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    called = []
    monkeypatch.setattr(attnkit._probe, "_probe", lambda *a: called.append(a))
    runs(score_mod=lambda s, b, h, q, kv: s)
    assert called == []


# -- scale (and the other numbers): Python or NumPy reals, never tensors -------------------------------------
@pytest.mark.parametrize("scale", [torch.tensor(0.25), torch.tensor([0.25]), float("nan"), -float("inf")])
def test_scale_tensor_or_non_finite_refused(scale):
    expect_error("scale", scale=scale)


@pytest.mark.parametrize("scale", [np.float32(0.25), np.float64(0.25), np.int64(1), 0.25])
def test_scale_numpy_numbers_accepted(scale):
    q, k, v, _ = qkv()
    want = attnkit.attention(q, k, v, scale=float(scale), backend="reference")
    torch.testing.assert_close(attnkit.attention(q, k, v, scale=scale, backend="reference"), want)


def test_softcap_and_dropout_tensor_refused():
    expect_error("softcap", softcap=torch.tensor(5.0))
    expect_error("dropout_p", dropout_p=torch.tensor(0.1))


@pytest.mark.cuda
def test_mask_and_mod_checks_never_sync_the_device():
    """Validation of masks and mods with CUDA tensors (probe included) runs without a device sync."""
    from attnkit._call import normalize

    dev = "cuda"
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=4, Hk=2, Sq=6, Sk=6, D=8, device=dev)
    table = torch.randn(4, 6, device=dev)
    cases = [
        dict(mask=masks.document(torch.zeros(2, 6, dtype=torch.long, device=dev))),
        dict(
            mask=masks.shared_prefix(
                torch.tensor([1, 2], device=dev), torch.tensor([[2, 2], [1, 1]], device=dev)
            )
        ),
        dict(mask=masks.shared_prefix(2, [2, 1])),
        dict(mask=masks.flashmask(torch.full((2, 1, 6, 2), 6, dtype=torch.int32, device=dev), False)),
        dict(score_mod=mods.t5_bias(torch.randn(4, 8, device=dev), 8, 10)),
        dict(score_mod=lambda s, b, h, i, j: s + table[h, j], mask=lambda b, h, i, j: i >= j),
    ]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in cases:
            normalize(q, k, v, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
