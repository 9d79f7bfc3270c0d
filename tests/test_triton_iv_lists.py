"""Masks as data, listed (``ATTNKIT_TRITON_IV_LIST``, on by default): the forward visits per query tile a list
of partial key tiles and a list of full ones (``kernels/ivlists.py``, ``ops/ivlists.py``).

* the lists against the dense mask: every tile with a visible element is listed once, and every tile listed
  full has all of its elements visible and inside the keys;
* the listed forward (and the backward after it) against the float64 oracle over the lowerable masks, with and
  without flags, Sq != Sk, GQA, fully masked rows; ``thd`` takes the classified loop;
* on the GPU, bf16 at the default tiles.

Interpreter on the CPU (fp16/fp32, tiny shapes, forced small tiles so that every dimension has several)."""

from __future__ import annotations

import pytest
import torch

import oracle
from attnkit import masks as M

pytest.importorskip("triton")
from attnkit.backends.triton.ops import ivlists  # noqa: E402
from test_triton_iv_body import CASES, _flashmask, _force, _ids  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poison_triton_outputs")  # (conftest.py)
tri = oracle.tri


def _record(monkeypatch) -> list:
    """Turn the lists on and keep each (lists, counts, BM, BN, transposed) the kernels build."""
    monkeypatch.setenv("ATTNKIT_TRITON_IV_LIST", "1")
    seen = []
    real = ivlists.lists

    def lists(p, BM, BN, transposed=False):
        got = real(p, BM, BN, transposed)
        if got is not None:
            seen.append((got[0].cpu(), got[1].cpu(), BM, BN, transposed))
        return got

    monkeypatch.setattr(ivlists, "lists", lists)
    return seen


def _visible(mask, B, H, Sq, Sk, causal=False, window=None) -> torch.Tensor:
    """(B, H, Sq, Sk) bool on the CPU: the mask and the flags (the oracle's definition)."""
    mod = mask.bind(Sq, Sk)
    return oracle.visibility(B, H, Sq, Sk, causal=causal, window=window, mask_mod=mod, device=DEV).cpu()


def _check_lists(seen, vis, backward=True):
    """The last lists of each orientation against ``vis`` (B, H, Sq, Sk): each row's (query tile's, or
    transposed key tile's) tiles listed once; full ones all visible and inside; unlisted ones hidden.
    ``backward``: the dK/dV (transposed) lists were built too."""
    kinds = {t: x for x in seen for t in (x[4],)}
    assert set(kinds) == ({False, True} if backward else {False}), f"lists built: {sorted(kinds)}"
    B, H, Sq, Sk = vis.shape
    for lst, cnt, BM, BN, transposed in kinds.values():
        grid = vis.transpose(2, 3) if transposed else vis  # (rows of the lists, their tiles' axis)
        R, T = (BN, BM) if transposed else (BM, BN)
        n_other = grid.shape[3]
        for b in range(B):
            for h in range(H):
                L, C = lst[b % lst.shape[0], h % lst.shape[1]], cnt[b % cnt.shape[0], h % cnt.shape[1]]
                for m in range(L.shape[0]):
                    part = L[m, 0, : C[m, 0]].tolist()
                    full = L[m, 1, : C[m, 1]].tolist()
                    assert len(set(part + full)) == len(part) + len(full), (b, h, m, part, full)
                    rows = grid[b, h, m * R : (m + 1) * R]
                    for t in range(0, n_other, T):
                        tile = rows[:, t : t + T]
                        if t in full:
                            assert t + T <= n_other and bool(tile.all()), (transposed, b, h, m, t)
                        elif t not in part:
                            assert not bool(tile.any()), (transposed, b, h, m, t, "visible, unlisted")


@pytest.mark.parametrize("name", list(CASES))
def test_lists_and_forward_against_oracle(name, monkeypatch):
    seen = _record(monkeypatch)
    _force(monkeypatch, 16, 32)  # (a key tile over two summary entries)
    make, flags = CASES[name]
    S = 80
    dtype = torch.float32 if "flag" in name else torch.float16
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=2, Hk=1, Sq=S, Sk=S, D=16, dtype=dtype, device=DEV, requires_grad=True
    )
    mask = make(2, S, S)
    oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
    _check_lists(seen, _visible(mask, 2, 2, S, S, flags.get("causal", False), flags.get("window")))


@pytest.mark.parametrize("Sq,Sk", [(40, 96), (96, 40)])
def test_sq_ne_sk_and_fully_masked_rows(Sq, Sk, monkeypatch):
    """Bottom-right alignment; with Sq > Sk and causal the first Sq - Sk rows see nothing (out 0, lse
    -inf)."""
    seen = _record(monkeypatch)
    _force(monkeypatch, 32, 16)
    q, k, v, kw = oracle.make_inputs(
        "bshd", B=1, Hq=4, Hk=2, Sq=Sq, Sk=Sk, D=16, device=DEV, requires_grad=True
    )
    for mask, flags in ((M.prefix_lm(30), {}), (M.global_sliding(3, 30, 4), {"causal": True})):
        res = oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
        _check_lists(seen, _visible(mask, 1, 4, Sq, Sk, flags.get("causal", False)))
        if Sq > Sk and flags:
            assert torch.isneginf(res["lse"][..., : Sq - Sk]).all()


def test_thd_takes_the_classified_loop(monkeypatch):
    seen = _record(monkeypatch)
    _force(monkeypatch, 16, 32)
    lq = [37, 3, 50]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, Hk=1, D=16, seqlens_q=lq, device=DEV, requires_grad=True, dtype=torch.float16
    )
    mask = M.document(_ids(len(lq), max(lq), 3, 4)) & M.causal()
    oracle.check_against_oracle(tri, q, k, v, mask=mask, **kw)
    assert not seen


def test_new_mask_data_new_lists(monkeypatch):
    """The lists are memoized per summary tensor and its version: new data of the same shape gives new lists
    (an in-place change of the mask's tensor too)."""
    seen = _record(monkeypatch)
    _force(monkeypatch, 16, 16)
    S = 64
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=S, D=16, device=DEV)
    prefix = torch.tensor([8], device=DEV)
    mask = M.prefix_lm(prefix) & M.causal()
    for n in (8, 40):
        prefix.fill_(n)
        oracle.check_against_oracle(tri, q, k, v, mask=mask, **kw)
        _check_lists(seen, _visible(mask, 1, 2, S, S), backward=False)


# -- natively, at the tuned tile shapes --------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_bf16_lists(D, monkeypatch):
    seen = _record(monkeypatch)
    S = 1000
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Hk=2, Sq=S, Sk=S, D=D, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    for name in ("document_causal", "prefix_lm", "shared_prefix", "global_sliding+causal_flag"):
        make, flags = CASES[name]
        mask = make(2, S, S)
        oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
        _check_lists(seen, _visible(mask, 2, 4, S, S, flags.get("causal", False), flags.get("window")))


# -- the Hopper Gluon forward on the same lists (``ops/gluon_fwd.try_listed``) -----------------------------
def _gluon_cases(B, S):
    """(name, mask, flags, on Gluon) at Sq = Sk = S (a multiple of 128): every kind of interval and flag; the
    ones with a left window bound (sliding windows) stay on the listed Triton kernel
    (``capability.gluon_listed_eligible``)."""
    third = S // 3
    causal = {"causal": True}
    return [
        ("prefix_lm", M.prefix_lm(S // 5), {}, True),
        ("prefix_lm+causal_flag", M.prefix_lm(torch.tensor([S // 5, 3 * S // 4], device=DEV)), causal, True),
        ("document_causal", M.document(_ids(B, S, 5, 1)) & M.causal(), {}, True),
        ("document+right_window", M.document(_ids(B, S, 3, 2)), {"window": (-1, 40)}, True),
        ("shared_prefix", M.shared_prefix(third, [third // 2, third, S - 5 * third // 2 - 7]), {}, True),
        ("flashmask", _flashmask(S, 3), {}, True),
        ("document+window_flag", M.document(_ids(B, S, 3, 2)), {"window": (300, 40)}, False),
        ("global_sliding+causal_flag", M.global_sliding(4, 300, 8), causal, False),
    ]


def _record_gluon(monkeypatch) -> list:
    """Keep whether each forward ran the Gluon listed kernel (try_listed gave its outputs)."""
    from attnkit.backends.triton.ops import gluon_fwd

    ran = []
    real = gluon_fwd.try_listed

    def try_listed(*a, **kw):
        got = real(*a, **kw)
        ran.append(got is not None)
        return got

    monkeypatch.setattr(gluon_fwd, "try_listed", try_listed)
    return ran


def _record_gluon_bwd(monkeypatch) -> list:
    """Keep, for each backward's dK/dV on the Gluon kernel, whether it ran on tile lists."""
    from attnkit.backends.triton.ops import gluon_bwd

    ran = []
    real = gluon_bwd.launch_dkdv

    def launch_dkdv(*a, **kw):
        ran.append(a[-1] is not None if len(a) > 12 else kw.get("listed") is not None)
        return real(*a, **kw)

    monkeypatch.setattr(gluon_bwd, "launch_dkdv", launch_dkdv)
    return ran


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cuda_gluon_listed_forward(layout, monkeypatch):
    """Every library mask kind as data on the Gluon forward (D = 128, bf16, GQA; 64-key tiles, 128 where the
    mask leaves holes), forward and the Triton backward after it, against the oracle; the kernel ran each
    it takes, and none with a left window bound."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    ran = _record_gluon(monkeypatch)
    S = 1024
    q, k, v, kw = oracle.make_inputs(
        layout, B=2, Hq=4, Hk=2, Sq=S, Sk=S, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    for name, mask, flags, gluon in _gluon_cases(2, S):
        ran.clear()
        oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
        assert (bool(ran) and all(ran)) if gluon else not ran, (name, ran)


@pytest.mark.cuda
@pytest.mark.parametrize("Sq,Sk", [(640, 1024), (1024, 640)])
def test_cuda_gluon_listed_sq_ne_sk(Sq, Sk, monkeypatch):
    """Bottom-right alignment on the Gluon listed forward; Sq > Sk with causal leaves the first rows with no
    key (out 0, lse -inf); per-batch prefix lengths (the mask's batch stride)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    ran = _record_gluon(monkeypatch)
    q, k, v, kw = oracle.make_inputs(
        "bshd", B=2, Hq=4, Hk=1, Sq=Sq, Sk=Sk, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    prefix = torch.tensor([100, 500], device="cuda")
    for mask, flags in ((M.prefix_lm(prefix), {}), (M.prefix_lm(prefix * 3 - 300), {"causal": True})):
        ran.clear()
        res = oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
        assert ran and all(ran), (mask, ran)
        if Sq > Sk and flags:
            assert torch.isneginf(res["lse"][..., : Sq - Sk]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("layout,D", [("bhsd", 128), ("bshd", 128), ("bshd", 64)])
def test_cuda_gluon_listed_backward(layout, D, monkeypatch):
    """Every library mask kind as data with dK/dV on the Gluon kernel's transposed tile lists (partial query
    tiles masked by each key's intervals and the window flags, left bounds included), bf16, GQA, against the
    oracle; each backward ran it, and the Triton kernel with ``ATTNKIT_TRITON_GLUON_LISTED_BWD=0``."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    ran = _record_gluon_bwd(monkeypatch)
    S = 1024
    q, k, v, kw = oracle.make_inputs(
        layout, B=2, Hq=4, Hk=2, Sq=S, Sk=S, D=D, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    for name, mask, flags, _ in _gluon_cases(2, S):
        ran.clear()
        oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
        assert ran == [True], (name, ran)
    monkeypatch.setenv("ATTNKIT_TRITON_GLUON_LISTED_BWD", "0")
    ran.clear()
    oracle.check_against_oracle(tri, q, k, v, mask=M.prefix_lm(S // 5), **kw)
    assert ran == [], ran


@pytest.mark.cuda
@pytest.mark.parametrize("Sq,Sk", [(640, 1000), (1000, 640), (1000, 1000)])
def test_cuda_gluon_listed_backward_ragged(Sq, Sk, monkeypatch):
    """The Gluon listed dK/dV at lengths that are no multiple of its tiles (keys past Sk in the last key tile,
    query rows past Sq in the last query tile), bottom-right alignment, rows with no key (Sq > Sk, causal),
    per-batch prefix lengths, MQA; at Sq == Sk a mask per head and batch element (FlashMask bounds of shape
    (B, Hq, Sk, 2))."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are sm_90 only")
    ran = _record_gluon_bwd(monkeypatch)
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Hk=1, Sq=Sq, Sk=Sk, D=128, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    prefix = torch.tensor([100, 500], device="cuda")
    cases = [(M.prefix_lm(prefix), {}), (M.prefix_lm(prefix * 3 - 300), {"causal": True})]
    if Sq == Sk:
        g = torch.Generator(device="cuda").manual_seed(3)
        lo = torch.randint(0, Sq, (2, 4, Sk, 1), device="cuda", generator=g)
        span = torch.randint(0, Sq // 2, (2, 4, Sk, 1), device="cuda", generator=g)
        cases.append((M.flashmask(torch.cat([lo, (lo + span).clamp(max=Sq)], -1).int(), causal=True), {}))
    for mask, flags in cases:
        ran.clear()
        oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
        assert ran == [True], (mask, ran)


# Offline sm_90a compiles of the Gluon kernels, in a subprocess without the interpreter (Gluon has none):
# ``ptx(fn, args, kw)`` compiles one specialization to PTX as a launch would (``fn`` a @gluon.jit kernel).
_PTX_PRELUDE = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from triton.experimental.gluon._runtime import GluonASTSource
from attnkit.backends.triton.ops import gluon_fwd as G

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)


def ptx(fn, args, kw):
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kw)
    opts, sig, consts, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    src = GluonASTSource(fn, sig, consts, attrs)
    code = triton.compile(src, target=target, options=opts.__dict__).asm["ptx"]
    reduce = ("cp.reduce.async.bulk" in code,) if kw.get("FUSED_DQ") else ()
    return ("wgmma" in code, "cp.async.bulk.tensor" in code, *reduce)


q = torch.empty(2, 4, 1024, 128, dtype=torch.bfloat16)
i32 = torch.empty(16, dtype=torch.int32)
"""

_GLUON_FWD_PTX = r"""
from attnkit.backends.triton.kernels.hopper.fwd import _attn_fwd_ws as fn

out, lse = torch.empty_like(q), torch.empty(2, 4, 1024)
for causal in (True, False):
    block_n, stages, overlap, split, persistent = G.listed_cfg(1024, not causal)
    descs = [G.descriptor(q, G.tma_rows(q, "bhsd"), rows) for rows in (128, block_n, block_n)]
    args = (*descs, out, lse, lse, 3, 5, 7, 4, 4, 1, 1024, 1024, 8, 0.3, i32, i32, 3, 5, 7, i32, 11, 13, 0)
    kw = dict(BSHD=False, CAUSAL=causal, LISTED=True, HAS_RIGHT=causal, BLOCK_M=128, BLOCK_N=block_n,
              HEAD_D=128, NUM_STAGES=stages, OVERLAP=overlap, SPLIT=split, PERSISTENT=persistent,
              num_warps=4, maxnreg=G.MAXNREG)
    print("ok", causal, *ptx(fn, args, kw))
"""

_GLUON_BWD_PTX = r"""
from attnkit.backends.triton.kernels.hopper.bwd import _attn_bwd_dkdv_ws as fn
from attnkit.backends.triton.ops import gluon_bwd as GB

hi = torch.empty(2, 4, 1024)
block_m, stages = GB.default_cfg(128, 1024, False)
dqa = torch.empty(q.shape)
VARIANTS = ((False, True, False, False, False), (True, False, True, True, False),
            (False, True, False, False, True), (True, False, False, True, True))
for listed, causal, left, right, fused in VARIANTS:
    descs = [G.descriptor(q, G.tma_rows(q, "bhsd"), r) for r in (block_m, block_m, GB.BLOCK_N, GB.BLOCK_N)]
    lists = (i32, i32, 3, 5, 7, i32, 11, 13, 5, 0)
    dqa_desc = GB.accumulator_descriptor(dqa, G.tma_rows(q, "bhsd")[:2], block_m) if fused else None
    stats = (GB.stat_descriptor(hi, block_m), GB.stat_descriptor(hi, block_m)) if fused else (None, None)
    args = (*descs, q, q, hi, hi, 3, 5, 7, 4, 2, 2, 1024, 1024, 0.3, 0.2, *lists, dqa_desc, *stats)
    kw = dict(BSHD=False, CAUSAL=causal, BLOCK_M=block_m, HEAD_D=128, NUM_STAGES=stages, LISTED=listed,
              HAS_LEFT=left, HAS_RIGHT=right, FUSED_DQ=fused, num_warps=4, maxnreg=GB.MAXNREG)
    print("ok", listed, fused, *ptx(fn, args, kw))
"""


def _compile_offline(script: str) -> list[str]:
    """The output lines of ``_PTX_PRELUDE + script`` run in a fresh interpreter without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _PTX_PRELUDE + script], env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split("\n")


@pytest.mark.skipif(HAS_CUDA, reason="the GPU compiles it for real")
def test_gluon_listed_forward_compiles_for_sm90():
    """The Gluon listed forward (causal with 64-key tiles, non-causal with 128) compiled to PTX for sm_90a
    offline: its frontend and lowering accept the code the GPU runs; wgmma and TMA are in it."""
    assert _compile_offline(_GLUON_FWD_PTX)[:2] == ["ok True True True", "ok False True True"]


@pytest.mark.skipif(HAS_CUDA, reason="the GPU compiles it for real")
def test_gluon_listed_backward_compiles_for_sm90():
    """The Gluon dK/dV, plain causal and listed with both window bounds, and both with dQ fused in (the
    reduce-adds: ``cp.reduce.async.bulk``), compiled to PTX offline."""
    assert _compile_offline(_GLUON_BWD_PTX)[:4] == [
        "ok False False True True",
        "ok True False True True",
        "ok False True True True True",
        "ok True True True True True",
    ]


def test_gluon_listed_backward_args_on_host(monkeypatch):
    """``ops/gluon_bwd.listed_args`` (lists made in the interpreter on the CPU): the transposed lists at the
    kernel's tiles (BLOCK_M query rows x 128 keys), their row strides (0 on the mask's broadcast dims), the
    intervals' strides, and the flags with causal folded into the right bound."""
    pytest.importorskip("triton.experimental.gluon")
    from attnkit.backends.triton import params as P
    from attnkit.backends.triton.ops import gluon_bwd
    from attnkit.masks import _intervals

    monkeypatch.setenv("ATTNKIT_TRITON_IV_LIST", "1")
    B, H, S = 2, 2, 256
    q = torch.randn(B, H, S, 128, dtype=torch.float16, device=DEV)
    call = oracle.make_call(q, q, q, mask=M.prefix_lm(torch.tensor([40, 200], device=DEV)), causal=True)
    iv = _intervals.lower(call.mask, call)
    names = P.FwdParams._names()
    vals = dict.fromkeys(names)
    vals.update(q=q, k=q, v=q, layout="bhsd", max_seqlen_q=S, max_seqlen_k=S, scale=0.1, causal=True,
                window_left=-1, window_right=-1, softcap=0.0, dropout_p=0.0, deterministic=False,
                startend=iv.startend, iv_summary=iv.summary, iv_skip=False, iv_band=False, score_mod="")
    p = P.FwdParams(*[vals[n] for n in names])
    args, has_left, has_right = gluon_bwd.listed_args(p)
    lst, cnt, row_b, row_h, n_cols, se, sib, sih, wl, wr = args
    block_m = gluon_bwd.default_cfg(128, S, True)[0]
    assert lst.shape == (B, 1, S // gluon_bwd.BLOCK_N, 2, S // block_m) and n_cols == S // block_m
    assert (row_b, row_h) == (S // gluon_bwd.BLOCK_N, 0)
    assert se is iv.startend and (sib, sih) == (se.stride(0), 0)
    assert (has_left, has_right, wr) == (False, True, 0)
    # key tile 0 of batch 1 (prefix 200): every query tile sees some of its keys; its last tiles see all
    part, full = lst[1, 0, 0, 0, : cnt[1, 0, 0, 0]].tolist(), lst[1, 0, 0, 1, : cnt[1, 0, 0, 1]].tolist()
    assert sorted(part + full) == list(range(0, S, block_m)) and full


def test_gluon_per_call_checks_on_host_tensors(monkeypatch):
    """The Gluon forward's per-call checks (``ops/gluon_fwd._tma_inputs``) run on the host alone: the launch
    gets Sk's config and the TMA rows of aligned tensors; an empty sequence or a layout whose heads do not
    flatten into TMA rows gives None (the Triton kernel then runs the call)."""
    pytest.importorskip("triton.experimental.gluon")
    from attnkit.backends.triton.ops import gluon_fwd

    launched = []
    monkeypatch.setattr(gluon_fwd, "_launch", lambda *a, **kw: launched.append(a) or "ran")
    q = torch.empty(2, 4, 256, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 4, 1024, 128, dtype=torch.bfloat16)
    assert gluon_fwd.try_forward(q, k, k, "bhsd", 0.1, True) == "ran"
    cfg, rows = launched[-1][6], launched[-1][7]
    assert cfg == gluon_fwd.default_cfg(128, 1024, True)
    assert rows == ((2 * 4 * 256, 128, 128), (2 * 4 * 1024, 128, 128), (2 * 4 * 1024, 128, 128))
    assert gluon_fwd._tma_inputs(q, k, k, "bhsd") == (1024, rows)
    as_bshd = q.transpose(1, 2)  # (B, S, H, D) view of a bhsd tensor: its heads are not adjacent columns
    assert gluon_fwd.try_forward(as_bshd, as_bshd, as_bshd, "bshd", 0.1, False) is None
    assert gluon_fwd.try_forward(q[:, :, :0], k, k, "bhsd", 0.1, False) is None
    assert len(launched) == 1
