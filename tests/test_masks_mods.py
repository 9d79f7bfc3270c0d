"""attnkit.masks factories (to_dense vs hand-written loops), composition, draw(); attnkit.mods factories."""

from __future__ import annotations

import pytest
import torch

import attnkit
import oracle
from attnkit import masks, mods

F64 = torch.float64


def expected(B, H, Sq, Sk, pred):
    """Dense bool (B, H, Sq, Sk) from a plain-Python predicate pred(b, h, i, j, pos), pos = i + Sk - Sq."""
    out = torch.zeros(B, H, Sq, Sk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                for j in range(Sk):
                    out[b, h, i, j] = bool(pred(b, h, i, j, i + Sk - Sq))
    return out


SIZES = [(6, 6), (3, 8), (8, 3)]


@pytest.mark.parametrize("Sq,Sk", SIZES)
def test_causal(Sq, Sk):
    got = masks.causal().to_dense(2, 1, Sq, Sk)
    assert torch.equal(got, expected(2, 1, Sq, Sk, lambda b, h, i, j, pos: j <= pos))


@pytest.mark.parametrize("Sq,Sk", SIZES)
@pytest.mark.parametrize("left,right", [(2, 0), (0, 2), (1, 1), (-1, 1), (3, -1), (0, 0)])
def test_sliding_window(Sq, Sk, left, right):
    def pred(b, h, i, j, pos):
        return (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)

    got = masks.sliding_window(left, right).to_dense(1, 1, Sq, Sk)
    assert torch.equal(got, expected(1, 1, Sq, Sk, pred))


def test_sliding_window_default_right_is_zero():
    assert torch.equal(
        masks.sliding_window(2).to_dense(1, 1, 7, 7), masks.sliding_window(2, 0).to_dense(1, 1, 7, 7)
    )


def test_document_1d():
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    got = masks.document(ids).to_dense(2, 2, 8, 8)
    assert torch.equal(got, expected(2, 2, 8, 8, lambda b, h, i, j, pos: ids[i] == ids[j]))


def test_document_2d_per_batch():
    ids = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 3]])
    got = masks.document(ids).to_dense(2, 1, 6, 6)
    assert torch.equal(got, expected(2, 1, 6, 6, lambda b, h, i, j, pos: ids[b, i] == ids[b, j]))


def test_document_kv_ids():
    qid, kid = torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1, 1, 1])
    got = masks.document(qid, kid).to_dense(1, 1, 3, 5)
    assert torch.equal(got, expected(1, 1, 3, 5, lambda b, h, i, j, pos: qid[i] == kid[j]))


@pytest.mark.parametrize("Sq,Sk", SIZES)
def test_prefix_lm_int(Sq, Sk):
    got = masks.prefix_lm(3).to_dense(1, 2, Sq, Sk)
    assert torch.equal(got, expected(1, 2, Sq, Sk, lambda b, h, i, j, pos: j < 3 or j <= pos))


def test_prefix_lm_tensor():
    P = torch.tensor([0, 2, 5])
    got = masks.prefix_lm(P).to_dense(3, 1, 6, 6)
    assert torch.equal(got, expected(3, 1, 6, 6, lambda b, h, i, j, pos: j < P[b] or j <= pos))


@pytest.mark.parametrize("Sq,Sk", SIZES)
def test_chunked(Sq, Sk):
    got = masks.chunked(3).to_dense(1, 1, Sq, Sk)
    assert torch.equal(got, expected(1, 1, Sq, Sk, lambda b, h, i, j, pos: pos // 3 == j // 3))


def test_chunked_causal_llama4():
    got = (masks.chunked(3) & masks.causal()).to_dense(1, 1, 7, 7)
    assert torch.equal(got, expected(1, 1, 7, 7, lambda b, h, i, j, pos: i // 3 == j // 3 and j <= i))


@pytest.mark.parametrize("prefix", [0, 1])
def test_neighborhood_2d(prefix):
    Hh, W, kern = 3, 4, 3
    S = prefix + Hh * W

    def pred(b, h, i, j, pos):
        if i < prefix or j < prefix:
            return True
        (ri, ci), (rj, cj) = divmod(i - prefix, W), divmod(j - prefix, W)
        return abs(ri - rj) <= kern // 2 and abs(ci - cj) <= kern // 2

    got = masks.neighborhood_2d(Hh, W, kern, num_prefix_tokens=prefix).to_dense(1, 1, S, S)
    assert torch.equal(got, expected(1, 1, S, S, pred))


def test_from_mask_mod_uses_indices_as_given():
    def fn(b, h, qi, ki):
        return ((qi + 2 * ki + h + b) % 3) == 0

    got = masks.from_mask_mod(fn).to_dense(2, 2, 4, 6)
    assert torch.equal(got, expected(2, 2, 4, 6, lambda b, h, i, j, pos: (i + 2 * j + h + b) % 3 == 0))


def test_full():
    assert masks.full().to_dense(2, 3, 4, 5).all()


def test_combinators():
    a, c = masks.sliding_window(2, 1), masks.chunked(3)
    da, dc = a.to_dense(1, 1, 6, 9), c.to_dense(1, 1, 6, 9)
    assert torch.equal((a & c).to_dense(1, 1, 6, 9), da & dc)
    assert torch.equal((a | c).to_dense(1, 1, 6, 9), da | dc)
    assert torch.equal((~a).to_dense(1, 1, 6, 9), ~da)
    assert torch.equal(
        (~(a | c) & masks.causal()).to_dense(1, 1, 6, 9), ~(da | dc) & masks.causal().to_dense(1, 1, 6, 9)
    )


def test_combine_with_plain_callable():
    def even(b, h, qi, ki):
        return ki % 2 == 0

    m = masks.causal() & even
    dm = m.to_dense(1, 1, 5, 5)
    assert torch.equal(dm, expected(1, 1, 5, 5, lambda b, h, i, j, pos: j <= i and j % 2 == 0))
    assert torch.equal(
        (even | masks.causal()).to_dense(1, 1, 5, 5),
        expected(1, 1, 5, 5, lambda b, h, i, j, pos: j <= i or j % 2 == 0),
    )


def test_combine_with_bad_type_raises():
    with pytest.raises(TypeError):
        masks.causal() & 3


def test_mask_mod_assumes_equal_lengths():
    m = masks.causal()
    i, j = torch.arange(4).view(4, 1), torch.arange(4).view(1, 4)
    assert torch.equal(m.mask_mod(0, 0, i, j), j <= i)
    # bind() aligns to the bottom right for Sq != Sk
    assert torch.equal(
        m.bind(2, 5)(0, 0, torch.arange(2).view(2, 1), torch.arange(5).view(1, 5)),
        masks.causal().to_dense(1, 1, 2, 5)[0, 0],
    )


def test_draw():
    m = masks.causal()
    pic = m.draw(2, 5)
    lines = pic.splitlines()
    assert "causal" in lines[0]
    assert lines[1:] == ["████·", "█████"]
    assert len(masks.sliding_window(1, 1).draw(6).splitlines()) == 7


@pytest.mark.parametrize(
    "bad",
    [
        lambda: masks.sliding_window(-2),
        lambda: masks.sliding_window(1.5),
        lambda: masks.chunked(0),
        lambda: masks.document([0, 1]),
        lambda: masks.from_mask_mod(3),
    ],
)
def test_factory_validation(bad):
    with pytest.raises(ValueError):
        bad()


def test_native_masks_become_flags():
    """Masks expressible by the flags reach backends as flags (causal/window), not as an opaque mask."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=5, Sk=9, D=8, dtype=F64)
    call = oracle.make_call(q, k, v, mask=masks.causal() & masks.sliding_window(3))
    assert call.mask is None and call.causal and call.window == (3, 0)
    out = attnkit.attention(q, k, v, mask=masks.causal() & masks.sliding_window(3), backend="reference")
    torch.testing.assert_close(
        out, attnkit.attention(q, k, v, causal=True, window=(3, 0), backend="reference")
    )
    assert oracle.make_call(q, k, v, mask=masks.full()).mask is None
    assert oracle.make_call(q, k, v, mask=~masks.causal()).mask is not None


@pytest.mark.parametrize("layout", ["bhsd", "thd"])
def test_masks_in_attention_match_dense_oracle(layout):
    lens = [5, 1, 0, 7]
    q, k, v, kw = oracle.make_inputs(layout, B=2, Hq=2, Sq=7, Sk=7, D=8, seqlens_q=lens, dtype=F64)
    m = (masks.prefix_lm(2) & masks.sliding_window(3, 0)) | masks.chunked(4)
    out = attnkit.attention(q, k, v, mask=m, backend="reference", **kw)
    ref, _ = oracle.attention64(q, k, v, mask=m, **kw)
    torch.testing.assert_close(out, ref)


# -- mods ----------------------------------------------------------------------------------------------------
def _grid(B, H, Sq, Sk):
    return (
        torch.arange(B).view(B, 1, 1, 1),
        torch.arange(H).view(1, H, 1, 1),
        torch.arange(Sq).view(1, 1, Sq, 1),
        torch.arange(Sk).view(1, 1, 1, Sk),
    )


def test_softcap_mod():
    s = torch.randn(2, 2, 4, 4, dtype=F64) * 10
    b, h, i, j = _grid(2, 2, 4, 4)
    torch.testing.assert_close(mods.softcap(3.0)(s, b, h, i, j), 3.0 * torch.tanh(s / 3.0))


def test_softcap_mod_equals_softcap_argument():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=5, Sk=7, D=8, dtype=F64)
    a = attnkit.attention(q, k, v, score_mod=mods.softcap(0.5), backend="reference")
    torch.testing.assert_close(a, attnkit.attention(q, k, v, softcap=0.5, backend="reference"))


@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_mod_equals_alibi_argument(per_batch):
    """Bottom-right aligned, also for Sq != Sk."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=4, Sq=5, Sk=9, D=8, dtype=F64)
    slopes = oracle.alibi_slopes(4)
    if per_batch:
        slopes = slopes * torch.tensor([[1.0], [3.0]])
    a = attnkit.attention(q, k, v, score_mod=mods.alibi(slopes), backend="reference")
    torch.testing.assert_close(a, attnkit.attention(q, k, v, alibi_slopes=slopes, backend="reference"))


def test_alibi_mod_direct_call():
    slopes = torch.tensor([0.5, 0.25])
    s = torch.zeros(1, 2, 3, 3)
    got = mods.alibi(slopes)(s, *_grid(1, 2, 3, 3))
    i, j = torch.arange(3).view(3, 1), torch.arange(3).view(1, 3)
    torch.testing.assert_close(got[0, 1], -0.25 * (i - j).abs().float())


@pytest.mark.parametrize("per_head", [False, True])
def test_relative_bias_values(per_head):
    R = 5
    table = torch.randn(2, R) if per_head else torch.randn(R)
    s = torch.randn(1, 2, 3, 6)
    got = mods.relative_bias(table).bind(3, 6)(s, *_grid(1, 2, 3, 6))
    want = s.clone()
    for h in range(2):
        for i in range(3):
            for j in range(6):
                d = max(-2, min(2, i + 3 - j))
                want[0, h, i, j] += table[h, d + 2] if per_head else table[d + 2]
    torch.testing.assert_close(got, want)


def test_relative_bias_learnable_gradient():
    """The table of relative_bias gets the gradient of float64 autograd (oracle rule)."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=6, Sk=8, D=8, requires_grad=True)
    table = torch.randn(2, 7, requires_grad=True)
    t64 = table.detach().double().requires_grad_()
    tb = table.detach().clone().requires_grad_()
    out = attnkit.attention(q, k, v, score_mod=mods.relative_bias(table), causal=True, backend="reference")
    out64, _ = oracle.attention64(
        q.detach(), k.detach(), v.detach(), score_mod=mods.relative_bias(t64), causal=True
    )
    from attnkit.backends.reference import reference_forward

    outb, _ = reference_forward(
        oracle.make_call(q.detach(), k.detach(), v.detach(), score_mod=mods.relative_bias(tb), causal=True),
        upcast=False,
    )
    oracle.assert_close(out, out64, outb)
    g = torch.randn_like(out)
    out.backward(g)
    out64.backward(g.double())
    outb.backward(g)
    assert table.grad is not None and table.grad.abs().sum() > 0
    oracle.assert_close(table.grad, t64.grad, tb.grad, name="grad table")


def test_relative_bias_learnable_gradient_auto_without_qkv_grad():
    """Only the captured table requires grad: backend='auto' must still deliver its gradient."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=6, Sk=6, D=8)
    table = torch.randn(7, requires_grad=True)
    out = attnkit.attention(q, k, v, score_mod=mods.relative_bias(table))
    out.square().sum().backward()
    t2 = table.detach().clone().requires_grad_()
    ref = attnkit.attention(q, k, v, score_mod=mods.relative_bias(t2), backend="reference")
    ref.square().sum().backward()
    assert table.grad is not None
    torch.testing.assert_close(table.grad, t2.grad)


def test_compose_order():
    def f(s, b, h, i, j):
        return s * 2.0

    def g(s, b, h, i, j):
        return s + 1.0

    s = torch.randn(1, 1, 3, 3)
    grid = _grid(1, 1, 3, 3)
    torch.testing.assert_close(mods.compose(f, g)(s, *grid), s * 2.0 + 1.0)
    torch.testing.assert_close(mods.compose(g, f)(s, *grid), (s + 1.0) * 2.0)


def test_compose_in_attention():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=4, Sk=7, D=8, dtype=F64)
    slopes = oracle.alibi_slopes(2)
    a = attnkit.attention(
        q, k, v, score_mod=mods.compose(mods.softcap(1.5), mods.alibi(slopes)), backend="reference"
    )
    torch.testing.assert_close(
        a, attnkit.attention(q, k, v, softcap=1.5, alibi_slopes=slopes, backend="reference")
    )


@pytest.mark.parametrize(
    "bad",
    [
        lambda: mods.softcap(0),
        lambda: mods.softcap(-1.0),
        lambda: mods.alibi([0.5]),
        lambda: mods.relative_bias(torch.randn(4)),
        lambda: mods.relative_bias(torch.randn(2, 2, 3)),
    ],
)
def test_mod_factory_validation(bad):
    with pytest.raises(ValueError):
        bad()
