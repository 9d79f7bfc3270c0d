"""The reference oracle (backends/reference.py) against the direct float64 formula of tests/oracle.py.

Every argument of docs/api.md §1 is exercised here. Inputs are float32 (held to the oracle rule against the
float64 formula, forward, lse and gradients) or float64 (for torch.autograd.gradcheck).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
import oracle
from attnkit import masks
from attnkit.backends import reference

F64 = torch.float64


def ref_run(q, k, v, **kw):
    return attnkit.attention(q, k, v, backend="reference", **kw)


def check(q, k, v, **kw):
    return oracle.check_against_oracle(ref_run, q, k, v, **kw)


# -- layouts, GQA/MQA, head dims -----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("dims", [(16, 16), (16, 8), (8, 24)], ids=["D=Dv", "D>Dv", "D<Dv"])
def test_layouts_heads_dims(layout, heads, dims):
    Hq, Hk = heads
    D, Dv = dims
    lens = [5, 0, 1, 7] if layout == "thd" else None
    q, k, v, kw = oracle.make_inputs(
        layout,
        B=2,
        Hq=Hq,
        Hk=Hk,
        Sq=6,
        Sk=9,
        D=D,
        Dv=Dv,
        seqlens_q=lens,
        seqlens_k=[3, 4, 0, 9] if lens else None,
        requires_grad=True,
    )
    r = check(q, k, v, **kw)
    shape = {"bhsd": (2, Hq, 6, Dv), "bshd": (2, 6, Hq, Dv), "thd": (13, Hq, Dv)}[layout]
    assert tuple(r["out"].shape) == shape
    lse_shape = {"bhsd": (2, Hq, 6), "bshd": (2, Hq, 6), "thd": (Hq, 13)}[layout]
    assert tuple(r["lse"].shape) == lse_shape


def test_gqa_head_mapping():
    """Query head h reads kv head h // (Hq // Hk): identical query heads of a group give identical rows,
    and making one kv head different changes exactly its group."""
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=6, Hk=2, Sq=4, Sk=5, D=8)
    q = q[:, :1].expand(1, 6, 4, 8).contiguous()
    out = ref_run(q, k, v)
    torch.testing.assert_close(out[:, 0:3], out[:, 0:1].expand(1, 3, 4, 8), rtol=0, atol=0)
    torch.testing.assert_close(out[:, 3:6], out[:, 3:4].expand(1, 3, 4, 8), rtol=0, atol=0)
    assert not torch.allclose(out[:, 0], out[:, 3])


# -- causal and windows --------------------------------------------------------------------------------------
@pytest.mark.parametrize("Sq,Sk", [(6, 6), (3, 8), (8, 3), (1, 5), (5, 1)])
def test_causal_bottom_right(Sq, Sk):
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=Sq, Sk=Sk, D=8, requires_grad=True)
    r = check(q, k, v, causal=True, **kw)
    out, lse = r["out"], r["lse"]
    # Bottom-right: the last query row sees every key; rows i < Sq - Sk see none.
    full_last = ref_run(q[:, :, -1:], k, v)
    torch.testing.assert_close(out[:, :, -1:], full_last)
    n_empty = max(0, Sq - Sk)
    assert torch.all(out[:, :, :n_empty] == 0)
    assert torch.all(lse[:, :, :n_empty] == -math.inf)
    assert torch.isfinite(lse[:, :, n_empty:]).all()


def test_causal_picture_sq2_sk5():
    """API docstring picture: with Sq=2, Sk=5 row 0 sees keys 0..3, row 1 sees all five."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=1, Sq=2, Sk=5, D=4)
    out = ref_run(q, k, v, causal=True)
    row0 = ref_run(q[:, :, :1], k[:, :, :4], v[:, :, :4])
    row1 = ref_run(q[:, :, 1:], k, v)
    torch.testing.assert_close(out, torch.cat([row0, row1], dim=2))


@pytest.mark.parametrize("window", [(2, 0), (0, 2), (1, 1), (-1, 1), (3, -1), (0, 0), (-1, -1)])
@pytest.mark.parametrize("Sq,Sk", [(7, 7), (4, 9), (9, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_window(window, Sq, Sk, causal):
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=Sq, Sk=Sk, D=8, requires_grad=True)
    check(q, k, v, window=window, causal=causal, **kw)


def test_window_thd_ragged():
    lens_q, lens_k = [4, 0, 1, 6], [6, 2, 0, 3]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=4, Hk=2, D=8, seqlens_q=lens_q, seqlens_k=lens_k, requires_grad=True
    )
    check(q, k, v, window=(2, 1), causal=True, **kw)


# -- softcap, bias, alibi, scale -----------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [0.5, 5.0, 30.0])
def test_softcap(cap):
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=5, Sk=7, D=8, requires_grad=True)
    check(q, k, v, softcap=cap, scale=2.0, **kw)


def test_softcap_is_applied_before_bias():
    """Order of the pipeline: softcap(scale * qk) + bias, not softcap(scale * qk + bias)."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=1, Sq=3, Sk=4, D=4, dtype=F64)
    bias = torch.randn(3, 4, dtype=F64) * 5
    out = ref_run(q, k, v, softcap=0.3, bias=bias)
    s = 0.3 * torch.tanh((q @ k.transpose(-1, -2)) / 2.0 / 0.3) + bias
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


@pytest.mark.parametrize("scale", [0.05, 1.0, -0.5])
def test_scale(scale):
    q, k, v, kw = oracle.make_inputs("bshd", B=2, Hq=2, Sq=5, Sk=5, D=8, requires_grad=True)
    check(q, k, v, scale=scale, **kw)


def test_default_scale_is_inverse_sqrt_d():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=4, Sk=4, D=9, dtype=F64)
    torch.testing.assert_close(ref_run(q, k, v), ref_run(q, k, v, scale=1 / 3))


@pytest.mark.parametrize(
    "bias_shape",
    [(7,), (5, 7), (1, 7), (2, 1, 5, 7), (1, 3, 1, 7), (3, 5, 7), (2, 3, 5, 7), (2, 3, 5, 1)],
)
def test_bias_broadcast_and_grad(bias_shape):
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=3, Sq=5, Sk=7, D=8, requires_grad=True)
    bias = torch.randn(bias_shape, requires_grad=True)
    r = check(q, k, v, bias=bias, causal=True, **kw)
    assert r["inputs"]["bias"].grad.shape == bias.shape


def test_bias_grad_only():
    """Gradient reaches a bias even when q, k, v do not require grad."""
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=4, Sk=6, D=8)
    bias = torch.randn(2, 1, 4, 6, requires_grad=True)
    check(q, k, v, bias=bias, **kw)


def test_bias_thd():
    lens_q, lens_k = [3, 0, 5, 1], [4, 3, 5, 0]
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=8, seqlens_q=lens_q, seqlens_k=lens_k, requires_grad=True)
    bias = torch.randn(4, 2, 5, 5, requires_grad=True)  # (N, Hq, max_Sq, max_Sk)
    check(q, k, v, bias=bias, **kw)


@pytest.mark.parametrize("per_batch", [False, True], ids=["(Hq,)", "(B,Hq)"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd"])
def test_alibi(per_batch, layout):
    lens = [4, 1, 0, 6]
    B = 4 if layout == "thd" else 2
    q, k, v, kw = oracle.make_inputs(
        layout, B=B, Hq=4, Hk=2, Sq=5, Sk=8, D=8, seqlens_q=lens, seqlens_k=[6, 3, 2, 6], requires_grad=True
    )
    slopes = oracle.alibi_slopes(4)
    if per_batch:
        slopes = slopes * torch.rand(B, 1) * 4
    check(q, k, v, alibi_slopes=slopes, causal=True, **kw)


def test_alibi_bottom_right_distance():
    """ALiBi distance |i + (Sk - Sq) - j|: the last query row is at key position Sk - 1."""
    q = torch.zeros(1, 1, 2, 4, dtype=F64)  # all scores 0: only the ALiBi term matters
    k = torch.randn(1, 1, 5, 4, dtype=F64)
    v = torch.randn(1, 1, 5, 3, dtype=F64)
    slopes = torch.tensor([0.7], dtype=torch.float32)
    out = ref_run(q, k, v, alibi_slopes=slopes)
    dist = (torch.arange(2).view(2, 1) + 3 - torch.arange(5).view(1, 5)).abs().to(F64)
    torch.testing.assert_close(out[0, 0], torch.softmax(-0.7 * dist, -1) @ v[0, 0])


# -- score_mod and mask --------------------------------------------------------------------------------------
def test_score_mod_plain_callable():
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=3, Sq=5, Sk=6, D=8, requires_grad=True)

    def sm(s, b, h, qi, ki):
        return s * (1 + 0.1 * h) - 0.05 * (qi - ki).abs() + 0.2 * b

    check(q, k, v, score_mod=sm, **kw)


def test_score_mod_learnable_captured_tensor():
    """A tensor captured by score_mod receives the gradient of float64 autograd (oracle rule)."""
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=5, Sk=5, D=8, requires_grad=True)
    table = torch.randn(2, 9, requires_grad=True)
    table64 = table.detach().to(F64).requires_grad_()
    tab_base = table.detach().clone().requires_grad_()

    def make(t):
        return lambda s, b, h, qi, ki: s + t[h, qi - ki + 4]

    out = ref_run(q, k, v, score_mod=make(table), causal=True)
    out64, _ = oracle.attention64(q.detach(), k.detach(), v.detach(), score_mod=make(table64), causal=True)
    call = oracle.make_call(q.detach(), k.detach(), v.detach(), score_mod=make(tab_base), causal=True)
    outb, _ = reference.reference_forward(call, upcast=False)
    oracle.assert_close(out, out64, outb)
    g = torch.randn_like(out)
    out.backward(g)
    out64.backward(g.to(F64))
    outb.backward(g)
    assert table.grad is not None and table.grad.abs().sum() > 0
    oracle.assert_close(table.grad, table64.grad, tab_base.grad, name="grad table")


def test_score_mod_thd_positions_are_per_sequence():
    lens = [3, 0, 1, 5]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, D=8, seqlens_q=lens, seqlens_k=[4, 2, 3, 5], requires_grad=True
    )

    def sm(s, b, h, qi, ki):
        return s - 0.3 * (qi - ki).abs() + 0.1 * b

    check(q, k, v, score_mod=sm, **kw)


def _mask_cases(B, Sq, Sk):
    doc = torch.randint(0, 3, (B, Sq)).sort(dim=1).values
    return {
        "Mask": masks.sliding_window(2, 1) & masks.prefix_lm(2),
        "Mask~|": ~masks.causal() | masks.chunked(3),
        "callable": lambda b, h, qi, ki: (qi + ki + h) % 3 != 0,
        "document(B,S)": masks.document(doc),
    }


@pytest.mark.parametrize("which", ["Mask", "Mask~|", "callable", "document(B,S)"])
def test_mask(which):
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=6, Sk=6, D=8, requires_grad=True)
    check(q, k, v, mask=_mask_cases(2, 6, 6)[which], **kw)


def test_mask_sq_ne_sk_is_bottom_right():
    q, k, v, kw = oracle.make_inputs("bshd", B=2, Hq=2, Sq=4, Sk=9, D=8, requires_grad=True)
    check(q, k, v, mask=masks.chunked(3) & masks.causal(), **kw)


def test_mask_thd():
    lens_q, lens_k = [5, 1, 0, 4], [5, 3, 2, 6]
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=8, seqlens_q=lens_q, seqlens_k=lens_k, requires_grad=True)
    check(q, k, v, mask=masks.chunked(2) | masks.sliding_window(1, 0), **kw)


def test_block_mask_create_block_mask():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")

    def mm(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki) < 3)

    bm = fa.create_block_mask(mm, None, None, 8, 8, device="cpu", _compile=False)
    q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=8, Sk=8, D=8, requires_grad=True)
    r = check(q, k, v, mask=bm, **kw)
    expected = ref_run(q.detach(), k.detach(), v.detach(), mask=mm)
    torch.testing.assert_close(r["out"].detach(), expected, rtol=0, atol=0)


def test_block_mask_from_kv_blocks():
    """A BlockMask built directly: its mask_mod (not its block structure) defines the mask."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    if not hasattr(fa.BlockMask, "from_kv_blocks"):
        pytest.skip("BlockMask.from_kv_blocks missing")
    S = 256  # two 128-blocks
    kv_num = torch.tensor([[[1, 2]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32)

    def mm(b, h, qi, ki):
        return ki <= qi

    bm = fa.BlockMask.from_kv_blocks(kv_num, kv_idx, mask_mod=mm, seq_lengths=(S, S))
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=1, Sq=S, Sk=S, D=8)
    check(q, k, v, mask=bm, **kw)
    torch.testing.assert_close(ref_run(q, k, v, mask=bm), ref_run(q, k, v, causal=True), rtol=0, atol=0)


# -- fully masked rows, empty problems -----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhsd", "thd"])
def test_fully_masked_rows(layout):
    lens = [4, 3, 1]
    q, k, v, kw = oracle.make_inputs(layout, B=2, Hq=2, Sq=6, Sk=6, D=8, seqlens_q=lens, requires_grad=True)

    def mm(b, h, qi, ki):  # rows 0 and 2 see nothing; head 1 of batch 1 sees nothing at all
        return (qi != 0) & (qi != 2) & ~((b == 1) & (h == 1)) & (ki <= qi)

    r = check(q, k, v, mask=mm, **kw)
    out, lse = r["out"], r["lse"]
    if layout == "bhsd":
        dead = torch.zeros(2, 2, 6, dtype=torch.bool)
        dead[:, :, [0, 2]] = True
        dead[1, 1] = True
        assert torch.all(out.detach()[dead] == 0)
        assert torch.all(lse[dead] == -math.inf)
        assert torch.isfinite(lse[~dead]).all()
    for name in ("q", "k", "v"):
        grad = r["inputs"][name].grad
        assert torch.isfinite(grad).all(), f"grad {name} not finite"
    if layout == "bhsd":
        assert torch.all(r["inputs"]["q"].grad.transpose(1, 2)[dead.transpose(1, 2)] == 0)


def test_fully_masked_everything_gives_zero_grads():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=4, Sk=5, D=8, requires_grad=True)
    out, lse = ref_run(q, k, v, mask=lambda b, h, qi, ki: qi < 0, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.all(t.grad == 0)


@pytest.mark.parametrize("Sq,Sk", [(0, 5), (5, 0), (0, 0)])
def test_empty_dense(Sq, Sk):
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=Sq, Sk=Sk, D=8, Dv=4, requires_grad=True)
    out, lse = ref_run(q, k, v, return_lse=True)
    assert out.shape == (2, 2, Sq, 4) and lse.shape == (2, 2, Sq)
    assert torch.all(out == 0) and torch.all(lse == -math.inf) and lse.dtype == torch.float32
    out.sum().backward()
    assert torch.all(q.grad == 0)


def test_empty_thd_all_sequences_empty():
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=8, seqlens_q=[0, 0, 0], requires_grad=True)
    out, lse = ref_run(q, k, v, return_lse=True, **kw)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


def test_thd_keys_only_empty():
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=8, seqlens_q=[2, 3], seqlens_k=[0, 0], requires_grad=True)
    out, lse = ref_run(q, k, v, return_lse=True, **kw)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


def test_thd_sequences_do_not_attend_across():
    """Changing one sequence's keys leaves every other sequence's output unchanged."""
    lens = [3, 4, 2]
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=8, seqlens_q=lens)
    out = ref_run(q, k, v, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[3:7] = torch.randn(4, 2, 8)
    v2[3:7] = torch.randn(4, 2, 8)
    out2 = ref_run(q, k2, v2, **kw)
    assert torch.equal(out[:3], out2[:3]) and torch.equal(out[7:], out2[7:])
    assert not torch.allclose(out[3:7], out2[3:7])


def test_max_seqlen_larger_than_needed():
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=8, seqlens_q=[3, 5], requires_grad=True)
    check(q, k, v, max_seqlen_q=9, max_seqlen_k=7, causal=True, **kw)


# -- return_lse, dtypes, deterministic -----------------------------------------------------------------------
def test_return_lse_values():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=3, Sk=4, D=8, dtype=F64)
    out, lse = ref_run(q, k, v, return_lse=True, scale=0.5)
    s = (q @ k.transpose(-1, -2)) * 0.5
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float())
    assert lse.dtype == torch.float32
    assert not isinstance(ref_run(q, k, v), tuple)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_dtypes_oracle_rule(dtype):
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Hk=2, Sq=16, Sk=24, D=16, dtype=dtype, requires_grad=True
    )
    bias = torch.randn(1, 4, 16, 24, dtype=dtype, requires_grad=True)
    r = check(q, k, v, bias=bias, causal=True, softcap=8.0, **kw)
    assert r["out"].dtype == dtype


def test_deterministic_flag_same_result():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=5, Sk=5, D=8, requires_grad=True)
    outs = []
    for _ in range(2):
        out = ref_run(q, k, v, deterministic=True, causal=True)
        (gq,) = torch.autograd.grad(out.sum(), q)
        outs.append((out.detach(), gq))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# -- dropout -------------------------------------------------------------------------------------------------
def test_dropout_identity_values_reveal_keep_mask():
    """With v = identity, out[i, j] = p_ij * keep_ij / (1 - dropout_p): kept entries are exactly the
    no-dropout probabilities scaled by 1/(1-p), and about a fraction p of them are dropped."""
    Sk, p = 64, 0.3
    q, k, _, _ = oracle.make_inputs("bhsd", B=2, Hq=4, Sq=32, Sk=Sk, D=16, dtype=F64)
    v = torch.eye(Sk, dtype=F64).expand(2, 4, Sk, Sk)
    probs = ref_run(q, k, v)
    out = ref_run(q, k, v, dropout_p=p)
    kept = out != 0
    torch.testing.assert_close(out[kept], probs[kept] / (1 - p))
    n = kept.numel()
    frac = 1 - kept.double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), f"dropped fraction {frac:.4f}, expected {p}"


def test_dropout_mean_matches_no_dropout():
    """The mean over many dropout draws converges to the no-dropout output (z-scores bounded)."""
    p, draws = 0.25, 400
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=8, Sk=16, D=8, dtype=F64)
    exact = ref_run(q, k, v)
    probs = ref_run(q, k, torch.eye(16, dtype=F64).expand(1, 2, 16, 16))
    acc = torch.zeros_like(exact)
    for _ in range(draws):
        acc += ref_run(q, k, v, dropout_p=p)
    mean = acc / draws
    # Var(out_i) = p/(1-p) * sum_j P_ij^2 v_j^2
    var = p / (1 - p) * (probs**2) @ (v**2)
    z = (mean - exact) / (var / draws).sqrt()
    assert z.abs().max() < 6, f"max |z| = {z.abs().max():.2f}"


def test_dropout_gradients_use_the_same_mask():
    """Backward of a dropout call equals float64 autograd of the direct formula with the same keep-mask."""
    p, Sk = 0.4, 12
    q, k, _, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=6, Sk=Sk, D=8, dtype=F64, requires_grad=True)
    v = torch.eye(Sk, dtype=F64).expand(1, 2, Sk, Sk).clone().requires_grad_()
    out = ref_run(q, k, v, dropout_p=p, causal=True)
    keep = out.detach() != 0
    q64, k64, v64 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out64, _ = oracle.attention64(q64, k64, v64, dropout_p=p, keep=keep, causal=True)
    torch.testing.assert_close(out, out64)
    g = torch.randn_like(out)
    out.backward(g)
    out64.backward(g)
    for a, b in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(a.grad, b.grad)


def test_dropout_explicit_keep_hook():
    """The reference's dropout_keep hook: exact 1/(1-p) semantics for an arbitrary given keep-mask."""
    p = 0.5
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=5, Sk=7, D=8, dtype=F64)
    keep = torch.rand(2, 2, 5, 7) > p

    def keep_fn(b, h0, h1, r0, rows, Sk, device):
        return keep[b, h0:h1, r0 : r0 + rows, :Sk]

    call = oracle.make_call(q, k, v, dropout_p=p, window=(2, 2))
    out, _ = reference.reference_forward(call, dropout_keep=keep_fn)
    out64, _ = oracle.attention64(q, k, v, dropout_p=p, keep=keep, window=(2, 2))
    torch.testing.assert_close(out, out64)


# -- gradients -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "feature",
    ["plain", "causal_sq_gt_sk", "window", "softcap", "alibi", "bias", "score_mod", "mask", "gqa_thd"],
)
def test_gradcheck(feature):
    """torch.autograd.gradcheck (finite differences) on tiny float64 problems."""
    kw = {}
    shape = dict(B=1, Hq=2, Sq=3, Sk=4, D=3, Dv=2)
    layout = "bhsd"
    extra = {}
    if feature == "causal_sq_gt_sk":
        shape.update(Sq=5, Sk=3)
        kw["causal"] = True
    elif feature == "window":
        kw["window"] = (1, 0)
    elif feature == "softcap":
        kw["softcap"] = 0.7
    elif feature == "alibi":
        kw["alibi_slopes"] = oracle.alibi_slopes(2)
    elif feature == "bias":
        extra["bias"] = torch.randn(1, 2, 3, 4, dtype=F64, requires_grad=True)
    elif feature == "score_mod":
        table = torch.randn(2, 7, dtype=F64, requires_grad=True)
        extra["table"] = table
    elif feature == "mask":
        kw["mask"] = lambda b, h, qi, ki: (qi + ki) % 2 == 0
    elif feature == "gqa_thd":
        layout = "thd"
        shape.update(Hq=4, Hk=2)
        kw["causal"] = True
    q, k, v, lkw = oracle.make_inputs(
        layout, dtype=F64, requires_grad=True, seqlens_q=[2, 0, 1], seqlens_k=[3, 1, 0], **shape
    )
    kw.update(lkw)
    names = ["q", "k", "v", *extra]
    tensors = [q, k, v, *extra.values()]

    def fn(*ts):
        d = dict(zip(names, ts))
        fkw = dict(kw)
        if "bias" in d:
            fkw["bias"] = d["bias"]
        if "table" in d:
            t = d["table"]
            fkw["score_mod"] = lambda s, b, h, qi, ki: s + t[h, qi - ki + 3]
        return ref_run(d["q"], d["k"], d["v"], **fkw)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["bhsd", "thd"])
def test_chunking_does_not_change_results(monkeypatch, layout):
    """With a tiny CHUNK_ELEMENTS the reference splits heads and rows into many chunks (counted), and
    forward, lse and gradients stay equal to the one-chunk results and to the oracle."""
    lens = [7, 0, 1, 9]
    q, k, v, kw = oracle.make_inputs(
        layout,
        B=2,
        Hq=4,
        Hk=2,
        Sq=9,
        Sk=11,
        D=8,
        seqlens_q=lens,
        seqlens_k=[9, 2, 3, 11],
        dtype=F64,
        requires_grad=True,
    )
    bias_shape = (4, 4, 9, 11) if layout == "thd" else (2, 4, 9, 11)
    bias = torch.randn(bias_shape, dtype=F64, requires_grad=True)
    args = dict(causal=True, bias=bias, alibi_slopes=oracle.alibi_slopes(4), return_lse=True, **kw)

    def run():
        for t in (q, k, v, bias):
            t.grad = None
        out, lse = ref_run(q, k, v, **args)
        out.backward(torch.ones_like(out))
        return out.detach(), lse, q.grad.clone(), k.grad.clone(), v.grad.clone(), bias.grad.clone()

    calls = []
    inner = reference._attend_chunk

    def counting(*a, **kwargs):
        calls.append(a[0].shape)
        return inner(*a, **kwargs)

    monkeypatch.setattr(reference, "_attend_chunk", counting)
    whole = run()
    n_whole = len(calls)
    calls.clear()
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 11 * 2)  # 2 heads x 2 rows per chunk
    chunked = run()
    assert len(calls) > 4 * n_whole, f"{len(calls)} chunks vs {n_whole} unchunked"
    assert max(s[0] * s[1] for s in calls) <= 4
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    check(q, k, v, **{key: val for key, val in args.items() if key != "return_lse"})
