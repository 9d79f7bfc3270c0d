"""Masks carried as data (column intervals) on our Triton kernels: the lowering against each mask's dense
definition (exact), and the kernels (forward, lse, dq/dk/dv) against the float64 oracle, in the interpreter
on the CPU (fp16/fp32, tiny shapes, 16x16 tiles) and natively on a GPU."""

from __future__ import annotations

import pytest
import torch

import attnkit
import oracle
from attnkit import masks as M
from attnkit._call import normalize
from attnkit.backends.reference import reference_forward
from attnkit.masks import _intervals as I

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float16, torch.float32)

common = pytest.importorskip("attnkit.backends.triton.ops.common")


pytestmark = pytest.mark.usefixtures("poison_triton_outputs")  # (conftest.py)
tri = oracle.tri


def _sorted_ids(B, S, n_docs, gen=None):
    """Random packings: (B, S) non-decreasing doc ids with n_docs documents of random lengths (some empty)."""
    cuts = torch.sort(torch.randint(0, S + 1, (B, n_docs - 1), generator=gen), dim=1).values
    pos = torch.arange(S).view(1, 1, S)
    return (pos >= cuts.unsqueeze(-1)).sum(1).to(torch.int32)


def _masks(B, Sq, Sk, gen=None):
    """Every lowerable library mask, by name, for a dense call of B x Sq x Sk."""
    ids = _sorted_ids(B, Sq, 4, gen).to(DEV)
    kv = _sorted_ids(B, Sk, 3, gen).to(DEV) if Sq != Sk else None  # (Sq != Sk: ids for the keys too)
    kv1 = None if kv is None else kv[0]

    def doc(q_ids, kv_ids):
        return M.document(q_ids, kv_ids)

    return {
        "document": doc(ids, kv),
        "document_causal": doc(ids, kv) & M.causal(),
        "document_1d_causal": doc(ids[0], kv1) & M.causal(),
        "document_kv_ids": M.document(ids, _sorted_ids(B, Sk, 3, gen).to(DEV)),
        "prefix_lm": M.prefix_lm(5),
        "prefix_lm_tensor": M.prefix_lm(torch.tensor([0, Sk + 3], device=DEV)[:B]),
        "chunked": M.chunked(16),
        "chunked_causal": M.chunked(12) & M.causal(),
        "prefix_lm_window": M.prefix_lm(9) & M.sliding_window(20),
        "document_window": doc(ids, kv) & M.sliding_window(10, 4),
        "global_sliding": M.global_sliding(3, 6, 2),
        "global_sliding_left": M.global_sliding(2, 5),
        "global_sliding_unbounded_right": M.global_sliding(4, 3, -1),
        **(_square_masks(B, Sq, gen) if Sq == Sk else {}),
    }


def _flashmask_table(B, H, S, C, causal, gen=None):
    """Random FlashMask indices (B, H, S, C) in FlashMask's conventions (start <= end per pair)."""
    x = torch.sort(torch.randint(0, S + 2, (B, H, S, C), generator=gen), dim=-1).values
    if not causal and C == 2:
        x = x.flip(-1)  # (a, b): rows >= a or < b masked, a >= b keeps both ends
    return x.to(torch.int32)


def _square_masks(B, S, gen=None):
    """The masks defined for Sq == Sk only."""
    lens = torch.randint(0, S // 5 + 1, (B, 3), generator=gen).to(DEV)
    plen = torch.randint(0, S // 3, (B,), generator=gen).to(DEV)
    return {
        "shared_prefix": M.shared_prefix(S // 4, [S // 4, S // 3, 2]),
        "shared_prefix_tensor": M.shared_prefix(plen, lens),
        "shared_prefix_no_response": M.shared_prefix(5, []),
        "flashmask_c1_causal": M.flashmask(_flashmask_table(B, 1, S, 1, True, gen).to(DEV), True),
        "flashmask_c2_causal": M.flashmask(_flashmask_table(1, 2, S, 2, True, gen).to(DEV), True),
        "flashmask_c2": M.flashmask(_flashmask_table(B, 2, S, 2, False, gen).to(DEV), False),
        "flashmask_c4": M.flashmask(_flashmask_table(B, 1, S, 4, False, gen).to(DEV), False),
    }


def _flags_dense(iv, Sq, Sk):
    i = torch.arange(Sq).view(-1, 1)
    j = torch.arange(Sk).view(1, -1)
    p = i + (Sk - Sq)
    ok = torch.ones(Sq, Sk, dtype=torch.bool)
    if iv.causal:
        ok &= j <= p
    if iv.window is not None:
        left, right = iv.window
        if left >= 0:
            ok &= j >= p - left
        if right >= 0:
            ok &= j <= p + right
    return ok


# -- the lowering, exactly ----------------------------------------------------------------------------------
@pytest.mark.parametrize("Sq,Sk", [(24, 24), (13, 24), (24, 13), (1, 9)])
def test_lowering_equals_dense(Sq, Sk):
    gen = torch.Generator().manual_seed(Sq * 100 + Sk)
    B, H = 2, 2
    q = torch.randn(B, H, Sq, 16, device=DEV)
    k = torch.randn(B, 1, Sk, 16, device=DEV)
    for trial in range(4):  # fresh packings each time
        for name, mask in _masks(B, Sq, Sk, gen).items():
            call = normalize(q, k, k, mask=mask)
            assert I.why_not(call.mask, call) is None, name
            iv = I.lower(call.mask, call)
            got = I.dense_from_intervals(iv, B, H, Sq, Sk).cpu() & _flags_dense(iv, Sq, Sk)
            want = call.mask.to_dense(B, H, Sq, Sk).cpu()
            assert torch.equal(got, want), (name, trial)


def _thd_masks(N, S, square):
    ids = _sorted_ids(N, S, 3).to(DEV)
    out = [M.document(ids) & M.causal(), M.prefix_lm(4), M.chunked(4), M.document(ids[1])]
    out.append(M.global_sliding(2, 3))
    if square:  # (lengths [5, 0, 17, 1, 9])
        out += [
            M.shared_prefix(
                torch.tensor([2, 0, 4, 0, 3], device=DEV),
                torch.tensor([[2, 1], [0, 0], [5, 6], [1, 0], [3, 3]], device=DEV),
            ),
            M.flashmask(_flashmask_table(N, 2, S, 4, False).to(DEV), False),
            M.flashmask(_flashmask_table(1, 1, S, 2, True).to(DEV), True),
        ]
    return out


@pytest.mark.parametrize("square", [False, True])
def test_lowering_thd_per_sequence(square):
    """thd: one column row per packed key, rows counted inside each sequence."""
    lq, lk = [5, 0, 17, 1, 9], ([5, 0, 17, 1, 9] if square else [7, 3, 17, 4, 9])
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, Hk=1, D=16, seqlens_q=lq, seqlens_k=lk, device=DEV)
    N, S = len(lq), max(lq + lk)
    for mask in _thd_masks(N, S, square):
        call = normalize(q, k, v, mask=mask, **kw)
        iv = I.lower(call.mask, call)
        cu_k = kw["cu_seqlens_k"].tolist()
        for h in range(2):
            se = iv.startend[0, min(h, iv.startend.shape[1] - 1)].cpu().long()
            for n in range(N):
                rows = torch.arange(lq[n]).view(-1, 1)
                part = se[cu_k[n] : cu_k[n + 1]]
                a, b, c, d = (part[:, t].view(1, -1) for t in range(4))
                got = ~(((rows >= a) & (rows < b)) | ((rows >= c) & (rows < d)))
                got &= _flags_dense(iv, lq[n], lk[n])
                i = torch.arange(lq[n], device=DEV).view(-1, 1)
                j = torch.arange(lk[n], device=DEV).view(1, -1)
                bn, hh = torch.tensor(n, device=DEV), torch.tensor(h, device=DEV)
                want = call.mask.bind(lq[n], lk[n])(bn, hh, i, j)
                assert torch.equal(got, want.cpu().expand_as(got)), (mask.name, n, h)


def test_summary_bounds():
    se = torch.randint(0, 50, (2, 1, 37, 4), dtype=torch.int32)
    s = I.summarize(se)
    assert s.shape == (2, 1, 3, 8)
    for blk in range(3):
        part = se[:, :, blk * 16 : (blk + 1) * 16]
        assert torch.equal(s[:, :, blk, 0::2], part.amin(2))
        assert torch.equal(s[:, :, blk, 1::2], part.amax(2))


def test_unlowerable_masks_say_why_and_run_evaluated_per_element():
    """Masks with no interval lowering get the reason from the lowering, and the triton backend still
    serves them: the mask folded into a compiled score mod, evaluated per element (explain says so)."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=16, D=16, device=DEV)
    ids = torch.tensor([0] * 8 + [1] * 8, device=DEV)
    cases = {
        "neighborhood_2d": M.neighborhood_2d(4, 4, 3),
        "mask_mod": M.document(ids) & (lambda b, h, i, j: i >= j),
        "or": M.document(ids) | M.prefix_lm(3),
        "not": ~M.document(ids),
        "two masked row intervals": M.document(ids) & M.chunked(4),
        "not non-decreasing": M.document(torch.tensor([0, 1] * 8, device=DEV)),
    }
    for what, mask in cases.items():
        call = normalize(q, k, v, mask=mask)
        why = I.why_not(call.mask, call)
        assert why is not None and what in why, (what, why)
        report = str(attnkit.explain(q, k, v, mask=mask, backend="triton"))
        assert "evaluated per element" in report, report
        want, _ = reference_forward(call)
        assert (tri(q, k, v, mask=mask).float() - want.float()).abs().max() < 1e-3, what


# -- the kernels against the oracle -------------------------------------------------------------------------
def _check(q, k, v, mask, **kw):
    oracle.check_against_oracle(tri, q, k, v, mask=mask, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(_masks(2, 8, 8)))
def test_masks_fwd_bwd(name, dtype):
    Sq, Sk = 40, 40
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=2, Hk=1, Sq=Sq, Sk=Sk, D=16, dtype=dtype, device=DEV, requires_grad=True
    )
    _check(q, k, v, _masks(2, Sq, Sk)[name], **kw)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("Sq,Sk", [(23, 50), (50, 23)])
def test_masks_sq_ne_sk(layout, Sq, Sk):
    q, k, v, kw = oracle.make_inputs(
        layout, B=2, Hq=2, Hk=1, Sq=Sq, Sk=Sk, D=32, device=DEV, requires_grad=True
    )
    for name in ("document_causal", "prefix_lm", "chunked_causal", "document_kv_ids"):
        _check(q, k, v, _masks(2, Sq, Sk)[name], **kw)


def test_masks_thd():
    lq = [5, 0, 33, 1, 20]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, Hk=1, D=16, seqlens_q=lq, device=DEV, requires_grad=True, dtype=torch.float16
    )
    ids = _sorted_ids(len(lq), max(lq), 3).to(DEV)
    masks = (
        M.document(ids) & M.causal(),
        M.prefix_lm(torch.tensor([2, 0, 7, 1, 30], device=DEV)),
        M.shared_prefix(
            torch.tensor([2, 0, 9, 1, 4], device=DEV),
            torch.tensor([[2, 1], [0, 0], [10, 8], [0, 0], [6, 3]], device=DEV),
        ),
        M.flashmask(_flashmask_table(len(lq), 1, max(lq), 4, False).to(DEV), False),
    )
    for mask in masks:
        _check(q, k, v, mask, **kw)


def test_fully_masked_rows_and_tiles():
    """Rows that see nothing (out 0, lse -inf, zero grads) and whole key tiles that nobody sees."""
    S = 48
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=S, D=16, device=DEV, requires_grad=True)
    # queries 0..19 in doc 0; keys of doc 0 and queries of doc 2 only: kv ids never equal query ids there
    qids = torch.tensor([0] * 20 + [1] * 28, device=DEV)
    kvids = torch.tensor([1] * 30 + [5] * 18, device=DEV)  # doc 0 queries see nothing; keys 30.. unseen
    res = oracle.check_against_oracle(tri, q, k, v, mask=M.document(qids, kvids), **kw)
    assert bool((res["lse"][..., :20] == float("-inf")).all())
    assert bool((res["out"][..., :20, :] == 0).all())
    assert bool((res["inputs"]["k"].grad[..., 30:, :] == 0).all())
    assert bool((res["inputs"]["v"].grad[..., 30:, :] == 0).all())


def test_new_packings_and_lengths_compile_nothing():
    """The kernels see the mask only as int32 tensors: new doc ids and new lengths are the same kernels
    (the interpreter has no compile cache, so the lowering's structure is what is checked here; the CUDA
    test below counts real compiles)."""
    torch.manual_seed(0)
    for S in (16, 29):
        q, k, v, kw = oracle.make_inputs("bhsd", B=2, Hq=2, Sq=S, D=16, device=DEV)
        for _ in range(2):
            mask = M.document(_sorted_ids(2, S, 3).to(DEV)) & M.causal()
            call = normalize(q, k, v, mask=mask)
            iv = I.lower(call.mask, call)
            assert iv.startend.dtype == torch.int32 and iv.startend.shape == (2, 1, S, 4)
            assert iv.summary.shape == (2, 1, -(-S // 16), 8)
            assert (iv.causal, iv.window) == (True, None)


@pytest.mark.cuda
def test_cuda_new_packings_and_lengths_compile_nothing():
    from attnkit.backends.triton.kernels import fwd as _fwd

    def run(S, n_docs):
        q, k, v, _ = oracle.make_inputs(
            "bhsd", B=2, Hq=4, Sq=S, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
        )
        mask = M.document(_sorted_ids(2, S, n_docs).cuda()) & M.causal()
        tri(q, k, v, mask=mask).sum().backward()

    run(300, 3)
    caches = getattr(_fwd.attn_fwd, "device_caches", None)
    if caches is None:
        pytest.skip("this triton has no device_caches to count")
    before = sum(len(c[0]) for c in caches.values())
    count0 = attnkit.compile_count() if hasattr(attnkit, "compile_count") else None
    for S, n in ((300, 5), (301, 2), (517, 7), (1000, 1)):
        run(S, n)
    assert sum(len(c[0]) for c in caches.values()) == before
    if count0 is not None:
        assert attnkit.compile_count() == count0


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["document_causal", "prefix_lm", "chunked_causal", "document"])
def test_cuda_bf16_masks(name):
    Sq = Sk = 700
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Hk=2, Sq=Sq, Sk=Sk, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    _check(q, k, v, _masks(2, Sq, Sk)[name], **kw)


@pytest.mark.cuda
def test_cuda_auto_picks_a_fast_block_sparse_backend_for_lowered_masks():
    """A causal document mask's forward (B=2 H=16 S=8k D=128): measured on the H200 (2026-12-02) flex 0.507
    ms, triton 0.510, flex_flash 0.936, SDPA with a dense mask several ms: auto takes one of the first two."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=16, Sq=8192, D=128, dtype=torch.bfloat16, device="cuda")
    ids = _sorted_ids(2, 8192, 8).cuda()
    report = attnkit.explain(q, k, v, mask=M.document(ids) & M.causal())
    assert report.chosen in ("flex", "triton"), str(report)


@pytest.mark.parametrize("Sq,Sk", [(40, 40), (23, 50), (50, 23)])
def test_visible_pairs_count(Sq, Sk):
    """The cost model's pair count (O(Sk) on the device) equals the dense count, flags included."""
    q = torch.randn(2, 2, Sq, 16, device=DEV)
    k = torch.randn(2, 1, Sk, 16, device=DEV)
    for name, mask in _masks(2, Sq, Sk).items():
        for kw in ({}, {"causal": True}, {"window": (7, 3)}):
            call = normalize(q, k, k, mask=mask, **kw)
            causal, window, iv = _flags(call)
            got = float(I.visible_pairs(iv, call, causal, window))
            H = iv.startend.shape[1]  # (per-head masks: the count is per head on average)
            dense = call.mask.to_dense(2, H, Sq, Sk).cpu()
            if call.causal or call.window:
                dense = dense & _call_flags_dense(call)
            assert got * H == float(dense.sum()), (name, kw)


def _flags(call):
    from attnkit.backends.triton.backend import TritonBackend

    return TritonBackend._mask_flags(call)


def _call_flags_dense(call):
    class F:
        causal, window = call.causal, call.window

    return _flags_dense(F, call.Sq, call.Sk)


def test_compile_fullgraph_with_a_data_mask():
    """torch.compile traces the lowering (plain torch ops) and the ops carrying the intervals."""
    S = 24
    q, k, v, _ = oracle.make_inputs("bhsd", B=2, Hq=2, Hk=1, Sq=S, D=16, device=DEV, requires_grad=True)
    ids = _sorted_ids(2, S, 3).to(DEV)

    def f(q, k, v, ids):
        out = attnkit.attention(q, k, v, mask=M.document(ids) & M.causal(), backend="triton")
        return out.float().sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    g_eager = torch.autograd.grad(f(q, k, v, ids), (q, k, v))
    g_comp = torch.autograd.grad(compiled(q, k, v, ids), (q, k, v))
    for a, b_ in zip(g_eager, g_comp):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("skip", ["0", "1"])
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
def test_tile_sizes_and_skip_branch(tiles, skip, monkeypatch):
    """Other tile shapes (a key tile over several 16-key summary entries, unaligned in thd) and the
    ATTNKIT_TRITON_IV_SKIP branch give the same, correct results."""
    from attnkit.backends.triton.runtime import tuning

    BM, BN = tiles
    for kind in ("fwd", "dkdv", "dq", "bwd"):
        monkeypatch.setitem(tuning.FORCE, kind, (BM, BN, 4, 1))
    monkeypatch.setenv("ATTNKIT_TRITON_IV_SKIP", skip)
    lq = [37, 3, 50]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, Hk=1, D=16, seqlens_q=lq, device=DEV, requires_grad=True, dtype=torch.float16
    )
    ids = _sorted_ids(len(lq), max(lq), 4).to(DEV)
    _check(q, k, v, M.document(ids) & M.causal(), **kw)
    S = 70
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=S, D=16, device=DEV, requires_grad=True)
    _check(q, k, v, M.shared_prefix(9, [20, 7, 25]), **kw)


def test_masks_with_other_features():
    """Intervals compose with softcap, ALiBi, a learnable bias, D != Dv and a window flag."""
    S = 40
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=2, Hk=1, Sq=S, D=16, Dv=32, device=DEV, requires_grad=True
    )
    bias = torch.randn(2, 2, S, S, device=DEV, requires_grad=True)
    ids = _sorted_ids(2, S, 3).to(DEV)
    oracle.check_against_oracle(
        tri,
        q,
        k,
        v,
        bias=bias,
        mask=M.document(ids) & M.causal(),
        softcap=3.0,
        alibi_slopes=oracle.alibi_slopes(2, DEV),
        window=(12, -1),
        **kw,
    )


def test_interleaved_doc_ids_after_a_cached_choice_give_the_right_rows():
    """The dispatcher caches its choice by the mask's structure; ids of the same structure that do not lower
    (interleaved documents) must never give wrong rows: they run evaluated per element."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=16, D=16, device=DEV)
    tri(q, k, v, mask=M.document(torch.tensor([0] * 8 + [1] * 8, device=DEV)))
    mixed = M.document(torch.tensor([0, 1] * 8, device=DEV))
    want, _ = reference_forward(normalize(q, k, v, mask=mixed))
    assert (tri(q, k, v, mask=mixed).float() - want.float()).abs().max() < 1e-3


def test_lowering_is_memoized_per_mask_and_data():
    """One mask object passed to every layer is lowered once per call shape; a new packing (a new tensor),
    an in-place change of the ids, new thd lengths or a new shape lower again."""
    q = torch.randn(2, 2, 24, 16, device=DEV)
    ids = _sorted_ids(2, 24, 3).to(DEV)
    mask = M.document(ids) & M.causal()
    call = normalize(q, q, q, mask=mask)
    first = I.lower(mask, call)
    assert I.lower(mask, normalize(q, q, q, mask=mask)) is first
    ids.add_(0)  # an in-place write (same values): its version changes
    again = I.lower(mask, call)
    assert again is not first and torch.equal(again.startend, first.startend)
    q2 = torch.randn(2, 2, 20, 16, device=DEV)
    short = M.document(ids[:, :20]) & M.causal()
    assert I.lower(short, normalize(q2, q2, q2, mask=short)) is not I.lower(mask, call)
    # thd: the same mask over new cu_seqlens (same total) lowers again
    t = torch.randn(24, 2, 16, device=DEV)
    tmask = M.prefix_lm(3)
    cu1 = torch.tensor([0, 10, 24], dtype=torch.int32, device=DEV)
    cu2 = torch.tensor([0, 14, 24], dtype=torch.int32, device=DEV)
    a = I.lower(tmask, normalize(t, t, t, mask=tmask, cu_seqlens_q=cu1, cu_seqlens_k=cu1, layout="thd"))
    b = I.lower(tmask, normalize(t, t, t, mask=tmask, cu_seqlens_q=cu2, cu_seqlens_k=cu2, layout="thd"))
    assert a is not b and not torch.equal(a.startend, b.startend)


def test_the_empty_tile_skip_is_chosen_per_mask(monkeypatch):
    """The branch that skips empty key tiles inside a row's range is on where the mask can leave such tiles
    (shared prefix, global+window, FlashMask) and off elsewhere (documents, prefix-LM: it cost there on the
    H200), unless ``ATTNKIT_TRITON_IV_SKIP`` forces it."""
    from attnkit._call import normalize
    from attnkit.backends.triton.params import _iv_skip
    from attnkit.masks import _intervals

    q = torch.randn(1, 2, 64, 16)
    holes = {
        "shared": M.shared_prefix(8, [20, 30]),
        "global": M.global_sliding(4, 8),
        "flashmask": M.flashmask(torch.full((1, 1, 64, 2), 64, dtype=torch.int32), causal=False),
        "document": M.document(_sorted_ids(1, 64, 3)[0]) & M.causal(),
        "prefix": M.prefix_lm(10),
        "chunked": M.chunked(16) & M.causal(),
    }
    got = {name: _intervals.lower(m, normalize(q, q, q, mask=m)).holes for name, m in holes.items()}
    assert {n for n, h in got.items() if h} == {"shared", "global", "flashmask"}, got
    monkeypatch.delenv("ATTNKIT_TRITON_IV_SKIP", raising=False)
    assert _iv_skip(True) and not _iv_skip(False)
    monkeypatch.setenv("ATTNKIT_TRITON_IV_SKIP", "0")
    assert not _iv_skip(True)
    monkeypatch.setenv("ATTNKIT_TRITON_IV_SKIP", "1")
    assert _iv_skip(False)
