"""score_mod compiled into our Triton kernels (``attnkit.compiler``): forward, lse and gradients of q, k, v
(and bias) against the float64 oracle, in the interpreter on the CPU (fp16/fp32, tiny shapes, 16x16 tiles)
and natively on a GPU (bf16, ``@pytest.mark.cuda``); refusals name the op and the user's source line; the
generated code is cached by structure, not by values."""

from __future__ import annotations

import pytest
import torch

import attnkit
import oracle
from attnkit import compiler, dispatch, masks
from attnkit import mods as M
from attnkit._call import normalize

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float16, torch.float32)

common = pytest.importorskip("attnkit.backends.triton.ops.common")


pytestmark = pytest.mark.usefixtures("poison_triton_outputs")  # (conftest.py)
tri = oracle.tri


def _mods(H: int, device=DEV):
    """Hand-written FlexAttention-style score mods over captured tables, by name."""
    rel = torch.randn(H, 9, device=device)
    slopes = oracle.alibi_slopes(H, device)
    scales = torch.rand(H, device=device) + 0.5
    twice = torch.randn(H, 7, device=device)
    bias_qk = torch.randn(32, 32, device=device, dtype=torch.float16)

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + rel[h, (q_idx - kv_idx).clamp(-4, 4) + 4]

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def softcap(score, b, h, q_idx, kv_idx):
        return 2.0 * torch.tanh(score / 2.0)

    def head_scale(score, b, h, q_idx, kv_idx):
        return score * scales[h]

    def where_qkv(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx + kv_idx) % 3 == 0, score * 0.5 - 1.0, torch.exp(score / 4.0))

    def read_twice(score, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).abs() % 7
        return score * torch.sigmoid(twice[h, d]) + twice[h, (kv_idx // 2) % 7]

    def dense_bias(score, b, h, q_idx, kv_idx):  # a 16-bit (S, S) table read by both positions
        return score + bias_qk[q_idx, kv_idx]

    return {f.__name__: f for f in (rel_bias, alibi, softcap, head_scale, where_qkv, read_twice, dense_bias)}


NAMES = tuple(_mods(2))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mods_fwd_bwd(name, dtype):
    q, k, v, kw = oracle.make_inputs(B=2, Hq=2, Sq=20, D=16, dtype=dtype, device=DEV, requires_grad=True)
    oracle.check_against_oracle(tri, q, k, v, score_mod=_mods(2)[name], **kw)


def test_bshd_window():
    q, k, v, kw = oracle.make_inputs("bshd", B=2, Hq=2, Sq=18, Sk=21, D=16, device=DEV, requires_grad=True)
    oracle.check_against_oracle(tri, q, k, v, score_mod=_mods(2)["read_twice"], window=(6, 3), **kw)


@pytest.mark.parametrize(
    "mod",
    [
        lambda H: M.t5_bias(torch.randn(H, 8, device=DEV), 8, 20),
        lambda H: M.t5_bias(torch.randn(H, 8, device=DEV), 8, 20, bidirectional=False),
        lambda H: M.alibi(oracle.alibi_slopes(H, DEV)),
        lambda H: M.relative_bias(torch.randn(H, 11, device=DEV)),
        lambda H: M.compose(M.softcap(3.0), M.relative_bias(torch.randn(7, device=DEV))),
    ],
    ids=["t5", "t5_causal", "alibi", "relative_bias", "compose"],
)
def test_library_mods_sq_ne_sk(mod):
    """Library mods (bottom-right aligned: they read Sk - Sq), Sq != Sk, causal."""
    q, k, v, kw = oracle.make_inputs(B=1, Hq=2, Sq=12, Sk=20, D=16, device=DEV, requires_grad=True)
    oracle.check_against_oracle(tri, q, k, v, score_mod=mod(2), causal=True, **kw)


def test_gqa_thd_ragged():
    tab = torch.randn(2, 9, device=DEV)

    def mod(score, b, h, q_idx, kv_idx):
        return score + tab[h, (kv_idx - q_idx).clamp(-4, 4) + 4] * (b + 1)

    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, Hk=1, D=16, seqlens_q=[5, 0, 19], seqlens_k=[7, 3, 17], device=DEV, requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, score_mod=mod, causal=True, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_softcap_bias(dtype):
    """Causal with Sq > Sk (the first rows see no key), softcap and a bias with its gradient: the pipeline's
    order (softcap, bias, then the mod) and the chain rule through all three."""
    slopes = oracle.alibi_slopes(2, DEV)

    def mod(score, b, h, q_idx, kv_idx):
        return score * 1.5 - slopes[h] * (q_idx - kv_idx).abs()

    q, k, v, kw = oracle.make_inputs(
        B=2, Hq=2, Sq=20, Sk=9, D=16, dtype=dtype, device=DEV, requires_grad=True
    )
    bias = oracle.randn((2, 1, 20, 9), dtype, DEV, requires_grad=True)
    res = oracle.check_against_oracle(tri, q, k, v, bias=bias, score_mod=mod, causal=True, softcap=4.0, **kw)
    assert torch.isneginf(res["lse"][:, :, :11]).all()


def test_mod_masks_with_minus_inf():
    """A mod returning -inf (causal written as a score mod): those keys drop out, forward and backward."""

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx <= q_idx, score, float("-inf"))

    q, k, v, kw = oracle.make_inputs(B=1, Hq=2, Sq=18, D=16, device=DEV, requires_grad=True)
    res = oracle.check_against_oracle(tri, q, k, v, score_mod=mod, **kw)
    assert all(torch.isfinite(t.grad).all() for t in res["inputs"].values() if t is not None)


def _sorting(score, b, h, q_idx, kv_idx):
    return torch.sort(score).values  # unsupported: a reduction over the score (and not elementwise)


def _branching(score, b, h, q_idx, kv_idx):
    if score.max() > 1e9:  # a data-dependent Python branch
        return score * 0.0
    return score


def _erf(score, b, h, q_idx, kv_idx):
    return score + torch.erf(score)  # elementwise, but no lowering rule for it


@pytest.mark.parametrize(
    "mod,what,line",
    [
        (_sorting, "aten::sort", "torch.sort(score)"),
        (_branching, "data-dependent", "if score.max() > 1e9"),
        (_erf, "aten::erf", "torch.erf(score)"),
    ],
)
def test_refusal_names_op_and_line(mod, what, line):
    q, k, v, _ = oracle.make_inputs(B=1, Hq=1, Sq=8, D=16, device=DEV)
    with pytest.raises(attnkit.UnsupportedError) as e:
        tri(q, k, v, score_mod=mod)
    assert what in str(e.value) and line in str(e.value) and "test_score_mod_compile.py" in str(e.value)


@pytest.mark.parametrize("mod", [_branching, _erf])
def test_auto_serves_what_triton_refuses(mod):
    """auto runs the mod on a backend that can (flex on a GPU for erf; not flex for the branch, which it
    cannot vmap). (A reduction such as sort is not an elementwise mod: backends that apply a mod to the score
    matrix and those that apply it per score disagree on it, so it is not compared here.)"""
    q, k, v, _ = oracle.make_inputs(B=1, Hq=1, Sq=8, D=16, device=DEV)
    out = attnkit.attention(q, k, v, score_mod=mod)
    ref = attnkit.attention(q, k, v, score_mod=mod, backend="reference")
    torch.testing.assert_close(out, ref)


def test_flex_refuses_what_it_cannot_vmap():
    """FlexAttention applies a mod under torch.vmap, where a data-dependent branch fails: the flex backends
    refuse it up front, naming the line, instead of raising inside the call."""
    q, k, v, _ = oracle.make_inputs(B=1, Hq=1, Sq=8, D=16, device=DEV)
    call = normalize(q, k, v, score_mod=_branching)
    why = " ".join(dispatch.get("flex").why_not(call))
    assert "vmap" in why and "if score.max() > 1e9" in why, why
    assert not dispatch.get("flex").why_not(normalize(q, k, v, score_mod=_erf))


def check_captured(make, tables, q, k, v, run=tri, **kw):
    """``make(tables) -> score_mod``: ``run``'s (default: the Triton backend's) gradients of q, k, v and of
    every table against the float64 oracle (tables in float64) and the plain-PyTorch baseline
    (``reference_forward`` without upcast), by the oracle rule."""
    from attnkit.backends.reference import reference_forward

    runs = {}
    for name, dt in (("mine", None), ("ref", oracle.F64), ("base", None)):
        qkv = [oracle.clone_leaf(t, dt) for t in (q, k, v)]
        tabs = [oracle.clone_leaf(t, dt if t.is_floating_point() else None) for t in tables]
        mod = make(tabs)
        if name == "mine":
            out = run(*qkv, score_mod=mod, **kw)
        elif name == "ref":
            out, _ = oracle.attention64(*qkv, score_mod=mod, **kw)
        else:
            out, _ = reference_forward(oracle.make_call(*qkv, score_mod=mod, **kw), upcast=False)
        runs[name] = (out, qkv, tabs)
    g = torch.randn(runs["mine"][0].shape, dtype=q.dtype, device=q.device)
    for out, _, _ in runs.values():
        out.backward(g.to(out.dtype))
    terms = float(oracle._row_norms(g).max() * oracle._row_norms(v).max())
    oracle.assert_close(runs["mine"][0], runs["ref"][0], runs["base"][0], dtype=q.dtype, name="out")
    for i, n in enumerate(("q", "k", "v")):
        a, r, b = (runs[x][1][i].grad for x in ("mine", "ref", "base"))
        oracle.assert_close(a, r, b, dtype=q.dtype, name=f"grad {n}", term_scale=terms)
    for i, t in enumerate(tables):
        if t.requires_grad:
            a, r, b = (runs[x][2][i].grad for x in ("mine", "ref", "base"))
            assert a is not None, f"no gradient reached table {i}"
            # (a table entry sums dS over many pairs: their cancellation terms add up)
            scale = terms * q.shape[-2]
            oracle.assert_close(a, r, b, dtype=q.dtype, name=f"grad table {i}", term_scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_captured_grads_read_twice(dtype):
    """Learnable tables: a relative bias read twice (two index expressions), a per-head scale, a per-batch
    bias on even keys; GQA, causal. Gradients by atomic adds in the dK/dV kernel.

    (The per-batch bias is not added to every key: a constant over a whole row leaves the softmax unchanged,
    so its exact gradient is 0 and what a kernel returns is the rounding of dS's row sums, whose size is
    set by O stored in the input dtype (dS = P (dP - rowsum(dO O))), not by anything this test checks.)"""

    def make(t):
        rel, scale, per_b = t

        def mod(score, b, h, q_idx, kv_idx):
            d = (q_idx - kv_idx).clamp(-4, 4) + 4
            x = score * scale[h] + rel[h, d] + 0.5 * rel[h, (kv_idx * 3) % 9]
            return x + torch.where(kv_idx % 2 == 0, torch.tanh(per_b[b, h]), 0.0)

        return mod

    tables = [
        torch.randn(2, 9, device=DEV, requires_grad=True),
        (torch.rand(2, device=DEV) + 0.5).requires_grad_(),
        torch.randn(2, 2, device=DEV, requires_grad=True),
    ]
    q, k, v, kw = oracle.make_inputs(
        B=2, Hq=2, Hk=1, Sq=20, D=16, dtype=dtype, device=DEV, requires_grad=True
    )
    check_captured(make, tables, q, k, v, causal=True, **kw)


@pytest.mark.cuda
def test_flex_learnable_t5_backward_at_head_dim_128():
    """A learnable T5 bias at D=128 bf16: inductor's default flex backward tiles overflow shared memory
    (H200: "No valid triton configs ... out of resource", raised at ``backward()``). The flex backend compiles
    the backward inside the call, retries with smaller tiles, and its gradients match the oracle's."""
    tables = [torch.randn(2, 32, device=DEV, requires_grad=True)]
    q, k, v, kw = oracle.make_inputs(
        B=1, Hq=2, Sq=256, D=128, dtype=torch.bfloat16, device=DEV, requires_grad=True
    )

    def flex(*a, **k2):
        return attnkit.attention(*a, backend="flex", **k2)

    check_captured(lambda t: M.t5_bias(t[0], 32, 128), tables, q, k, v, run=flex, causal=True, **kw)


def test_flex_compiles_its_backward_inside_the_call():
    """With gradients on, a flex call lowers its backward with the forward (so a backward that cannot compile
    fails where the retry is); without gradients it does not."""
    import torch._functorch.config as cfg

    from attnkit.backends import _flex_common

    seen = []

    def fn(q, k, v, **kwargs):
        seen.append(bool(cfg.force_non_lazy_backward_lowering))
        return q

    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    _flex_common.call_flex(fn, q, q, q, False, {})
    with torch.no_grad():
        _flex_common.call_flex(fn, q, q, q, False, {})
    _flex_common.call_flex(fn, q.detach(), q.detach(), q.detach(), False, {})
    assert seen == [True, False, False]
    assert not cfg.force_non_lazy_backward_lowering


@pytest.mark.parametrize("copies", [1, 3])
def test_captured_grads_with_few_copies(copies, monkeypatch):
    """The dK/dV programs add the captured tensors' gradients into copies of the buffer (program index mod
    the copies; ops/bwd.smod_grads): with one copy (the fallback for large tables) and with fewer copies than
    programs, the sums are still right."""
    from attnkit.backends.triton.ops import bwd as _bwd

    assert _bwd.smod_copies(512) == _bwd.SMOD_COPIES and _bwd.smod_copies(1 << 23) == 1
    monkeypatch.setattr(_bwd, "SMOD_COPIES", copies)
    tables = [torch.randn(2, 9, device=DEV, requires_grad=True)]
    q, k, v, kw = oracle.make_inputs(B=2, Hq=2, Sq=40, D=16, device=DEV, requires_grad=True)
    check_captured(lambda t: M.relative_bias(t[0]), tables, q, k, v, causal=True, **kw)


def test_captured_grads_library_thd():
    """Library mods (relative_bias, t5_bias) with learnable tables on ragged thd, Sq != Sk."""
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, D=16, seqlens_q=[5, 0, 19], seqlens_k=[7, 3, 17], device=DEV, requires_grad=True
    )
    t5 = torch.randn(2, 8, device=DEV, requires_grad=True)
    rel = torch.randn(2, 11, device=DEV, requires_grad=True)
    mods = lambda t: M.compose(M.t5_bias(t[0], 8, 20), M.relative_bias(t[1]))  # noqa: E731
    check_captured(mods, [t5, rel], q, k, v, **kw)


def test_with_mask_as_data_and_window():
    """A score mod with a learnable table beside a mask carried as data (documents, causal) and a window."""
    ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [0] * 12 + [1] * 8], device=DEV, dtype=torch.int32)
    mask = masks.document(ids) & masks.causal()

    def make(t):
        return lambda score, b, h, q_idx, kv_idx: score + t[0][b, (q_idx - kv_idx) % 5]

    q, k, v, kw = oracle.make_inputs(B=2, Hq=2, Sq=20, D=16, device=DEV, requires_grad=True)
    table = torch.randn(2, 5, device=DEV, requires_grad=True)
    check_captured(make, [table], q, k, v, mask=mask, window=(9, 0))


def test_too_many_tensors_refused():
    ts = [torch.randn(3, device=DEV) for _ in range(5)]

    def mod(score, b, h, q_idx, kv_idx):
        return score + ts[0][h] + ts[1][h] + ts[2][h] + ts[3][h] + ts[4][h]

    q, k, v, _ = oracle.make_inputs(B=1, Hq=2, Sq=8, D=16, device=DEV)
    with pytest.raises(attnkit.UnsupportedError, match="more than 4 tensors"):
        tri(q, k, v, score_mod=mod)


def test_captured_grad_deterministic_refused():
    """Captured tensors that require grad with deterministic=True: atomic adds, so refused (auto goes on)."""
    table = torch.randn(2, 9, device=DEV, requires_grad=True)
    q, k, v, _ = oracle.make_inputs(B=1, Hq=2, Sq=8, D=16, device=DEV, requires_grad=True)
    with pytest.raises(attnkit.UnsupportedError, match="requires grad.*deterministic"):
        tri(q, k, v, score_mod=M.relative_bias(table), deterministic=True)
    with torch.no_grad():  # no gradient wanted: runs
        out = tri(q, k, v, score_mod=M.relative_bias(table), deterministic=True)
        ref = attnkit.attention(q, k, v, score_mod=M.relative_bias(table), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cache_by_structure_not_values():
    """Two mods of one structure over other tables (other values and lengths) generate one module."""

    def make(table):
        def mod(score, b, h, q_idx, kv_idx):
            return score + table[h, (q_idx - kv_idx).abs() % 5] * 0.75

        return mod

    q, k, v, _ = oracle.make_inputs(B=1, Hq=2, Sq=8, D=16, device=DEV)
    t1, t2 = torch.randn(2, 5, device=DEV), torch.randn(2, 13, device=DEV)[:, ::2]  # (other strides too)
    tri(q, k, v, score_mod=make(t1))
    n = compiler.GENERATED[0]
    out = tri(q, k, v, score_mod=make(t2))
    assert compiler.GENERATED[0] == n
    ref = attnkit.attention(q, k, v, score_mod=make(t2), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    tri(q, k, v, score_mod=make(t2.to(torch.float16)))  # another dtype: another module
    assert compiler.GENERATED[0] == n + 1


def test_numbers_are_code_tensors_are_data():
    """Numbers a mod reads are baked into its code (softcap(2) and softcap(3) differ), tensors are not: the
    compiler's memo keeps no captured tensor alive, and a second mod over a new table reads the new one."""
    import gc
    import weakref

    q, k, v, _ = oracle.make_inputs(B=1, Hq=2, Sq=8, D=16, device=DEV)
    for cap in (2.0, 3.0):
        out = tri(q, k, v, score_mod=M.softcap(cap))
        ref = attnkit.attention(q, k, v, score_mod=M.softcap(cap), backend="reference")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    table = torch.randn(2, 9, device=DEV)
    tri(q, k, v, score_mod=M.relative_bias(table))
    gone = weakref.ref(table)
    del table
    gc.collect()
    assert gone() is None, "the compiler (or the backend) keeps a captured tensor alive"


def _op_mods():
    tab = torch.randn(4, device=DEV)
    ints = torch.tensor([0, 1, 0, 1], dtype=torch.int32, device=DEV)
    flags = torch.tensor([True, False, True, False], device=DEV)
    half = torch.randn(3, 5, device=DEV).to(torch.float16)

    def logic_gather(s, b, h, q, kv):
        hit = torch.logical_and(ints[kv % 4] != 0, flags[q % 4]) | ~(q > kv + 3)
        return torch.where(hit, s * 2, s) + (q > kv) * 1.0 + tab[(q * 3 - kv) // 2 % 4] + half[h, kv % 5]

    def float_math(s, b, h, q, kv):
        x = s**2 / 4 + torch.sqrt(s.abs() + 1) - torch.exp2(s / 8) + torch.maximum(s, torch.zeros_like(s))
        x = x + torch.clamp(s, -1, 1) - torch.remainder(s, 1.5) + torch.sigmoid(s) + torch.log(s * s + 1)
        return x + torch.rsqrt(s * s + 2) + torch.sin(s) * torch.cos(s) - torch.exp(-s.abs()) / (1 + s * s)

    def int_math(s, b, h, q, kv):
        i = torch.floor_divide(q - 7, 3) + (kv - 5) % 3 + torch.div(q - 9, 4, rounding_mode="trunc")
        j = torch.div(kv - 6, 4, rounding_mode="floor") - torch.minimum(q, kv) + torch.clamp(q - kv, min=-2)
        return s * (i + j + b * 7 + h).float() / 8 + (q - kv).abs() / 3

    return [logic_gather, float_math, int_math]


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter's elementwise check (the kernels' tests cover the GPU)")
@pytest.mark.parametrize("which", range(3), ids=["logic_gather", "float_math", "int_math"])
def test_lowering_value_and_derivative(which):
    """The generated function on one 16 x 16 tile (rows q, cols kv) against the mod in eager PyTorch: the
    value, and d(mod)/d(score) against autograd."""
    import triton
    import triton.language as tl

    @triton.jit
    def _eval(S, Y, DY, C0, C1, C2, C3, META, b, h, off, BLOCK: tl.constexpr, FN: tl.constexpr):
        rows = tl.arange(0, BLOCK)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        score = tl.load(S + rows * BLOCK + cols)
        y, dy = FN(score, b, h, rows, cols, off, (C0, C1, C2, C3, META, b, h))
        tl.store(Y + rows * BLOCK + cols, y)
        tl.store(DY + rows * BLOCK + cols, dy)

    mod = _op_mods()[which]
    comp = compiler.compile_score_mod(M.from_score_mod(mod))
    s = torch.randn(16, 16) * 3
    y, dy = torch.empty_like(s), torch.empty_like(s)
    caps = list(comp.tensors) + [s] * (compiler.MAX_TENSORS - len(comp.tensors))
    _eval[(1,)](s, y, dy, *caps, compiler.meta(comp.tensors, "cpu"), 1, 1, 0, BLOCK=16, FN=comp.fn)
    sr = s.clone().requires_grad_()
    q = torch.arange(16, dtype=torch.int32)[:, None]
    kv = torch.arange(16, dtype=torch.int32)[None, :]
    one = torch.tensor(1, dtype=torch.int32)
    ref = mod(sr, one, one, q, kv)
    (dref,) = torch.autograd.grad(ref.sum(), sr)
    torch.testing.assert_close(y, ref.detach().float(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dy, dref, rtol=2e-6, atol=2e-6)


_PTX_SCRIPT = r"""
import importlib, importlib.util, pickle, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TY = {"torch.float16": "*fp16", "torch.bfloat16": "*bf16", "torch.float32": "*fp32", "torch.int32": "*i32",
      "torch.int64": "*i64", "torch.bool": "*i1"}


def dec(v):
    if isinstance(v, tuple) and v[:1] == ("fn",):
        spec = importlib.util.spec_from_file_location("attnkit.compiler.generated.g" + v[2], v[1])
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        return getattr(m, v[2])
    if isinstance(v, tuple) and v[:1] == ("nt",):
        return getattr(importlib.import_module(v[1]), v[2])(*[dec(x) for x in v[3]])
    return v


for mod, name, sig, kw in pickle.load(open(sys.argv[1], "rb")):
    fn = getattr(importlib.import_module(mod), name)
    signature = {fn.arg_names[i]: TY[v] if k == "ptr" else ("i32",) * v if k == "tuple" else k  # (strides)
                 for i, (k, v) in enumerate(sig)}  # fmt: skip
    consts = {}
    for k, v in kw.items():
        if k in ("num_warps", "num_stages"):
            continue
        signature[k] = "constexpr"
        consts[k] = dec(v)
    for p in fn.params:
        if p.name not in signature:
            signature[p.name] = "constexpr"
            consts[p.name] = p.default
    opts = {"num_warps": kw.get("num_warps", 4), "num_stages": kw.get("num_stages", 2)}
    src = ASTSource(fn, signature, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    print(name, consts.get("SMOD_GRAD"), ptx.count("red.global") + ptx.count("atom.global"))
"""


@pytest.mark.skipif(HAS_CUDA, reason="the GPU compiles them for real")
def test_kernels_with_score_mods_compile_for_sm90(monkeypatch, tmp_path):
    """The interpreter forgives what the compiler does not: the kernels a score-mod call launches (forward,
    dK/dV with a captured tensor's gradient, dQ) compiled to PTX for sm_90, offline, in a subprocess
    without the interpreter (Triton's bundled ptxas; no GPU needed)."""
    import os
    import pickle
    import subprocess
    import sys

    from attnkit.backends.triton.runtime import launch

    seen = []
    run = launch.Launch.run

    def capture(self, grid, args, kwargs, stream):
        def kind(a):  # (a tuple: a kernel's strides of one tensor)
            if isinstance(a, torch.Tensor):
                return ("ptr", str(a.dtype))
            if isinstance(a, tuple):
                return ("tuple", len(a))
            return ("i32" if isinstance(a, int) else "fp32", None)

        def enc(v):  # (functions by file and name; named tuples of flags, FEAT / SCHED, field by field)
            if hasattr(v, "fn"):
                return ("fn", v.fn.__code__.co_filename, v.fn.__name__)
            if isinstance(v, tuple) and hasattr(v, "_fields"):
                return ("nt", type(v).__module__, type(v).__name__, tuple(enc(x) for x in v))
            return v

        sig = [kind(a) for a in args]
        kw = {k: enc(v) for k, v in kwargs.items()}
        seen.append((self.fn.fn.__module__, self.fn.fn.__name__, sig, kw))
        return run(self, grid, args, kwargs, stream)

    monkeypatch.setattr(launch.Launch, "run", capture)
    table = torch.randn(2, 9, requires_grad=True)
    q, k, v, kw = oracle.make_inputs(B=1, Hq=2, Sq=20, D=16, dtype=torch.float16, requires_grad=True)
    tri(q, k, v, score_mod=M.relative_bias(table), causal=True).sum().backward()
    assert table.grad is not None and len(seen) == 4
    path = tmp_path / "launches.pkl"
    path.write_bytes(pickle.dumps(seen))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    res = subprocess.run([sys.executable, "-c", _PTX_SCRIPT, str(path)], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr):
        pytest.skip("no ptxas with this Triton")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert set(lines) == {"attn_fwd", "bwd_preprocess", "attn_bwd_dkdv", "attn_bwd_dq"}
    assert lines["attn_bwd_dkdv"].startswith("True") and int(lines["attn_bwd_dkdv"].split()[1]) > 0


# ----------------------------------------------------------------------------------------------------------
# GPU (bf16, native): the lead runs these
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_mods_bf16(name):
    q, k, v, kw = oracle.make_inputs(
        B=2, Hq=4, Hk=2, Sq=300, Sk=333, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    mods = _mods(4, "cuda")
    if name == "dense_bias":
        table = torch.randn(333, 333, device="cuda", dtype=torch.bfloat16)
        mods[name] = lambda s, b, h, q_idx, kv_idx: s + table[q_idx, kv_idx]
    oracle.check_against_oracle(tri, q, k, v, score_mod=mods[name], causal=True, **kw)


@pytest.mark.cuda
def test_cuda_captured_grads_bf16():
    def make(t):
        rel, per_b = t
        return lambda s, b, h, q_idx, kv_idx: s + rel[h, (q_idx - kv_idx).clamp(-64, 64) + 64] * per_b[b]

    tables = [
        torch.randn(4, 129, device="cuda", requires_grad=True),
        torch.rand(2, device="cuda", requires_grad=True),
    ]
    q, k, v, kw = oracle.make_inputs(
        B=2, Hq=4, Hk=2, Sq=300, Sk=333, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    check_captured(make, tables, q, k, v, causal=True, **kw)


@pytest.mark.cuda
def test_cuda_t5_thd_bf16_and_no_recompile():
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=4, Hk=1, D=128, seqlens_q=[100, 1, 257], dtype=torch.bfloat16, device="cuda",
        requires_grad=True,
    )  # fmt: skip
    t5 = M.t5_bias(torch.randn(4, 32, device="cuda"), 32, 128)
    oracle.check_against_oracle(tri, q, k, v, score_mod=t5, **kw)
    n = attnkit.compile_count()
    for _ in range(3):  # new table values: nothing compiles
        mod = M.t5_bias(torch.randn(4, 32, device="cuda"), 32, 128)
        tri(q, k, v, score_mod=mod, **kw).sum().backward()
    assert attnkit.compile_count() == n


# -- masks with no interval lowering ride the compiler: where(mask, s, -inf) ---------------------------------
def _unlowerable_masks(S: int, device=DEV):
    shuffled = torch.tensor([0, 1] * (S // 2), dtype=torch.int32, device=device)  # interleaved documents
    return {
        "mask_mod callable": lambda b, h, q, kv: (q - kv) % 3 != 0,
        "rows hidden (fully masked rows)": masks.from_mask_mod(lambda b, h, q, kv: q >= 5),
        "not causal": ~masks.causal(),
        "causal or window": masks.causal() | masks.sliding_window(2),
        "neighborhood_2d": masks.neighborhood_2d(4, S // 4, 3),
        "interleaved documents": masks.document(shuffled),
    }


@pytest.mark.parametrize("name", list(_unlowerable_masks(24)))
def test_masks_without_intervals_run_compiled(name):
    """A mask the interval lowering refuses is evaluated per element inside the kernels (as the compiled
    score mod ``where(mask, s, -inf)``): forward, lse and gradients against the oracle, bottom-right aligned
    with Sq != Sk where the mask allows it, GQA."""
    mask = _unlowerable_masks(24)[name]
    Sq = 24 if name in ("neighborhood_2d", "interleaved documents") else 20
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=2, Hk=1, Sq=Sq, Sk=24, D=16, dtype=torch.float32, device=DEV, requires_grad=True
    )
    call = attnkit._call.normalize(q, k, v, mask=mask)
    from attnkit.backends.triton import backend as tb

    assert tb._intervals.why_not(call.mask, call) is not None  # (really no interval lowering)
    assert attnkit.dispatch.get("triton").why_not(call) == []
    oracle.check_against_oracle(tri, q, k, v, mask=mask, **kw)


def test_mask_without_intervals_with_a_score_mod_and_thd():
    """The mask applies after the user's score mod (API order), on ragged packed sequences too."""
    table = torch.randn(2, 9, device=DEV)

    def rel(s, b, h, q, kv):
        return s + table[h, (q - kv).clamp(-4, 4) + 4]

    mask = masks.from_mask_mod(lambda b, h, q, kv: (q + kv) % 4 != 1)
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, Hk=2, D=16, dtype=torch.float32, device=DEV, seqlens_q=[7, 0, 13], requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, mask=mask, score_mod=rel, causal=True, **kw)


def test_lowerable_masks_stay_data_and_unlowerable_ops_are_refused():
    from attnkit.backends.triton import backend as tb

    q = torch.randn(1, 2, 16, 16, device=DEV)
    lowered = attnkit._call.normalize(q, q, q, mask=masks.prefix_lm(4))
    assert tb._mask_as_mod(lowered) is lowered  # (carried as intervals, tiles skipped)
    bad = masks.from_mask_mod(lambda b, h, qi, kv: torch.sort(qi.float(), dim=-1).values > kv)
    reasons = attnkit.dispatch.get("triton").why_not(attnkit._call.normalize(q, q, q, mask=bad))
    assert reasons and "as a score mod" in reasons[0] and "sort" in reasons[0], reasons


def test_jit_hooks_are_off_only_around_a_launch_with_a_score_mod():
    """Triton's JIT hooks serialize every constexpr to JSON and fail on the score mod's function (seen on
    the H200 once another library had set one): launches that take a score mod run with the hooks off,
    and get them back after; launches without one leave them alone."""
    triton = pytest.importorskip("triton")
    from attnkit.backends.triton.ops import common

    rt = triton.knobs.runtime
    saved = rt.jit_cache_hook, rt.jit_post_compile_hook

    def hook(*a, **k):
        return None

    rt.jit_cache_hook = rt.jit_post_compile_hook = hook
    try:
        with common.jit_hooks_off(object()):
            assert rt.jit_cache_hook is None and rt.jit_post_compile_hook is None
        assert rt.jit_cache_hook is hook and rt.jit_post_compile_hook is hook
        with common.jit_hooks_off(None):
            assert rt.jit_cache_hook is hook
        with pytest.raises(KeyError), common.jit_hooks_off(object()):
            raise KeyError
        assert rt.jit_post_compile_hook is hook
    finally:
        rt.jit_cache_hook, rt.jit_post_compile_hook = saved


@pytest.mark.cuda
def test_cuda_score_mod_runs_with_a_jit_hook_set():
    """Run 1 on the H200: every compiled score mod failed ("JITFunction is not JSON serializable") once
    another library in the process had set Triton's JIT hooks; a hook set here must not break it, and
    must still see the other launches."""
    import triton

    rt = triton.knobs.runtime
    saved = rt.jit_cache_hook
    rt.jit_cache_hook = lambda *a, **k: None
    try:
        q, k, v, kw = oracle.make_inputs(
            B=1, Hq=2, Hk=2, Sq=130, Sk=130, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
        )
        slopes = torch.rand(2, device="cuda")
        oracle.check_against_oracle(tri, q, k, v, score_mod=M.alibi(slopes), causal=True, **kw)
    finally:
        rt.jit_cache_hook = saved


def test_library_softcap_and_alibi_mods_run_as_the_kernels_flags():
    """``mods.softcap`` / ``mods.alibi`` (and softcap then ALiBi) are the same functions as the kernels'
    softcap and ALiBi code: the triton backend runs them as those flags (no compiled mod; on the H200 the
    compiled softcap mod ran 1.82 ms where the flag path needs no mod code), equal to the oracle, and keeps
    them as mods where the pipeline's order would differ (a softcap mod after a bias)."""
    from attnkit._call import normalize
    from attnkit.backends.triton.backend import _mask_as_mod

    q, k, v, kw = oracle.make_inputs(
        B=2, Hq=4, Hk=2, Sq=40, Sk=52, D=16, dtype=torch.float16, device=DEV, requires_grad=True
    )
    slopes = torch.rand(4, device=DEV)
    for mod in (M.softcap(5.0), M.alibi(slopes), M.compose(M.softcap(5.0), M.alibi(slopes))):
        view = _mask_as_mod(normalize(q, q, q, score_mod=mod))
        assert view.score_mod is None and (view.softcap or view.alibi_slopes is not None), mod
        oracle.check_against_oracle(tri, q, k, v, score_mod=mod, causal=True, **kw)
    bias = torch.randn(40, 52, device=DEV)
    kept = _mask_as_mod(normalize(q, k, v, score_mod=M.softcap(5.0), bias=bias))
    assert kept.score_mod is not None and not kept.softcap
    flipped = _mask_as_mod(normalize(q, q, q, score_mod=M.compose(M.alibi(slopes), M.softcap(5.0))))
    assert flipped.score_mod is not None  # (ALiBi then softcap is not the kernels' order)
