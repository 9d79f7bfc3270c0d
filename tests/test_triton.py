"""The ``triton`` backend against the float64 oracle (tests/oracle.py), forward, lse and gradients.

On a CPU-only machine the kernels run in the Triton interpreter (conftest.py sets ``TRITON_INTERPRET=1``
before Triton is imported) with 16 x 16 tiles, so the small shapes here still span several tiles per
dimension, odd lengths and partial tiles. With a GPU the same tests run compiled, plus bfloat16 and larger
shapes. The interpreter's bf16 ``tl.dot`` is wrong, so bf16 runs on the GPU only.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # before anything imports triton (conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import attnkit  # noqa: E402
import oracle  # noqa: E402
from attnkit.backends.reference import reference_forward  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])
# (Sq, Sk): several 16-row tiles in the interpreter; several 64/128-row tiles on the GPU
SIZES = (300, 413) if HAS_CUDA else (37, 45)
B, HQ = 2, 4

ops = pytest.importorskip("attnkit.backends.triton.ops.attention")


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from attnkit.backends.triton.kernels import fwd as _fwd

    return isinstance(_fwd.attn_fwd, InterpretedFunction)


if not HAS_CUDA and not _interpreted():
    pytest.skip("triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("poison_triton_outputs")  # (conftest.py)
tri = oracle.tri


def _ids(d):
    return str(d).split(".")[-1]


# -- every flag on the dense layout -----------------------------------------------------------------------
CASES = {
    "plain": {},
    "causal": dict(causal=True),
    "causal_sq>sk": dict(causal=True, swap=True),  # Sq > Sk: the top rows see no key (out 0, lse -inf)
    "window": dict(window=(7, 3)),
    "window_left": dict(window=(5, -1)),
    "window_right": dict(window=(-1, 4)),
    "window_causal": dict(window=(6, 2), causal=True),
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi="h"),
    "alibi_b_causal": dict(alibi="bh", causal=True),
    "bias_grad": dict(bias=(B, HQ, "q", "k")),
    "bias_bcast_grad": dict(bias=(1, HQ, 1, "k")),
    "bias_2d": dict(bias=("q", "k"), bias_grad=False),
    "everything_gqa": dict(
        causal=True, window=(9, -1), softcap=3.0, alibi="h", bias=(B, 1, "q", "k"), Hk=2, scale=0.3
    ),
}


def _make_case(case: dict, dtype, requires_grad=True):
    Sq, Sk = SIZES
    if case.get("swap"):
        Sq, Sk = Sk, Sq
    q, k, v, kw = oracle.make_inputs(
        "bhsd",
        B=B,
        Hq=HQ,
        Hk=case.get("Hk", HQ),
        Sq=Sq,
        Sk=Sk,
        D=32,
        Dv=32,
        dtype=dtype,
        device=DEV,
        requires_grad=requires_grad,
    )
    for name in ("causal", "window", "softcap", "scale"):
        if name in case:
            kw[name] = case[name]
    if case.get("alibi") == "h":
        kw["alibi_slopes"] = oracle.alibi_slopes(HQ, DEV)
    elif case.get("alibi") == "bh":
        kw["alibi_slopes"] = torch.rand(B, HQ, device=DEV) * 0.5
    bias = None
    if case.get("bias") == "neginf":
        bias = torch.randn(B, HQ, Sq, Sk, device=DEV)
        bias[:, :, 3:7, :] = float("-inf")  # rows with no visible key
        bias[:, :, 10, ::2] = float("-inf")
    elif case.get("bias") is not None:
        shape = [Sq if d == "q" else Sk if d == "k" else d for d in case["bias"]]
        bias = torch.randn(shape, device=DEV).to(dtype)
        bias.requires_grad_(case.get("bias_grad", True) and requires_grad)
    return q, k, v, bias, kw


@pytest.mark.parametrize("bwd", ["three-loops", "one-loop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("name", list(CASES))
def test_dense_flags(name, dtype, bwd, monkeypatch):
    """Both backward variants on every flag case: the dK/dV loop split by the tile schedule, and dK/dV in
    one masked loop (the default for causal calls only: _tuning.one_loop_dkdv); dQ in its own pass."""
    monkeypatch.setenv("ATTNKIT_TRITON_BWD_LOOP", "one" if bwd == "one-loop" else "three")
    q, k, v, bias, kw = _make_case(CASES[name], dtype)
    oracle.check_against_oracle(tri, q, k, v, bias=bias, **kw)


def test_backward_kernel_choice(monkeypatch):
    from attnkit.backends.triton.runtime import tuning as _tuning

    for var in ("ATTNKIT_TRITON_BWD_LOOP", "ATTNKIT_TRITON_BWD_STREAMS"):
        monkeypatch.delenv(var, raising=False)
    assert _tuning.one_loop_dkdv(False, True)  # causal
    assert not _tuning.one_loop_dkdv(False, False) and not _tuning.one_loop_dkdv(True, True)
    assert _tuning.concurrent_backward(4 * 32 * 4096 * 4096)  # long sequences: dQ beside dK/dV
    assert not _tuning.concurrent_backward(32 * 32 * 512 * 512)  # host-bound: no stream waits
    monkeypatch.setenv("ATTNKIT_TRITON_BWD_STREAMS", "1")
    assert _tuning.concurrent_backward(1)
    monkeypatch.setenv("ATTNKIT_TRITON_BWD_LOOP", "one")
    monkeypatch.setenv("ATTNKIT_TRITON_BWD_STREAMS", "0")
    assert _tuning.one_loop_dkdv(False, False)
    assert not _tuning.concurrent_backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_ids)
def test_rows_masked_by_neginf_bias(dtype):
    """Rows whose every key has bias -inf: out = 0 and lse = -inf, finite gradients (vs the reference)."""
    Sq, Sk = SIZES
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=1, Hq=2, Sq=Sq, Sk=Sk, D=32, dtype=dtype, device=DEV, requires_grad=True
    )
    bias = torch.randn(1, 2, Sq, Sk, device=DEV)
    bias[:, :, 3:7, :] = float("-inf")
    bias[:, :, 10, ::2] = float("-inf")
    out, lse = tri(q, k, v, bias=bias, return_lse=True)
    ref, ref_lse = attnkit.attention(q, k, v, bias=bias, return_lse=True, backend="reference")
    assert torch.isneginf(lse[:, :, 3:7]).all() and torch.isfinite(lse[:, :, 7:]).all()
    assert (out[:, :, 3:7] == 0).all()
    fin = torch.isfinite(ref_lse)
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    torch.testing.assert_close(lse[fin], ref_lse[fin], **tol)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for a, r in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), r.float(), **{k_: 10 * v_ for k_, v_ in tol.items()})


# -- layouts, GQA/MQA, D != Dv, head dims -------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhsd", "bshd", "thd"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("dims", [(32, 32), (24, 40)], ids=["D=Dv", "D24-Dv40"])
def test_layouts_heads_dims(layout, heads, dims):
    Hq, Hk = heads
    D, Dv = dims
    Sq, Sk = SIZES
    lq = [Sq, 0, 1, Sk // 2 + 3] if layout == "thd" else None
    lk = [Sk // 3, 5, 0, Sk] if layout == "thd" else None
    q, k, v, kw = oracle.make_inputs(
        layout,
        B=B,
        Hq=Hq,
        Hk=Hk,
        Sq=Sq,
        Sk=Sk,
        D=D,
        Dv=Dv,
        dtype=torch.float16,
        device=DEV,
        seqlens_q=lq,
        seqlens_k=lk,
        requires_grad=True,
    )
    oracle.check_against_oracle(tri, q, k, v, causal=layout != "bshd", **kw)


@pytest.mark.parametrize("D", [16, 80, 96, 128, 192, 256])
def test_head_dims(D):
    Sq, Sk = (19, 33) if not HAS_CUDA else (257, 300)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=1, Hq=2, Sq=Sq, Sk=Sk, D=D, dtype=dtype, device=DEV, requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, causal=True, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_thd_ragged_all_flags(dtype):
    """Ragged packed batch with empty and one-row sequences, Sq != Sk per sequence, every additive term."""
    lq = [9, 0, 1, 23, 40, 3] if not HAS_CUDA else [300, 0, 1, 129, 64, 77]
    lk = [14, 6, 0, 23, 31, 3] if not HAS_CUDA else [290, 40, 0, 129, 200, 1]
    N, mq, mk = len(lq), max(lq), max(lk)
    q, k, v, kw = oracle.make_inputs(
        "thd",
        Hq=HQ,
        Hk=2,
        D=32,
        Dv=16,
        dtype=dtype,
        device=DEV,
        seqlens_q=lq,
        seqlens_k=lk,
        requires_grad=True,
    )
    bias = torch.randn(N, 1, mq, mk, device=DEV).to(dtype).requires_grad_(True)
    kw.update(causal=True, window=(11, -1), softcap=4.0, alibi_slopes=torch.rand(N, HQ, device=DEV))
    oracle.check_against_oracle(tri, q, k, v, bias=bias, **kw)


def test_thd_max_seqlen_given():
    """max_seqlen larger than the longest sequence (what compiled callers pass) changes nothing."""
    q, k, v, kw = oracle.make_inputs(
        "thd",
        Hq=2,
        D=16,
        dtype=torch.float32,
        device=DEV,
        seqlens_q=[7, 20, 0],
        seqlens_k=[20, 3, 5],
        requires_grad=True,
    )
    kw.update(max_seqlen_q=48, max_seqlen_k=40, causal=True)
    oracle.check_against_oracle(tri, q, k, v, **kw)


# -- lse, dropout, determinism ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_ids)
def test_lse_gradient(dtype):
    """Gradients through lse (e.g. a z-loss) as well as out."""
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=1, Hq=2, Sq=SIZES[1], Sk=SIZES[0], D=32, dtype=dtype, device=DEV, requires_grad=True
    )
    kw["causal"] = True
    _check_lse_gradient(q, k, v, kw, dtype)


def _check_lse_gradient(q, k, v, kw, dtype):
    """A loss through out and lse (rows with no visible key left out of the lse term), every gradient held
    to the oracle."""
    leaves = [q, k, v]
    mine = [oracle.clone_leaf(t) for t in leaves]
    ref = [oracle.clone_leaf(t, torch.float64) for t in leaves]
    base = [oracle.clone_leaf(t) for t in leaves]
    out, lse = tri(*mine, return_lse=True, **kw)
    out64, lse64 = oracle.attention64(*ref, **kw)
    outb, lseb = reference_forward(oracle.make_call(*base, return_lse=True, **kw), upcast=False)
    g = torch.randn_like(out)
    w = torch.randn_like(lse)

    def loss(o, lse_):
        fin = torch.isfinite(lse_)
        return (o * g.to(o.dtype)).sum() + (torch.where(fin, lse_, 0.0) * w.to(lse_.dtype)).sum()

    loss(out, lse).backward()
    loss(out64, lse64).backward()
    loss(outb, lseb).backward()
    for a, r, b_, n in zip(mine, ref, base, "qkv"):
        oracle.assert_close(a.grad, r.grad, b_.grad, dtype=dtype, name=f"grad {n}")


def _dropout_keep_dense(rng, Bn, Hq, Sq, Sk, p):
    return torch.stack([ops.dropout_keep_mask(rng, b, Hq, 0, Hq, 0, Sq, Sk, p) for b in range(Bn)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_ids)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout(dtype, causal, seed):
    p = 0.3
    Sq, Sk = SIZES
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=B, Hq=HQ, Hk=2, Sq=Sq, Sk=Sk, D=32, dtype=dtype, device=DEV, requires_grad=True
    )
    kw.update(causal=causal, dropout_p=p)
    bias = torch.randn(1, HQ, 1, Sk, device=DEV, dtype=dtype, requires_grad=True)
    torch.manual_seed(seed + 1)
    out = tri(q, k, v, bias=bias, **kw)
    torch.manual_seed(seed + 1)
    rng = ops.draw_rng(q.device)  # the state the call drew: replay it
    keep = _dropout_keep_dense(rng, B, HQ, Sq, Sk, p)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, f"keep fraction {frac:.3f}, expected {1 - p}"

    ref = [oracle.clone_leaf(t, torch.float64) for t in (q, k, v, bias)]
    base = [oracle.clone_leaf(t) for t in (q, k, v, bias)]
    out64, _ = oracle.attention64(*ref[:3], bias=ref[3], keep=keep, **kw)
    call = oracle.make_call(*base[:3], bias=base[3], **kw)
    outb, _ = reference_forward(call, upcast=False, dropout_keep=ops.dropout_keep_fn(rng, HQ, p))
    oracle.assert_close(out, out64, outb, dtype=dtype, name="out")
    g = torch.randn_like(out)
    out.backward(g)
    out64.backward(g.to(torch.float64))
    outb.backward(g)
    for a, r, b_, n in zip((q, k, v, bias), ref, base, ("q", "k", "v", "bias")):
        oracle.assert_close(a.grad, r.grad, b_.grad, dtype=dtype, name=f"grad {n}")

    torch.manual_seed(seed + 1)
    again = tri(q, k, v, bias=bias, **kw)
    assert torch.equal(again, out), "same seed, different dropout mask"
    assert not torch.equal(tri(q, k, v, bias=bias, **kw), out), "a new call must draw a new mask"


@pytest.mark.parametrize("name", ["causal", "everything_gqa"])
def test_deterministic_path_matches_oracle(name):
    """deterministic=True takes the separate dQ pass (no atomics): held to the same oracle rule as the
    non-deterministic kernels."""
    q, k, v, bias, kw = _make_case(CASES[name], torch.float16)
    oracle.check_against_oracle(tri, q, k, v, bias=bias, deterministic=True, **kw)


def test_deterministic_backward():
    q, k, v, kw = oracle.make_inputs(
        "bhsd",
        B=B,
        Hq=HQ,
        Hk=1,
        Sq=SIZES[0],
        Sk=SIZES[1],
        D=32,
        dtype=torch.float16,
        device=DEV,
        requires_grad=True,
    )
    bias = torch.randn(B, HQ, SIZES[0], SIZES[1], device=DEV, dtype=torch.float16, requires_grad=True)
    grads = []
    for _ in range(2):
        out = tri(q, k, v, bias=bias, causal=True, deterministic=True, **kw)
        grads.append(torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out)))
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)


# -- selection, refusal, torch integration -------------------------------------------------------------------
def test_refuses_what_it_cannot_do():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=8, D=16, device=DEV)
    with pytest.raises(attnkit.UnsupportedError, match="score_mod op aten::sort"):  # (s * 2 compiles)
        tri(q, k, v, score_mod=lambda s, b, h, i, j: torch.sort(s).values)
    with pytest.raises(attnkit.UnsupportedError, match="as a score mod: score_mod op aten::sort"):
        tri(q, k, v, mask=lambda b, h, i, j: torch.sort(i.float(), dim=-1).values > j)
    with pytest.raises(attnkit.UnsupportedError, match="float64"):
        tri(q.double(), k.double(), v.double())
    with pytest.raises(attnkit.UnsupportedError, match="alibi_slopes"):
        tri(q, k, v, alibi_slopes=torch.ones(2, device=DEV, requires_grad=True))
    report = str(attnkit.explain(q, k, v, mask=lambda b, h, i, j: i >= j))
    assert "triton" in report


def test_native_masks_run_on_triton():
    """Masks that normalize into flags (causal, sliding window) are served by the kernels."""
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=SIZES[0], Sk=SIZES[0], D=16, device=DEV)
    out = tri(q, k, v, mask=attnkit.masks.sliding_window(5))
    ref = attnkit.attention(q, k, v, window=(5, 0), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_auto_never_picks_the_interpreter():
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=8, D=16)
    assert attnkit.explain(q, k, v).chosen != "triton"


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_unavailable_on_cpu_without_interpreter():
    code = (
        "import attnkit; r = {b.name: b for b in attnkit.backends()}['triton']; print(r.available, r.reason)"
    )
    env = {k_: v_ for k_, v_ in os.environ.items() if k_ != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("False") and "TRITON_INTERPRET" in res.stdout, res.stdout + res.stderr


def test_eager_calls_skip_the_op():
    """Eager calls run the autograd.Function (no op dispatch: host time); traced ones the op (see below)."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=20, D=16, dtype=torch.float16, device=DEV)
    q.requires_grad_(True)
    out = tri(q, k, v, causal=True)
    assert type(out.grad_fn).__name__.startswith("_EagerAttention")
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda q, k, v: tri(q, k, v, causal=True))(q.detach(), k, v)
    assert "attnkit.triton_fwd" in str(graph.code)


def test_compile_fullgraph():
    """torch.compile traces through the custom ops (fake impls + autograd) without graph breaks."""
    q, k, v, _ = oracle.make_inputs(
        "bhsd",
        B=1,
        Hq=2,
        Hk=1,
        Sq=SIZES[0],
        Sk=SIZES[1],
        D=32,
        dtype=torch.float16,
        device=DEV,
        requires_grad=True,
    )

    def f(q, k, v):
        out, lse = attnkit.attention(q, k, v, causal=True, softcap=5.0, backend="triton", return_lse=True)
        return out.float().sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    g_eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    g_comp = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b_ in zip(g_eager, g_comp):
        torch.testing.assert_close(a, b_)


@pytest.mark.cuda
def test_cuda_graph_capture():
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=4, Sq=256, D=64, dtype=torch.bfloat16, device="cuda")
    out = tri(q, k, v, causal=True, dropout_p=0.1)  # warm-up: compile and tune outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        tri(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tri(q, k, v, causal=True)
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, tri(q, k, v, causal=True))


@pytest.mark.cuda
def test_backward_side_stream(monkeypatch):
    """dQ on a side stream (the default) gives the bits of serial launches, eagerly and in a captured
    CUDA graph of forward + backward replayed on new inputs."""
    q, k, v, _ = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Sq=384, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    do = torch.randn_like(q)

    def grads():
        return torch.autograd.grad(tri(q, k, v, causal=True), (q, k, v), do)

    monkeypatch.setenv("ATTNKIT_TRITON_BWD_STREAMS", "0")
    serial = grads()
    monkeypatch.setenv("ATTNKIT_TRITON_BWD_STREAMS", "1")
    for got, want in zip(grads(), serial):
        assert torch.equal(got, want)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        grads()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = grads()
    with torch.no_grad():
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
    g.replay()
    torch.cuda.synchronize()
    monkeypatch.setenv("ATTNKIT_TRITON_BWD_STREAMS", "0")
    for got, want in zip(captured, grads()):
        assert torch.equal(got, want)


@pytest.mark.cuda
def test_new_lengths_do_not_recompile():
    from attnkit.backends.triton.kernels import fwd as _fwd

    def run(lens):
        q, k, v, kw = oracle.make_inputs(
            "thd", Hq=2, D=64, dtype=torch.bfloat16, device="cuda", seqlens_q=lens
        )
        tri(q, k, v, causal=True, **kw)

    run([100, 37, 250])
    caches = getattr(_fwd.attn_fwd, "device_caches", None)
    if caches is None:
        pytest.skip("this triton has no device_caches to count")
    before = sum(len(c[0]) for c in caches.values())
    run([17, 333, 1, 64])
    run([511])
    after = sum(len(c[0]) for c in caches.values())
    assert after == before, f"{after - before} new compilations for new sequence lengths"


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_larger_bf16(causal):
    q, k, v, kw = oracle.make_inputs(
        "bshd",
        B=2,
        Hq=8,
        Hk=2,
        Sq=1024,
        Sk=1024,
        D=128,
        dtype=torch.bfloat16,
        device="cuda",
        requires_grad=True,
    )
    oracle.check_against_oracle(tri, q, k, v, causal=causal, **kw)


# -- the Hopper Gluon forward (plain calls on sm_90) --------------------------------------------------------
def _hopper() -> bool:
    return HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture
def gluon_calls(monkeypatch):
    """A list that grows by one each time the Gluon forward runs (the test skips off Hopper)."""
    if not _hopper():
        pytest.skip("the Gluon forward needs sm_90")
    gluon = ops._gluon()
    calls, real = [], gluon.try_forward
    monkeypatch.setattr(ops, "REPLAY", False)  # a replayed call would not ask try_forward

    def counted(*a, **k):  # counts the calls the Gluon kernel ran
        res = real(*a, **k)
        calls.extend([1] if res is not None else [])
        return res

    monkeypatch.setattr(gluon, "try_forward", counted)
    return calls


@pytest.mark.cuda
@pytest.mark.parametrize(
    "layout,Hq,Hk,Sq,Sk,D,causal",
    [
        ("bhsd", 4, 4, 256, 256, 128, False),
        ("bshd", 4, 2, 200, 1152, 64, False),  # GQA, Sq != Sk, a partial query tile
        ("bhsd", 2, 2, 384, 128, 128, True),  # Sq > Sk: the top rows see no key
        ("bshd", 6, 3, 333, 512, 128, True),
        ("bhsd", 2, 1, 1000, 1024, 128, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_ids)
def test_gluon_forward_against_oracle(gluon_calls, layout, Hq, Hk, Sq, Sk, D, causal, dtype):
    """The plain-call forward takes the Gluon kernel on Hopper (counted), then the Triton backward: both
    held to the oracle, with gradients."""
    q, k, v, kw = oracle.make_inputs(
        layout, B=2, Hq=Hq, Hk=Hk, Sq=Sq, Sk=Sk, D=D, dtype=dtype, device="cuda", requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, causal=causal, **kw)
    assert gluon_calls, "the Gluon forward was not used"


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [(128, 2, True, True), (64, 2, True, False), (128, 2, False, False)], ids=str)
@pytest.mark.parametrize(
    "layout,Hq,Hk,Sq,Sk,D,causal",
    [
        ("bhsd", 4, 2, 640, 512, 64, True),  # Sq > Sk: items whose rows see no key, amid full ones
        ("bhsd", 4, 2, 640, 512, 64, False),
        ("bshd", 3, 3, 200, 1024, 128, True),  # a partial last query tile; items of 1 to 8 key tiles
    ],
)
def test_gluon_persistent_forward(gluon_calls, monkeypatch, cfg, layout, Hq, Hk, Sq, Sk, D, causal):
    """A persistent launch of 3 CTAs (each streams many items of different lengths through one ring and
    both Q buffers) writes the same bits as one item per CTA; through the library (Triton backward),
    held to the oracle, with gradients."""
    gluon = ops._gluon()
    q, k, v, kw = oracle.make_inputs(
        layout, B=2, Hq=Hq, Hk=Hk, Sq=Sq, Sk=Sk, D=D, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    scale = D**-0.5
    with torch.no_grad():
        one = gluon.gluon_forward(q, k, v, layout, scale, causal, cfg=cfg + (False,))
        monkeypatch.setattr(gluon, "PERSISTENT_CTAS", 3)
        many = gluon.gluon_forward(q, k, v, layout, scale, causal, cfg=cfg + (True,))
    for name, a, b in zip(("out", "lse", "stats"), one, many):
        diff = (a.float() - b.float()).abs().nan_to_num()
        assert torch.equal(a, b), (name, diff.max().item(), (diff > 0).sum().item(), a.numel())
    with pytest.raises(ValueError, match="PERSISTENT with SPLIT needs OVERLAP"):  # (wrong rows seen)
        gluon.gluon_forward(q, k, v, layout, scale, causal, cfg=(128, 2, False, True, True))
    monkeypatch.setattr(gluon, "default_cfg", lambda *a: cfg + (True,))
    from attnkit.backends.triton.runtime import capability

    monkeypatch.setattr(capability, "gluon_forward_eligible", lambda *a: True)  # (D=64 causal too)
    oracle.check_against_oracle(tri, q, k, v, causal=causal, **kw)
    assert gluon_calls, "the Gluon forward was not used"


@pytest.mark.cuda
def test_gluon_forward_off_switch_and_fallbacks(gluon_calls, monkeypatch):
    """ATTNKIT_TRITON_GLUON=0, and calls it does not take (a softcap, Sk not a multiple of 64, head dim 64
    with a causal mask), go to the plain-Triton forward."""
    q, k, v, kw = oracle.make_inputs("bhsd", Hq=2, Sq=256, D=128, dtype=torch.bfloat16, device="cuda")
    tri(q, k, v, softcap=5.0, **kw)
    q2, k2, v2, kw2 = oracle.make_inputs("bhsd", Hq=2, Sq=200, D=128, dtype=torch.bfloat16, device="cuda")
    tri(q2, k2, v2, **kw2)
    q3, k3, v3, kw3 = oracle.make_inputs("bhsd", Hq=2, Sq=2048, D=64, dtype=torch.bfloat16, device="cuda")
    tri(q3, k3, v3, causal=True, **kw3)
    assert not gluon_calls
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON", "0")
    oracle.check_against_oracle(tri, q, k, v, **kw)  # the plain-Triton forward, held to the oracle
    assert not gluon_calls
    monkeypatch.delenv("ATTNKIT_TRITON_GLUON")
    tri(q, k, v, **kw)
    assert len(gluon_calls) == 1


# -- the Hopper Gluon dK/dV backward (plain calls on sm_90) --------------------------------------------------
@pytest.fixture
def gluon_bwd_calls(monkeypatch):
    """A list that grows by one each time the Gluon dK/dV kernel runs (the test skips off Hopper): whether
    that launch also added dQ."""
    if not _hopper():
        pytest.skip("the Gluon backward needs sm_90")
    gluon = ops._gluon("bwd")
    calls, real = [], gluon.launch_dkdv
    monkeypatch.setattr(ops, "REPLAY", False)  # a replayed call would not ask launch_dkdv

    def counted(*a, **k):
        calls.append(k.get("dqa") is not None)
        return real(*a, **k)

    monkeypatch.setattr(gluon, "launch_dkdv", counted)
    return calls


@pytest.mark.cuda
@pytest.mark.parametrize(
    "layout,Hq,Hk,Sq,Sk,D,causal",
    [
        ("bhsd", 4, 4, 256, 256, 128, False),
        ("bhsd", 4, 4, 256, 256, 128, True),
        ("bshd", 4, 2, 200, 1152, 64, False),  # GQA, Sq != Sk, a partial query tile
        ("bshd", 4, 1, 200, 330, 64, True),  # MQA, Sk not a multiple of the 128-key tile
        ("bhsd", 2, 2, 384, 128, 128, True),  # Sq > Sk: the top rows see no key
        ("bshd", 6, 3, 333, 512, 128, True),  # Sq % 4 != 0: the dQ pass even when fused is asked for
        ("bshd", 6, 3, 332, 512, 128, True),  # a partial last query tile, Sq % 4 == 0
        ("bhsd", 2, 1, 1000, 1024, 128, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_ids)
@pytest.mark.parametrize("dq", ["pass", "fused"])
def test_gluon_backward_against_oracle(
    gluon_bwd_calls, monkeypatch, dq, layout, Hq, Hk, Sq, Sk, D, causal, dtype
):
    """Plain calls with gradients take the Gluon dK/dV kernel on Hopper (counted), next to the Triton dQ
    pass or adding dQ itself (ATTNKIT_TRITON_GLUON_DQ forces either, but the fused path needs Sq % 4 == 0);
    every gradient held to the oracle."""
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON_DQ", "1" if dq == "fused" else "0")
    q, k, v, kw = oracle.make_inputs(
        layout, B=2, Hq=Hq, Hk=Hk, Sq=Sq, Sk=Sk, D=D, dtype=dtype, device="cuda", requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, causal=causal, **kw)
    assert gluon_bwd_calls == [dq == "fused" and Sq % 4 == 0], "not the dQ path asked for"


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
def test_gluon_backward_deterministic_takes_the_dq_pass(gluon_bwd_calls, monkeypatch, D):
    """``deterministic=True`` never takes the fused dQ (its reduce-adds land in any order), even forced, and
    two runs give the same bits; the default takes it at the head dims of FUSED_DQ_HEAD_DIMS from
    FUSED_DQ_MIN_LEN rows on."""
    from attnkit.backends.triton.runtime import capability

    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Sq=1000, Sk=1000, D=D, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    g = torch.randn_like(q)
    grads = []
    for forced in (None, "1"):
        if forced:
            monkeypatch.setenv("ATTNKIT_TRITON_GLUON_DQ", forced)
        for _ in range(2):
            q.grad = k.grad = v.grad = None
            tri(q, k, v, causal=True, deterministic=True, **kw).backward(g)
            grads.append([t.grad.clone() for t in (q, k, v)])
    assert gluon_bwd_calls == [False] * 4
    assert all(torch.equal(a, b) for other in grads[1:] for a, b in zip(grads[0], other))
    monkeypatch.delenv("ATTNKIT_TRITON_GLUON_DQ")
    gluon_bwd_calls.clear()
    tri(q, k, v, causal=True, **kw).backward(g)
    assert gluon_bwd_calls == [False]  # (1000 rows: below FUSED_DQ_MIN_LEN)
    n = capability.FUSED_DQ_MIN_LEN
    assert capability.gluon_fused_dq(64, n, n, False) and not capability.gluon_fused_dq(64, n, n, True)
    assert not capability.gluon_fused_dq(64, n - 4, n, False)
    assert not capability.gluon_fused_dq(64, n + 2, n, False)  # (Sq % 4 != 0)
    assert not capability.gluon_fused_dq(128, n, n, False)


@pytest.mark.cuda
@pytest.mark.parametrize("dq", ["0", "1"])
def test_gluon_backward_lse_gradient(gluon_bwd_calls, monkeypatch, dq):
    """A loss through lse as well as out (delta = rowsum(dO * O) - dLSE) on the Gluon dK/dV kernel, with the
    dQ pass and with dQ fused."""
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON_DQ", dq)
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Sq=300, Sk=384, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    kw["causal"] = True
    _check_lse_gradient(q, k, v, kw, torch.bfloat16)
    assert gluon_bwd_calls


@pytest.mark.cuda
def test_gluon_backward_off_switches_and_fallbacks(gluon_bwd_calls, monkeypatch):
    """ATTNKIT_TRITON_GLUON_BWD=0 (or ATTNKIT_TRITON_GLUON=0), and calls it does not take (a softcap, a
    window, float32, head dim 96), run the Triton dK/dV kernel, held to the oracle."""
    q, k, v, kw = oracle.make_inputs(
        "bhsd", Hq=2, Sq=256, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    tri(q, k, v, softcap=5.0, **kw).sum().backward()
    tri(q, k, v, window=(32, 0), **kw).sum().backward()
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    tri(q32, k32, v32, **kw).sum().backward()
    q96, k96, v96, kw96 = oracle.make_inputs(
        "bhsd", Hq=2, Sq=256, D=96, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    tri(q96, k96, v96, **kw96).sum().backward()
    assert not gluon_bwd_calls
    for var in ("ATTNKIT_TRITON_GLUON_BWD", "ATTNKIT_TRITON_GLUON"):
        monkeypatch.setenv(var, "0")
        oracle.check_against_oracle(tri, q, k, v, causal=True, **kw)
        assert not gluon_bwd_calls
        monkeypatch.delenv(var)
    tri(q, k, v, **kw).sum().backward()
    assert len(gluon_bwd_calls) == 1


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_fitting_default_fits_shared_memory(kind, D, monkeypatch):
    """Without the autotuner (ATTNKIT_TRITON_AUTOTUNE=0, capture, compile) the tiles must still fit: the
    shipped 16-bit defaults where they fit an H200's 227 KiB, smaller tiles for float32 or smaller GPUs."""
    from attnkit.backends.triton.runtime import tuning as _tuning

    dev = torch.device("cuda", 0)
    for limit in (232448, 166912, 101376):  # H100/H200, A100, consumer Ampere/Ada
        monkeypatch.setattr(_tuning, "_smem_limit", lambda device, limit=limit: limit)
        for dtype in (torch.bfloat16, torch.float32):
            cfg = _tuning.fitting_default(kind, D, D, dtype, dev)
            elem = 2 if dtype == torch.bfloat16 else 4
            assert _tuning._smem_estimate(kind, cfg, D, D, elem) <= limit, (limit, dtype, cfg)
            if limit == 232448 and dtype == torch.bfloat16:
                assert cfg == _tuning.default_config(kind, D, D)


@pytest.mark.cuda
def test_float32_head_dim_128_without_autotune(monkeypatch):
    """The shipped tiles are sized for 16-bit inputs; float32 with the autotuner off must still launch."""
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "0")
    q, k, v, kw = oracle.make_inputs(
        "bhsd", Hq=2, Sq=200, D=128, dtype=torch.float32, device="cuda", requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, causal=True, **kw)


def test_autotune_cache_persists_across_processes_and_buckets(tmp_path, monkeypatch):
    """The autotuner's results: keyed by power-of-two length buckets (new lengths in a tuned bucket tune
    nothing), written to $ATTNKIT_CACHE_DIR/triton_autotune.json merged with what other processes wrote,
    and read back by a new process (here: the in-memory state cleared)."""
    import json

    import triton.testing

    from attnkit.backends.triton.runtime import tuning as _tuning

    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(_tuning, "_memory", {})
    monkeypatch.setattr(_tuning, "_disk_loaded", False)
    monkeypatch.setattr(_tuning, "fitting_default", lambda *a: (128, 64, 4, 3))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    benched = []

    def bench(fn, **kw):  # the candidate (64, 64, 4, 3) is the fastest
        fn()
        return 1.0 if benched[-1] == (64, 64, 4, 3) else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", bench)
    other = {"Other GPU|fwd|D64|Dv64|float16|()|128x128": [32, 32, 4, 2]}  # another process's result
    (tmp_path / "triton_autotune.json").write_text(json.dumps(other))
    dev = torch.device("cuda", 0)
    flags = (False,) * 7

    def pick(Sq, Sk):
        return _tuning._pick("fwd", 64, 64, torch.float16, flags, Sq, Sk, dev, benched.append)

    assert pick(300, 300) == (64, 64, 4, 3) and benched
    n = len(benched)
    assert pick(257, 512) == (64, 64, 4, 3) and len(benched) == n  # same buckets: no tuning
    assert pick(600, 300) == (64, 64, 4, 3) and len(benched) > n  # another bucket tunes
    on_disk = json.loads((tmp_path / "triton_autotune.json").read_text())
    assert set(other) < set(on_disk) and len(on_disk) == 3
    monkeypatch.setattr(_tuning, "_memory", {})  # a new process
    monkeypatch.setattr(_tuning, "_disk_loaded", False)
    n = len(benched)
    assert pick(400, 500) == (64, 64, 4, 3) and len(benched) == n
