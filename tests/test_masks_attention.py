"""The masks and mods of API.md §3 through ``attnkit.attention(backend="reference")``, forward and backward,
against oracle.attention64 fed a dense mask (or bias) built here from the written-out definitions in
test_masks_mods.py; dense layouts with Sq != Sk where allowed, GQA, and ``thd`` with per-sequence data."""

from __future__ import annotations

import pytest
import torch

import attnkit
import oracle
from attnkit import masks, mods
from test_masks_mods import expected, flashmask_pred, shared_prefix_pred, t5_dense_bias

F64 = torch.float64


def dense_thd(lens_q, lens_k, H, pred):
    """Dense (N, H, max Sq, max Sk) of pred(n, h, i, j, pos) per sequence (pos = i + Sk_n - Sq_n)."""
    N, mq, mk = len(lens_q), max(lens_q), max(lens_k)
    out = torch.zeros(N, H, mq, mk, dtype=torch.bool)
    for n in range(N):
        for h in range(H):
            for i in range(lens_q[n]):
                for j in range(lens_k[n]):
                    out[n, h, i, j] = bool(pred(n, h, i, j, i + lens_k[n] - lens_q[n]))
    return out


def run_and_compare(q, k, v, kw, *, mask=None, dense=None, score_mod=None, bias64=None, leaves=()):
    """attention(mask/score_mod) on the reference vs attention64 with the dense mask / bias; outputs and the
    gradients of q, k, v and of ``leaves`` (pairs: (attnkit leaf, float64 leaf used to build bias64))."""
    q2, k2, v2 = (oracle.clone_leaf(t) for t in (q, k, v))
    out, lse = attnkit.attention(
        q, k, v, mask=mask, score_mod=score_mod, backend="reference", return_lse=True, **kw
    )
    dense_mod = None if dense is None else (lambda b, h, i, j: dense[b, h, i, j])
    ref, ref_lse = oracle.attention64(q2, k2, v2, mask=dense_mod, bias=bias64, **kw)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-6, rtol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for mine, theirs in [(q, q2), (k, k2), (v, v2), *leaves]:
        assert mine.grad is not None and torch.isfinite(mine.grad).all()
        torch.testing.assert_close(mine.grad, theirs.grad)
    return out, lse


def inputs(layout="bhsd", **kw):
    shape = dict(B=2, Hq=4, Hk=2, Sq=7, Sk=7, D=8, dtype=F64, requires_grad=True)
    shape.update(kw)
    return oracle.make_inputs(layout, **shape)


# -- dense layouts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout,Sq,Sk", [("bhsd", 5, 9), ("bshd", 8, 8), ("bhsd", 9, 4)])
def test_dilated_sliding_window_in_attention(layout, Sq, Sk):
    q, k, v, kw = inputs(layout, Sq=Sq, Sk=Sk)
    dense = expected(2, 4, Sq, Sk, lambda b, h, i, j, pos: pos - 3 <= j <= pos + 1 and (pos - j) % 2 == 0)
    run_and_compare(q, k, v, kw, mask=masks.dilated_sliding_window(3, 2, 1), dense=dense)


@pytest.mark.parametrize("layout,Sq,Sk", [("bhsd", 6, 8), ("bshd", 7, 7)])
def test_global_sliding_in_attention(layout, Sq, Sk):
    q, k, v, kw = inputs(layout, Sq=Sq, Sk=Sk)
    dense = expected(2, 4, Sq, Sk, lambda b, h, i, j, pos: pos - 1 <= j <= pos or j < 2 or pos < 2)
    run_and_compare(q, k, v, kw, mask=masks.global_sliding(2, 1), dense=dense)


def test_shared_prefix_in_attention_with_padding_rows():
    """Rows past the last response have no key: out = 0, lse = -inf, finite zero gradients."""
    q, k, v, kw = inputs(Sq=9, Sk=9)
    P, L = torch.tensor([2, 3]), torch.tensor([[3, 2], [1, 2]])
    preds = [shared_prefix_pred(2, [3, 2]), shared_prefix_pred(3, [1, 2])]
    dense = expected(2, 4, 9, 9, lambda b, h, i, j, pos: preds[b](i, j))
    out, lse = run_and_compare(q, k, v, kw, mask=masks.shared_prefix(P, L), dense=dense)
    assert (out[1, :, 6:] == 0).all() and torch.isneginf(lse[1, :, 6:]).all()
    assert torch.isfinite(lse[0, :, :7]).all()


@pytest.mark.parametrize("causal,C", [(True, 1), (True, 2), (False, 2), (False, 4)])
@pytest.mark.parametrize("per_head", [False, True])
def test_flashmask_in_attention(causal, C, per_head):
    S = 8
    T = torch.randint(0, S + 1, (2, 4 if per_head else 1, S, C), dtype=torch.int32)
    q, k, v, kw = inputs(Sq=S, Sk=S)
    dense = expected(2, 4, S, S, flashmask_pred(T, causal))
    run_and_compare(q, k, v, kw, mask=masks.flashmask(T, causal), dense=dense)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("layout,Sq,Sk", [("bhsd", 5, 12), ("bshd", 9, 9)])
def test_t5_bias_in_attention_table_gradient(layout, Sq, Sk, bidirectional):
    """The table's gradient equals autograd of the dense formula score + table[h, bucket(i, j)]."""
    q, k, v, kw = inputs(layout, Sq=Sq, Sk=Sk)
    table = torch.randn(4, 8, dtype=F64, requires_grad=True)
    t64 = oracle.clone_leaf(table)
    bias64 = t5_dense_bias(t64, Sq, Sk, bidirectional, 8, 10).unsqueeze(0)  # (1, H, Sq, Sk)
    mod = mods.t5_bias(table, 8, 10, bidirectional=bidirectional)
    run_and_compare(q, k, v, kw, score_mod=mod, bias64=bias64, leaves=[(table, t64)])
    assert table.grad.abs().sum() > 0


# -- thd: per-sequence data, indexed by sequence n -----------------------------------------------------------
THD_LENS = [6, 0, 7, 1, 5]


def thd_inputs(lens_q=THD_LENS, lens_k=None):
    return inputs("thd", B=None, seqlens_q=lens_q, seqlens_k=lens_k)


def test_thd_document_per_sequence():
    ids = torch.randint(0, 3, (5, 7)).sort(dim=1).values  # (N, S >= longest)
    q, k, v, kw = thd_inputs()
    dense = dense_thd(THD_LENS, THD_LENS, 4, lambda n, h, i, j, pos: ids[n, i] == ids[n, j])
    run_and_compare(q, k, v, kw, mask=masks.document(ids), dense=dense)


def test_thd_prefix_lm_per_sequence_with_sq_ne_sk():
    lens_k = [8, 2, 7, 3, 5]
    P = torch.tensor([2, 1, 0, 3, 4])
    q, k, v, kw = thd_inputs(THD_LENS, lens_k)
    dense = dense_thd(THD_LENS, lens_k, 4, lambda n, h, i, j, pos: j < P[n] or j <= pos)
    run_and_compare(q, k, v, kw, mask=masks.prefix_lm(P), dense=dense)


def test_thd_shared_prefix_per_sequence():
    P = torch.tensor([2, 0, 1, 1, 0])
    L = torch.tensor([[2, 1], [0, 0], [3, 3], [0, 0], [4, 1]])
    preds = [shared_prefix_pred(int(P[n]), L[n].tolist()) for n in range(5)]
    q, k, v, kw = thd_inputs()
    dense = dense_thd(THD_LENS, THD_LENS, 4, lambda n, h, i, j, pos: preds[n](i, j))
    run_and_compare(q, k, v, kw, mask=masks.shared_prefix(P, L), dense=dense)


@pytest.mark.parametrize("causal,C", [(True, 2), (False, 4)])
def test_thd_flashmask_per_sequence(causal, C):
    T = torch.randint(0, 8, (5, 1, 7, C), dtype=torch.int32)
    q, k, v, kw = thd_inputs()
    pred = flashmask_pred(T, causal)
    dense = dense_thd(THD_LENS, THD_LENS, 4, lambda n, h, i, j, pos: pred(n, h, i, j, pos))
    run_and_compare(q, k, v, kw, mask=masks.flashmask(T, causal), dense=dense)


def test_thd_dilated_and_global_align_per_sequence():
    lens_k = [8, 2, 7, 3, 5]
    q, k, v, kw = thd_inputs(THD_LENS, lens_k)
    m = masks.dilated_sliding_window(4, 2) | masks.global_sliding(1, 0)
    dense = dense_thd(
        THD_LENS,
        lens_k,
        4,
        lambda n, h, i, j, pos: (pos - 4 <= j <= pos and (pos - j) % 2 == 0) or j == pos or j < 1 or pos < 1,
    )
    run_and_compare(q, k, v, kw, mask=m, dense=dense)


def test_thd_t5_bias_per_sequence_alignment():
    lens_k = [8, 2, 7, 3, 5]
    q, k, v, kw = thd_inputs(THD_LENS, lens_k)
    table = torch.randn(4, 8, dtype=F64, requires_grad=True)
    t64 = oracle.clone_leaf(table)
    parts = []
    for n in range(5):
        b = t5_dense_bias(t64, THD_LENS[n], lens_k[n], True, 8, 10)
        parts.append(torch.nn.functional.pad(b, (0, max(lens_k) - lens_k[n], 0, max(THD_LENS) - THD_LENS[n])))
    bias64 = torch.stack(parts)
    run_and_compare(q, k, v, kw, score_mod=mods.t5_bias(table, 8, 10), bias64=bias64, leaves=[(table, t64)])


@pytest.mark.parametrize(
    "make",
    [
        lambda: masks.dilated_sliding_window(3, 2),
        lambda: masks.global_sliding(1, 1),
        lambda: masks.shared_prefix(torch.tensor([2, 1]), torch.tensor([[2, 2], [3, 1]])),
        lambda: masks.flashmask(torch.randint(0, 9, (2, 4, 8, 4), dtype=torch.int32), False),
        lambda: mods.t5_bias(torch.randn(4, 8, dtype=F64), 8, 10),
    ],
)
@pytest.mark.parametrize("Hk", [1, 2])
def test_gqa_irrelevance(make, Hk):
    """Masks and mods see query heads only: GQA gives what MHA gives with k, v repeated per query head."""
    m = make()
    kw = {"mask": m} if isinstance(m, masks.Mask) else {"score_mod": m}
    q, k, v, _ = inputs(Hk=Hk, Sq=8, Sk=8, requires_grad=False)
    gqa = attnkit.attention(q, k, v, backend="reference", **kw)
    rep = 4 // Hk
    mha = attnkit.attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), backend="reference", **kw
    )
    torch.testing.assert_close(gqa, mha)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "make",
    [
        lambda d: masks.dilated_sliding_window(5, 2),
        lambda d: masks.global_sliding(2, 3),
        lambda d: masks.shared_prefix(3, [4, 5]),
        lambda d: masks.shared_prefix(
            torch.tensor([3, 1], device=d), torch.tensor([[4, 5], [2, 9]], device=d)
        ),
        lambda d: masks.flashmask(torch.randint(0, 17, (2, 1, 16, 2), dtype=torch.int32, device=d), True),
        lambda d: mods.t5_bias(torch.randn(4, 8, device=d, requires_grad=True), 8, 10),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_new_masks_on_cuda_backends(make, backend):
    """Every new mask and t5_bias on the GPU backends (flex compiled, or what auto picks) vs the oracle."""
    m = make("cuda")
    kw = {"mask": m} if isinstance(m, masks.Mask) else {"score_mod": m}
    q, k, v, base = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Hk=2, Sq=16, Sk=16, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    oracle.check_against_oracle(
        lambda *a, **k2: attnkit.attention(*a, backend=backend, **k2), q, k, v, **base, **kw
    )
