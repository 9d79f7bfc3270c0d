"""Masks as data, the interval body (``ATTNKIT_TRITON_IV_BODY``): the last run of tiles that a mask leaves
full for a whole tile runs as the plain body, with no interval classification or loads.

* :func:`iv_full_run` (the pre-pass that finds the run) against a brute-force scan of the same summaries;
* the kernels (forward, lse, dq/dk/dv) against the float64 oracle with the body on and off, over the lowerable
  masks, with and without causal / window flags, Sq != Sk, thd, GQA, tiles over several summary entries;
* the body really skips the interval work: intervals of columns inside it are poisoned (the summary kept), and
  with the body the results do not change, while the per-tile path (IV_BODY=0) reads the poison.

Interpreter on the CPU (fp16/fp32, tiny shapes, forced small tiles so that every dimension has several)."""

from __future__ import annotations

import pytest
import torch

import oracle
from attnkit import masks as M
from attnkit.masks import _intervals as I

triton = pytest.importorskip("triton")
tl = triton.language
common = pytest.importorskip("attnkit.backends.triton.kernels.common")
from attnkit.backends.triton.runtime import tuning  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poison_triton_outputs")  # (conftest.py)


@pytest.fixture(autouse=True)
def _classified_forward(monkeypatch):
    """The forward's classified loop (the body is what it runs; dense forwards take tile lists by default,
    tests/test_triton_iv_lists.py): thd, CUDA-graph capture and the backward still take it."""
    monkeypatch.setenv("ATTNKIT_TRITON_IV_LIST", "0")
tri = oracle.tri
BIG = 1 << 30


# -- the pre-pass against a brute-force scan ----------------------------------------------------------------
@triton.jit
def _full_run_kernel(Sum, Out, grid0, s_lo, s_hi, p0, p1, r0, r1, seqlen_q, KEYS: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):  # fmt: skip
    b0, b1 = common.iv_full_run(Sum, grid0, s_lo, s_hi, p0, p1, r0, r1, seqlen_q, KEYS, BLOCK, BLOCK_E)
    tl.store(Out, b0)
    tl.store(Out + 1, b1)


def _entry_full(e, x0, x1):
    lo_a, _, _, hi_b, lo_c, _, _, hi_d = (int(v) for v in e)
    return (hi_b <= x0 or lo_a > x1) and (hi_d <= x0 or lo_c > x1)


def _brute_run(summary, grid0, s_lo, s_hi, p0, p1, r0, r1, seqlen_q, keys, BLOCK):
    """The last maximal run of full tiles, tile by tile (the definition of iv_full_run)."""
    g0 = grid0 + -(-(s_lo - grid0) // BLOCK) * BLOCK
    g1 = grid0 + ((s_hi - grid0) // BLOCK) * BLOCK
    run = None
    start = None
    for t in range(g0, g1, BLOCK):
        if keys:
            c0, c1, x0, x1 = p0 + t, p0 + t + BLOCK - 1, r0, r1
        else:
            c0, c1, x0, x1 = p0, p1, t, min(t + BLOCK, seqlen_q) - 1
        full = all(_entry_full(summary[e], x0, x1) for e in range(c0 // 16, c1 // 16 + 1))
        if full:
            start = t if start is None else start
            run = (start, t + BLOCK)
        else:
            start = None
    return run if run is not None else (s_hi, s_hi)


def _random_startend(K, rows, gen, density):
    """(K, 4) column intervals: mostly nothing masked, with runs of columns that mask a short row range, or
    every row from some row on (a fraction ``density`` of the runs), so that full and partial tiles alternate
    at random (sparse ones: runs of full tiles longer than one step of the scan)."""
    se = torch.zeros(K, 4, dtype=torch.int32)
    j = 0
    while j < K:
        n = int(torch.randint(1, 60, (1,), generator=gen))
        u = float(torch.rand((), generator=gen))
        a = int(torch.randint(0, rows, (1,), generator=gen))
        if u < 0.8 * density:
            se[j : j + n, 0] = a
            se[j : j + n, 1] = a + int(torch.randint(1, rows // 8, (1,), generator=gen))
        elif u < density:
            se[j : j + n, 2] = a
            se[j : j + n, 3] = BIG
        j += n
    return se


@pytest.mark.parametrize("keys", [True, False], ids=["key_tiles", "query_tiles"])
def test_full_run_matches_brute_force(keys):
    gen = torch.Generator().manual_seed(7)
    if keys:  # forward / dQ: key tiles of 128 (16 per step of the scan: several steps)
        BLOCK, BLOCK_E, K, rows = 128, 128, 6000, 400
    else:  # dK/dV: query tiles of 16 against one key tile of 128 (16 per step)
        BLOCK, BLOCK_E, K, rows = 16, 128, 300, 900
    out = torch.empty(2, dtype=torch.int32, device=DEV)
    for trial in range(12):
        se = _random_startend(K, rows, gen, 0.2 if trial % 2 else 0.03)
        summary = I.summarize(se.view(1, 1, K, 4))[0, 0]  # (ceil(K/16), 8)
        flat = summary.contiguous().view(-1).to(DEV)
        start = int(torch.randint(0, 40, (1,), generator=gen))  # an unaligned first packed key (thd)
        if keys:
            seqlen_k = K - start
            grid0 = BLOCK * int(torch.randint(0, 4, (1,), generator=gen))
            s_lo = grid0 + BLOCK * int(torch.randint(0, 3, (1,), generator=gen))
            s_hi = max(s_lo, seqlen_k - int(torch.randint(0, 300, (1,), generator=gen)))
            r0 = int(torch.randint(0, rows, (1,), generator=gen))
            args = (grid0, s_lo, s_hi, start, 0, r0, r0 + int(torch.randint(0, 128, (1,), generator=gen)), 0)
        else:
            seqlen_q = rows
            grid0 = 0
            s_lo = BLOCK * int(torch.randint(0, 8, (1,), generator=gen)) + (trial % 3)  # (rounded up)
            s_hi = max(s_lo, seqlen_q - int(torch.randint(0, 100, (1,), generator=gen)))
            p0 = start + BLOCK_E * int(torch.randint(0, (K - start) // BLOCK_E, (1,), generator=gen))
            p1 = min(p0 + BLOCK_E, K) - 1
            args = (grid0, s_lo, s_hi, p0, p1, 0, 0, seqlen_q)
        _full_run_kernel[(1,)](flat, out, *args, KEYS=keys, BLOCK=BLOCK, BLOCK_E=BLOCK_E)
        want = _brute_run(summary, *args, keys, BLOCK)
        assert tuple(out.tolist()) == want, (trial, args)


# -- the kernels against the oracle, body on and off --------------------------------------------------------
def _force(monkeypatch, BM, BN):
    for kind in ("fwd", "dkdv", "dq", "bwd"):
        monkeypatch.setitem(tuning.FORCE, kind, (BM, BN, 4, 1))


def _ids(B, S, n, seed):
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.sort(torch.randint(0, S + 1, (B, n - 1), generator=gen), dim=1).values
    return (torch.arange(S).view(1, 1, S) >= cuts.unsqueeze(-1)).sum(1).to(torch.int32).to(DEV)


def _flashmask(S, seed):
    """FlashMask C=4 (non causal): per column a masked row range near its own row and one far above, so that
    the per-entry test finds full tiles the per-tile one does not."""
    gen = torch.Generator().manual_seed(seed)
    j = torch.arange(S)
    a = (j + torch.randint(8, 24, (S,), generator=gen)).clamp(max=S)
    b = (a + torch.randint(0, 8, (S,), generator=gen)).clamp(max=S)
    c = torch.zeros(S, dtype=torch.long)
    d = (j // 3).clamp(min=0)
    return M.flashmask(torch.stack([a, b, c, d], -1).view(1, 1, S, 4).to(torch.int32).to(DEV), False)


# (name, mask factory (B, Sq, Sk), call flags): dense bhsd cases at Sq = Sk = 80 unless said
CASES = {
    "prefix_lm": (lambda B, Sq, Sk: M.prefix_lm(20), {}),
    "prefix_lm+causal_flag": (lambda B, Sq, Sk: M.prefix_lm(20), {"causal": True}),
    "document_causal": (lambda B, Sq, Sk: M.document(_ids(B, Sq, 3, 1)) & M.causal(), {}),
    "document+window_flag": (lambda B, Sq, Sk: M.document(_ids(B, Sq, 2, 2)), {"window": (60, 6)}),
    "shared_prefix": (lambda B, Sq, Sk: M.shared_prefix(40, [22, 9, 9]), {}),
    "global_sliding": (lambda B, Sq, Sk: M.global_sliding(4, 56, 0), {}),
    "global_sliding+causal_flag": (lambda B, Sq, Sk: M.global_sliding(4, 56, 8), {"causal": True}),
    "flashmask": (lambda B, Sq, Sk: _flashmask(Sq, 3), {}),
}


# (IV_BODY=0, the per-tile path the rest of the suite no longer takes by default: one case per kind of flags)
OFF = ("prefix_lm", "prefix_lm+causal_flag", "document+window_flag", "flashmask")


@pytest.mark.parametrize("name,body", [(n, "1") for n in CASES] + [(n, "0") for n in OFF])
def test_body_against_oracle(name, body, monkeypatch):
    monkeypatch.setenv("ATTNKIT_TRITON_IV_BODY", body)
    _force(monkeypatch, 16, 32)  # (a key tile over two summary entries)
    make, flags = CASES[name]
    S = 80
    dtype = torch.float32 if "flag" in name else torch.float16
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=2, Hk=1, Sq=S, Sk=S, D=16, dtype=dtype, device=DEV, requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, mask=make(2, S, S), **flags, **kw)


@pytest.mark.parametrize("Sq,Sk,body", [(40, 96, "1"), (96, 40, "1"), (40, 96, "0")])
def test_body_sq_ne_sk(Sq, Sk, body, monkeypatch):
    monkeypatch.setenv("ATTNKIT_TRITON_IV_BODY", body)
    _force(monkeypatch, 32, 16)
    q, k, v, kw = oracle.make_inputs(
        "bshd", B=1, Hq=4, Hk=2, Sq=Sq, Sk=Sk, D=16, device=DEV, requires_grad=True
    )
    oracle.check_against_oracle(tri, q, k, v, mask=M.prefix_lm(30), **kw)
    oracle.check_against_oracle(tri, q, k, v, mask=M.global_sliding(3, 30, 4), causal=True, **kw)


@pytest.mark.parametrize("body", ["1", "0"])
def test_body_thd(body, monkeypatch):
    """Packed sequences: summary entries straddle sequences and tiles are not aligned with them."""
    monkeypatch.setenv("ATTNKIT_TRITON_IV_BODY", body)
    _force(monkeypatch, 16, 32)
    lq = [37, 3, 90]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, Hk=1, D=16, seqlens_q=lq, device=DEV, requires_grad=True, dtype=torch.float16
    )
    ids = _ids(len(lq), max(lq), 3, 4)
    oracle.check_against_oracle(tri, q, k, v, mask=M.document(ids) & M.causal(), **kw)
    prefix = torch.tensor([10, 1, 40], device=DEV)
    oracle.check_against_oracle(tri, q, k, v, mask=M.prefix_lm(prefix), **kw)


# -- the body does no interval work ------------------------------------------------------------------------
def _two_sided_mask(S):
    """FlashMask C=4 columns: 0..15 mask rows [0, 8), 16..31 rows [S - 8, S), the rest nothing. For query
    rows 16..S-17 each 16-key entry of the key tile [0, 32) is full, but the tile's summary taken whole
    ([0, S)) is not: the per-tile path treats that tile as partial and applies its intervals."""
    T = torch.zeros(1, 1, S, 4, dtype=torch.int32)
    T[0, 0, :16, :2] = torch.tensor([0, 8], dtype=torch.int32)
    T[0, 0, 16:32, :2] = torch.tensor([S - 8, S], dtype=torch.int32)
    return M.flashmask(T.to(DEV), False)


def test_body_reads_no_intervals(monkeypatch):
    """Columns 0..31 get a second masked row range [16, S - 16) (every row where the body holds their tile)
    in ``startend``, the summary kept: with the body, forward, lse and every gradient stay bit for bit those
    of the clean mask (which match the oracle); the per-tile path reads the poison and differs."""
    _force(monkeypatch, 16, 32)
    S = 64
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Hk=1, Sq=S, D=16, device=DEV, requires_grad=True)
    mask = _two_sided_mask(S)
    oracle.check_against_oracle(tri, q, k, v, mask=mask, **kw)  # (the clean mask, body on)

    from attnkit._call import normalize

    clean = I.lower(mask, normalize(q, k, v, mask=mask))
    se = clean.startend.clone()
    se[..., :32, 2] = 16
    se[..., :32, 3] = S - 16
    poisoned = I.Intervals(se, clean.summary, clean.causal, clean.window)
    g = torch.randn(q.shape, device=DEV)

    def run(body, iv):
        monkeypatch.setenv("ATTNKIT_TRITON_IV_BODY", body)
        monkeypatch.setattr(I, "lower", lambda m, call: iv)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = tri(*leaves, mask=mask, return_lse=True)
        out.backward(g)
        return [out, lse] + [t.grad for t in leaves]

    want = run("1", clean)
    for got, ref in zip(run("1", poisoned), want):
        assert torch.equal(got, ref)
    assert torch.equal(run("0", clean)[0], want[0])  # (the same, correct, result without a body)
    bad = run("0", poisoned)
    rows = slice(16, S - 16)
    assert (bad[0][..., rows, :] - want[0][..., rows, :]).abs().max() > 1e-2  # (out: rows 16..S-17)
    for got, ref in zip(bad[2:], want[2:]):  # dq, dk, dv all read the poisoned intervals
        assert (got - ref).abs().max() > 1e-2


# -- natively, at the tuned tile shapes --------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("body", ["1", "0"])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_bf16_body(D, body, monkeypatch):
    """bf16 on the GPU with the default (tuned) tiles: the body's compiled loops (constexpr segments, the
    pre-pass) against the oracle, forward and backward, with and without flags."""
    monkeypatch.setenv("ATTNKIT_TRITON_IV_BODY", body)
    S = 1000
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=2, Hq=4, Hk=2, Sq=S, Sk=S, D=D, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    cases = [
        (M.prefix_lm(250), {}),
        (M.document(_ids(2, S, 4, 5)) & M.causal(), {}),
        (M.shared_prefix(300, [200, 250, 100]), {}),
        (M.global_sliding(64, 300, 0), {}),
        (M.global_sliding(16, 200, 30), {"causal": True}),
        (_flashmask(S, 6), {}),
        (M.prefix_lm(100), {"window": (400, 20)}),
    ]
    for mask, flags in cases:
        oracle.check_against_oracle(tri, q, k, v, mask=mask, **flags, **kw)
