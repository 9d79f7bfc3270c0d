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


# -- the data and pattern masks of docs/api.md §3 (each against its definition, written out here) ----------
@pytest.mark.parametrize("Sq,Sk", SIZES)
@pytest.mark.parametrize("left,dilation,right", [(4, 2, 0), (5, 3, 2), (-1, 2, 0), (3, 1, 1), (2, 4, -1)])
def test_dilated_sliding_window(Sq, Sk, left, dilation, right):
    def pred(b, h, i, j, pos):
        in_window = (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)
        return in_window and (pos - j) % dilation == 0

    got = masks.dilated_sliding_window(left, dilation, right).to_dense(2, 3, Sq, Sk)
    assert torch.equal(got, expected(2, 3, Sq, Sk, pred))


def test_dilated_sliding_window_default_right_and_dilation_one():
    m = masks.dilated_sliding_window(3, 2)
    assert m.kind == "dilated_sliding_window" and m.params == {"left": 3, "dilation": 2, "right": 0}
    plain = masks.dilated_sliding_window(3, 1, 1)
    assert torch.equal(plain.to_dense(1, 1, 7, 9), masks.sliding_window(3, 1).to_dense(1, 1, 7, 9))


@pytest.mark.parametrize("Sq,Sk", SIZES)
@pytest.mark.parametrize("g,left,right", [(1, 1, 0), (2, 2, 1), (0, 1, 0), (3, -1, 0), (2, 0, -1)])
def test_global_sliding(Sq, Sk, g, left, right):
    def pred(b, h, i, j, pos):
        in_window = (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)
        return in_window or j < g or pos < g

    m = masks.global_sliding(g, left, right)
    assert m.kind == "global_sliding" and m.params == {"num_global": g, "left": left, "right": right}
    assert torch.equal(m.to_dense(2, 2, Sq, Sk), expected(2, 2, Sq, Sk, pred))


def shared_prefix_pred(P, lens):
    """pred(i, j) for one row: prompt [0, P), then the responses back to back, then padding."""

    def segment(x):
        if x < P:
            return "prompt"
        end = P
        for r, n in enumerate(lens):
            end += n
            if x < end:
                return r
        return "past"

    def pred(i, j):
        si, sj = segment(i), segment(j)
        if si == "past" or j > i:
            return False
        return si == "prompt" or sj == "prompt" or sj == si

    return pred


def test_shared_prefix_ints():
    S, P, lens = 10, 3, [2, 0, 3]
    m = masks.shared_prefix(P, lens)
    assert m.kind == "shared_prefix" and m.params["prefix_len"] == 3 and m.params["response_lens"] is lens
    pred = shared_prefix_pred(P, lens)
    assert torch.equal(m.to_dense(2, 2, S, S), expected(2, 2, S, S, lambda b, h, i, j, pos: pred(i, j)))


def test_shared_prefix_per_batch_tensors():
    P = torch.tensor([2, 0, 4])
    L = torch.tensor([[3, 2], [1, 5], [0, 1]])
    m = masks.shared_prefix(P, L)
    assert m.params["prefix_len"] is P and m.params["response_lens"] is L
    preds = [shared_prefix_pred(int(P[b]), L[b].tolist()) for b in range(3)]
    got = m.to_dense(3, 2, 8, 8)
    assert torch.equal(got, expected(3, 2, 8, 8, lambda b, h, i, j, pos: preds[b](i, j)))


@pytest.mark.parametrize("mixed", ["tensor_prefix", "tensor_lens"])
def test_shared_prefix_mixed_forms(mixed):
    P = torch.tensor([1, 3]) if mixed == "tensor_prefix" else 2
    L = [2, 2] if mixed == "tensor_prefix" else torch.tensor([[1, 3], [2, 0]])
    preds = [
        shared_prefix_pred(
            int(P[b]) if isinstance(P, torch.Tensor) else P, L if isinstance(L, list) else L[b].tolist()
        )
        for b in range(2)
    ]
    got = masks.shared_prefix(P, L).to_dense(2, 1, 7, 7)
    assert torch.equal(got, expected(2, 1, 7, 7, lambda b, h, i, j, pos: preds[b](i, j)))


def flashmask_pred(T, causal):
    """pred(b, h, i, j) from FlashMask's column intervals (docs/api.md §3), indices broadcast."""
    C = T.shape[-1]

    def pred(b, h, i, j, pos):
        col = T[b if T.shape[0] > 1 else 0, h if T.shape[1] > 1 else 0, j].tolist()
        if causal and C == 1:
            hidden = i >= col[0]
        elif causal:
            hidden = col[0] <= i < col[1]
        elif C == 2:
            hidden = i >= col[0] or i < col[1]
        else:
            hidden = col[0] <= i < col[1] or col[2] <= i < col[3]
        return not hidden and (j <= i or not causal)

    return pred


@pytest.mark.parametrize("causal,C", [(True, 1), (True, 2), (False, 2), (False, 4)])
@pytest.mark.parametrize("Bt,Ht", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_flashmask(causal, C, Bt, Ht):
    S = 7
    T = torch.randint(0, S + 1, (Bt, Ht, S, C), dtype=torch.int32)
    m = masks.flashmask(T, causal)
    assert m.kind == "flashmask" and m.params["startend_row_indices"] is T and m.params["causal"] is causal
    got = m.to_dense(2, 3, S, S)
    assert torch.equal(got, expected(2, 3, S, S, flashmask_pred(T, causal)))


def test_flashmask_causal_c1_is_document_causal():
    """FlashMask's own example: a causal document mask is, per column, 'hidden from the document's end on'."""
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    ends = torch.tensor([3, 3, 3, 5, 5, 8, 8, 8], dtype=torch.int32).view(1, 1, 8, 1)
    want = (masks.document(ids) & masks.causal()).to_dense(1, 1, 8, 8)
    assert torch.equal(masks.flashmask(ends, True).to_dense(1, 1, 8, 8), want)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: masks.dilated_sliding_window(3, 2),
        lambda: masks.global_sliding(1, 2),
        lambda: masks.shared_prefix(2, [2, 3]),
        lambda: masks.shared_prefix(torch.tensor([1, 2]), torch.tensor([[2, 1], [1, 1]])),
        lambda: masks.flashmask(torch.full((1, 1, 6, 1), 6, dtype=torch.int32), True),
        lambda: masks.document(torch.tensor([0, 0, 1, 1, 1, 2])),
        lambda: masks.prefix_lm(2),
        lambda: masks.chunked(3),
        lambda: masks.neighborhood_2d(2, 3, 3, num_prefix_tokens=1),
        lambda: masks.causal() & masks.document(torch.tensor([0, 0, 1, 1, 1])),
        lambda: masks.from_mask_mod(lambda b, h, q, kv: (q + kv) % 2 == 0),
    ],
)
def test_every_mask_draws_itself(factory, tmp_path):
    m = factory()
    pic = m.draw()
    lines = pic.splitlines()
    S = m.size or 16
    assert m.name in lines[0] and len(lines) == S + 1
    dense = m.to_dense(1, 1, S, S)[0, 0]
    assert lines[1:] == ["".join("█" if x else "·" for x in row) for row in dense.tolist()]
    png = tmp_path / "mask.png"
    assert m.draw(path=str(png)) == pic
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (8 * S, 8 * S)


def test_draw_other_batch_row_and_sizes():
    m = masks.shared_prefix(torch.tensor([1, 2]), torch.tensor([[2, 1], [1, 1]]))
    lines = m.draw(5, b=1).splitlines()[1:]
    assert lines == ["".join("█" if x else "·" for x in r) for r in m.to_dense(2, 1, 5, 5)[1, 0].tolist()]
    assert len(masks.global_sliding(1, 1).draw(3, 6).splitlines()[1]) == 6


# -- t5_bias -------------------------------------------------------------------------------------------------
def test_t5_bucket_known_values():
    """T5 defaults (32 buckets, max distance 128), worked by hand from the paper's scheme."""
    rp = torch.tensor([0, 1, -1, -7, -8, -12, -128, -500, 3, 200])
    got = mods.t5_relative_bucket(rp, True, 32, 128).tolist()
    # bidirectional: 16 buckets a side, 8 exact; -12 -> 8 + int(log(12/8) / log(16) * 8) = 9
    assert got == [0, 17, 1, 7, 8, 9, 15, 15, 19, 31]
    uni = mods.t5_relative_bucket(rp, False, 32, 128).tolist()
    # causal: 32 buckets for the past, 16 exact; -128 -> 16 + log(8) / log(8) * 16 = 32 -> capped at 31
    assert uni == [0, 0, 1, 7, 8, 12, 31, 31, 0, 0]  # keys after the query share bucket 0


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("nb,md", [(32, 128), (8, 20), (6, 5)])
def test_t5_bucket_matches_hugging_face(bidirectional, nb, md):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rp = torch.arange(-300, 301)
    want = t5.T5Attention._relative_position_bucket(
        rp, bidirectional=bidirectional, num_buckets=nb, max_distance=md
    )
    assert torch.equal(mods.t5_relative_bucket(rp, bidirectional, nb, md), want)


def t5_dense_bias(table, Sq, Sk, bidirectional, nb, md):
    """(H, Sq, Sk) bias table[h, bucket(j - (i + Sk - Sq))], by explicit loops over positions."""
    H = table.shape[0]
    idx = torch.empty(Sq, Sk, dtype=torch.long)
    for i in range(Sq):
        for j in range(Sk):
            idx[i, j] = int(mods.t5_relative_bucket(torch.tensor(j - (i + Sk - Sq)), bidirectional, nb, md))
    return table[:, idx].view(H, Sq, Sk)


def test_t5_bias_values_and_alignment():
    table = torch.randn(3, 8, dtype=F64)
    m = mods.t5_bias(table, 8, 20, bidirectional=True)
    assert m.kind == "t5_bias" and m.params["table"] is table and m.params["num_buckets"] == 8
    s = torch.randn(1, 3, 4, 9, dtype=F64)
    got = m.bind(4, 9)(s, *_grid(1, 3, 4, 9))
    torch.testing.assert_close(got, s + t5_dense_bias(table, 4, 9, True, 8, 20).unsqueeze(0))


def test_t5_bias_matches_hugging_face_compute_bias():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    from transformers import T5Config

    cfg = T5Config(
        num_heads=2, relative_attention_num_buckets=16, relative_attention_max_distance=40, d_model=8
    )
    attn = t5.T5Attention(cfg, has_relative_attention_bias=True)
    want = attn.compute_bias(11, 11).detach()  # (1, H, q, k), Sq == Sk (HF aligns top-left)
    table = attn.relative_attention_bias.weight.detach().t()
    s = torch.zeros(1, 2, 11, 11)
    got = mods.t5_bias(table, 16, 40, bidirectional=True)(s, *_grid(1, 2, 11, 11))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: mods.t5_bias(torch.randn(2, 8), 16, 40),  # table's buckets != num_buckets
        lambda: mods.t5_bias(torch.randn(8), 8, 40),
        lambda: mods.t5_bias(torch.randn(2, 8, dtype=F64).long(), 8, 40),
        lambda: mods.t5_bias(torch.randn(2, 2), 2, 40),  # bidirectional needs >= 4 buckets
        lambda: mods.t5_bias(torch.randn(2, 8), 8, 2),  # max_distance within the exact range
        lambda: mods.t5_bias(torch.randn(2, 8), 8, 20, bidirectional=1),
        lambda: masks.dilated_sliding_window(2, 0),
        lambda: masks.global_sliding(-1, 2),
        lambda: masks.shared_prefix(-1, [2]),
        lambda: masks.shared_prefix(2, [2, -1]),
        lambda: masks.shared_prefix(2, torch.tensor([2, 1])),
        lambda: masks.shared_prefix(torch.tensor([1, 2]), torch.tensor([[2, 1]])),
        lambda: masks.flashmask(torch.zeros(1, 1, 4, 1, dtype=torch.int64), True),
        lambda: masks.flashmask(torch.zeros(1, 4, 1, dtype=torch.int32), True),
        lambda: masks.flashmask(torch.zeros(1, 1, 4, 4, dtype=torch.int32), True),
        lambda: masks.flashmask(torch.zeros(1, 1, 4, 1, dtype=torch.int32), False),
        lambda: masks.flashmask(torch.zeros(1, 1, 4, 2, dtype=torch.int32), 1),
        lambda: masks.prefix_lm(-2),
        lambda: masks.document(torch.tensor([0.0, 1.0])),
    ],
)
def test_new_factory_validation(bad):
    with pytest.raises(attnkit.AttentionInputError):
        bad()


def test_to_dense_follows_the_device_of_the_mask_data():
    """``to_dense`` builds its index grids where the mask's data lives (a CUDA doc-id tensor gives a CUDA
    mask), so masks made of device tensors densify without a device error."""
    ids = torch.zeros(8, dtype=torch.int32, device="meta")
    assert (masks.document(ids) & masks.causal()).to_dense(1, 1, 8, 8).device.type == "meta"
    assert masks.causal().to_dense(1, 1, 4, 4).device.type == "cpu"
    lens = torch.tensor([[2, 1], [3, 3]])
    dense = masks.shared_prefix(torch.tensor([2, 1]), lens).to_dense(2, 1, 8, 8)
    assert dense[1, 0, 4].tolist() == [True, False, False, False, True, False, False, False]
