"""``attention_with_kvcache`` (docs/api.md §4), ``cascade_attention`` and the ``triton_decode`` backend.

Every result is held to the float64 oracle (tests/oracle.py) on the keys each row should see, gathered by
this file's own page walk (not attnkit's): contiguous and paged caches (pages of 1, 16 and 64 in random
order), in-place append at ragged lengths (0, and a cache that becomes exactly full), Sq in {1, 5, 64},
GQA ratios, causal / window / softcap / ALiBi, lse. Outputs are poisoned (NaN) before launch. On the CPU
the kernels run in the Triton interpreter; the interpreter reads any address, so the poisoned-table test
surrounds the cache with NaN guard memory: a read outside the cache shows as NaN, a write as a changed guard.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attnkit  # noqa: E402
import oracle  # noqa: E402
from attnkit.backends.reference import reference_forward  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])
dec_ops = pytest.importorskip("attnkit.backends.triton.ops.decode")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(dec_ops, "POISON", True)
    yield


# -- caches built and read by this file's own rules -------------------------------------------------------
class Cache:
    """A random cache: contiguous (B, cap, Hk, D) or paged (num_pages, ps, Hk, D) with a random table."""

    def __init__(self, B, cap, Hk, D, Dv, dtype, page_size=None, spare_pages=3):
        self.B, self.cap, self.ps = B, cap, page_size
        if page_size is None:
            self.k = oracle.randn((B, cap, Hk, D), dtype, DEV)
            self.v = oracle.randn((B, cap, Hk, Dv), dtype, DEV)
            self.table = None
        else:
            assert cap % page_size == 0
            max_pages = cap // page_size
            n = B * max_pages + spare_pages
            self.k = oracle.randn((n, page_size, Hk, D), dtype, DEV)
            self.v = oracle.randn((n, page_size, Hk, Dv), dtype, DEV)
            perm = torch.randperm(n)[: B * max_pages]
            self.table = perm.view(B, max_pages).to(torch.int32).to(DEV)

    def where(self, b, j):
        """(dim-0, dim-1) index of logical key j of row b."""
        if self.table is None:
            return b, j
        return int(self.table[b, j // self.ps]), j % self.ps

    def logical(self, t, b, n):
        """The first n logical rows of row b of cache tensor t (this file's own page walk)."""
        rows = [t[self.where(b, j)] for j in range(n)]
        return torch.stack(rows) if rows else t.new_zeros((0,) + tuple(t.shape[2:]))

    def appended(self, t, lens, new):
        """The cache tensor t after writing new (B, Sn, H, D) at each row's length (expected state)."""
        t = t.clone()
        for b, n in enumerate(lens):
            for s in range(new.shape[1]):
                t[self.where(b, n + s)] = new[b, s]
        return t


def ragged(B, top, gen=None):
    """B lengths in [0, top], one 0 and one exactly top (a cache that becomes full) when B >= 2."""
    lens = torch.randint(0, top + 1, (B,), generator=gen).tolist()
    if B >= 2:
        lens[0], lens[-1] = 0, top
    return lens


def expected(q, keys, vals, **flags):
    """Oracle (float64) and plain-PyTorch baseline of q (B, Sq, Hq, D) against per-row keys/values lists."""
    B, Sq, Hq, D = q.shape
    kw = dict(
        layout="thd",
        cu_seqlens_q=oracle.cu_seqlens([Sq] * B, q.device),
        cu_seqlens_k=oracle.cu_seqlens([k.shape[0] for k in keys], q.device),
        **flags,
    )
    qp, kp, vp = q.reshape(B * Sq, Hq, D), torch.cat(keys), torch.cat(vals)
    out64, lse64 = oracle.attention64(qp, kp, vp, **kw)
    outb, lseb = reference_forward(oracle.make_call(qp, kp, vp, return_lse=True, **kw), upcast=False)
    return out64, lse64, outb, lseb


def check(out, lse, q, ref):
    B, Sq, Hq, _ = q.shape
    out64, lse64, outb, lseb = ref
    assert out.shape == (B, Sq, Hq, out64.shape[-1]) and out.dtype == q.dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    oracle.assert_close(out.reshape(B * Sq, Hq, -1), out64, outb, dtype=q.dtype, name="out")
    oracle.assert_close(lse.transpose(0, 1).reshape(Hq, B * Sq), lse64, lseb, dtype=q.dtype, name="lse")


def run_case(*, B, cap, Sq, Sq_new, Hq, Hk, page_size, dtype, D=16, Dv=16, backend="triton", **flags):
    c = Cache(B, cap, Hk, D, Dv, dtype, page_size)
    lens = ragged(B, cap - Sq_new)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = oracle.randn((B, Sq, Hq, D), dtype, DEV)
    k_new = oracle.randn((B, Sq_new, Hk, D), dtype, DEV) if Sq_new else None
    v_new = oracle.randn((B, Sq_new, Hk, Dv), dtype, DEV) if Sq_new else None
    keys = [torch.cat([c.logical(c.k, b, n)] + ([k_new[b]] if Sq_new else [])) for b, n in enumerate(lens)]
    vals = [torch.cat([c.logical(c.v, b, n)] + ([v_new[b]] if Sq_new else [])) for b, n in enumerate(lens)]
    want_k = c.appended(c.k, lens, k_new) if Sq_new else c.k.clone()
    want_v = c.appended(c.v, lens, v_new) if Sq_new else c.v.clone()
    if flags.get("alibi_slopes") == "bh":
        flags["alibi_slopes"] = torch.rand(B, Hq, device=DEV)
    elif flags.get("alibi_slopes") == "h":
        flags["alibi_slopes"] = oracle.alibi_slopes(Hq, DEV)
    out, lse = attnkit.attention_with_kvcache(
        q,
        c.k,
        c.v,
        cache_seqlens=seqlens,
        k_new=k_new,
        v_new=v_new,
        block_table=c.table,
        return_lse=True,
        backend=backend,
        **flags,
    )
    assert torch.equal(c.k, want_k) and torch.equal(c.v, want_v), "append wrote the wrong cache entries"
    check(out, lse, q, expected(q, keys, vals, **flags))
    return out, lse


CASES = {
    "contig_decode": dict(page_size=None, B=3, cap=40, Sq=1, Sq_new=1, Hq=4, Hk=2),
    "contig_no_append_causal_mha": dict(page_size=None, B=3, cap=40, Sq=1, Sq_new=0, Hq=4, Hk=4, causal=True),
    "contig_sq5_gqa4_causal": dict(page_size=None, B=2, cap=37, Sq=5, Sq_new=5, Hq=8, Hk=2, causal=True),
    "contig_sq64_prefill_mqa": dict(page_size=None, B=2, cap=96, Sq=64, Sq_new=64, Hq=2, Hk=1, causal=True),
    "contig_sq3_new1_causal": dict(page_size=None, B=3, cap=30, Sq=3, Sq_new=1, Hq=4, Hk=2, causal=True),
    "contig_window_right": dict(page_size=None, B=2, cap=33, Sq=5, Sq_new=5, Hq=4, Hk=2, window=(-1, 2)),
    "page1_decode": dict(page_size=1, B=3, cap=24, Sq=1, Sq_new=1, Hq=4, Hk=2),
    "page1_window_causal": dict(
        page_size=1, B=2, cap=20, Sq=5, Sq_new=5, Hq=4, Hk=1, window=(4, 0), causal=True
    ),
    "page16_softcap": dict(page_size=16, B=2, cap=48, Sq=1, Sq_new=1, Hq=4, Hk=2, softcap=2.0),
    "page16_alibi_causal": dict(
        page_size=16, B=2, cap=48, Sq=5, Sq_new=5, Hq=4, Hk=2, alibi_slopes="bh", causal=True
    ),
    "page4_sq3_causal": dict(page_size=4, B=2, cap=40, Sq=3, Sq_new=3, Hq=4, Hk=2, causal=True),
    "page16_long_decode": dict(page_size=16, B=2, cap=128, Sq=1, Sq_new=1, Hq=4, Hk=2),
    "page64_decode": dict(page_size=64, B=1, cap=128, Sq=1, Sq_new=1, Hq=4, Hk=2, scale=0.3),
    "page64_sq5_window": dict(page_size=64, B=2, cap=128, Sq=5, Sq_new=5, Hq=2, Hk=2, window=(20, 2)),
    "page16_dv24_alibi_h": dict(
        page_size=16, B=2, cap=32, Sq=2, Sq_new=2, Hq=6, Hk=3, Dv=24, alibi_slopes="h", causal=True
    ),
    "contig_d40_window_left": dict(
        page_size=None, B=2, cap=29, Sq=1, Sq_new=1, Hq=3, Hk=1, D=40, window=(5, -1)
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kvcache_against_oracle(case, dtype):
    run_case(dtype=dtype, **CASES[case])


@pytest.mark.parametrize(
    "case", ["contig_decode", "page1_decode", "page16_alibi_causal", "page64_sq5_window"]
)
def test_forced_splits(case, monkeypatch):
    """The key range split over 3 programs, each writing a partial, then the combine kernel."""
    monkeypatch.setattr(dec_ops, "num_splits", lambda *a: 3)
    run_case(dtype=torch.float32, **CASES[case])


@pytest.mark.parametrize("case", ["contig_decode", "page16_alibi_causal"])
def test_the_splits_knob_sets_the_split_count(case, monkeypatch):
    """``splits=n`` (``attnkit bench decode --tune "splits=..."``) splits every call that gives no count in
    n, not by the rule."""
    monkeypatch.setattr(dec_ops, "_TUNE", [dict(dec_ops._tune(), splits=3)])
    monkeypatch.setattr(dec_ops, "_PLANS", {})
    monkeypatch.setattr(dec_ops, "num_splits", lambda *a: pytest.fail("the knob decides, not the rule"))
    run_case(dtype=torch.float32, **CASES[case])
    grids = {p.grid[0] for p in dec_ops._PLANS.values() if p.grid}
    # (3 parts of whole key tiles: 3 with the interpreter's 16-key tiles; a GPU's wider tiles cover these
    # small caches in fewer)
    assert grids == {3} if dec_ops._cap.interpreting() else grids <= {1, 2, 3}


@pytest.mark.parametrize("case", ["page16_alibi_causal", "page4_sq3_causal", "page1_window_causal"])
def test_unsplit_programs_over_small_pages(case, monkeypatch):
    """One program a row over small pages (on the GPU, pages of 16 or fewer keys read several a 128-key
    tile by MMA tiles take 64-key steps and 4 stages: ``_small_pages``; the interpreter's 16-key tiles
    keep theirs)."""
    monkeypatch.setattr(dec_ops, "_TUNE", [dict(dec_ops._tune(), splits=1)])
    monkeypatch.setattr(dec_ops, "_PLANS", {})
    run_case(dtype=torch.float32, **CASES[case])
    assert {p.grid[0] for p in dec_ops._PLANS.values() if p.grid} == {1}


def test_small_pages_rule(monkeypatch):
    monkeypatch.setattr(dec_ops._cap, "interpreting", lambda: False)
    assert dec_ops._small_pages(16, 16, 128) and dec_ops._small_pages(8, 64, 128)
    assert not dec_ops._small_pages(16, 4, 128)  # (Sq = 1's packed rows: no MMA tiles)
    assert not dec_ops._small_pages(64, 16, 128)  # (two pages a tile)
    monkeypatch.setattr(dec_ops, "_TUNE", [dict(dec_ops._tune(), small_pages=0)])
    assert not dec_ops._small_pages(16, 16, 128)


@pytest.mark.parametrize(
    "knobs",
    [dict(tail=0), dict(prefetch=0), dict(paged_wide=1), dict(paged_wide=0)],
    ids=str,
)
@pytest.mark.parametrize(
    "case",
    [
        "contig_sq5_gqa4_causal",
        "page1_window_causal",
        "page4_sq3_causal",
        "page16_alibi_causal",
        "page16_long_decode",
        "page64_sq5_window",
    ],
)
def test_tile_schedules(case, knobs, monkeypatch):
    """The kernel's other schedules (the defaults run everywhere else): every tile masked (tail=0), page
    ids loaded in the step that uses them (prefetch=0), one table entry a
    key for pages smaller than a tile (paged_wide=1; the default reads several a tile: pages of 1 and 4 in
    the interpreter's 16-key tiles), paged caches all on the table rule (paged_wide=0), split in 3."""
    monkeypatch.setattr(dec_ops, "_TUNE", [dict(dec_ops._tune(), **knobs)])
    monkeypatch.setattr(dec_ops, "_PLANS", {})
    monkeypatch.setattr(dec_ops, "num_splits", lambda *a: 3)
    run_case(dtype=torch.float32, **CASES[case])


@pytest.mark.parametrize("case", ["contig_sq5_gqa4_causal", "page16_alibi_causal", "page1_window_causal"])
def test_reference_backend(case):
    run_case(dtype=torch.float32, backend="reference", **CASES[case])


def test_other_backends_on_gathered_keys():
    """Any attention backend serves the gathered keys (here SDPA's math kernel, one call per row)."""
    c = Cache(2, 32, 2, 16, 16, torch.float32, page_size=16)
    q = torch.randn(2, 1, 4, 16, device=DEV)
    kw = dict(cache_seqlens=torch.tensor([0, 31], dtype=torch.int32, device=DEV), block_table=c.table)
    kw.update(k_new=torch.randn(2, 1, 2, 16, device=DEV), v_new=torch.randn(2, 1, 2, 16, device=DEV))
    out = attnkit.attention_with_kvcache(q, c.k.clone(), c.v.clone(), backend="sdpa_math", causal=True, **kw)
    ref = attnkit.attention_with_kvcache(q, c.k, c.v, backend="reference", causal=True, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mask_and_score_mod_on_gathered_keys():
    """score_mod / mask run on the gathered keys of each row (``auto`` on the CPU), with b the row and
    positions per row; an op the compiler cannot lower makes the decode kernel refuse (the kernel's own
    tests: test_kvcache_mods.py)."""
    flags = dict(
        mask=lambda b, h, q, kv: (kv + b) % 3 != 1,
        score_mod=lambda s, b, h, q, kv: s + 0.25 * h - 0.1 * (q - kv).abs(),
        causal=True,
    )
    run_case(
        page_size=4, B=3, cap=24, Sq=2, Sq_new=2, Hq=4, Hk=2, dtype=torch.float32, backend="auto", **flags
    )
    q = torch.randn(1, 1, 2, 8)
    c = torch.randn(1, 4, 2, 8)
    with pytest.raises(attnkit.UnsupportedError):
        attnkit.attention_with_kvcache(
            q,
            c,
            c,
            cache_seqlens=torch.tensor([2], dtype=torch.int32),
            score_mod=lambda s, b, h, q, kv: torch.sort(s, dim=-1).values,
            backend="triton",
        )


def test_split_heuristic_uses_host_values_only():
    # fills the GPU from B, Hk, tiles and capacity: small batches split, large ones do not
    assert dec_ops.num_splits(1, 8, 1, 131072, 64, 132) > 16
    assert dec_ops.num_splits(64, 8, 1, 8192, 64, 132) == 1
    assert dec_ops.num_splits(1, 1, 1, 64, 64, 132) == 1  # too few key blocks to split
    # 128 programs fill one wave: a contiguous cache goes unsplit, a paged one (table loads) splits
    assert dec_ops.num_splits(16, 8, 1, 8192, 64, 132) == 1
    assert dec_ops.num_splits(16, 8, 1, 8192, 64, 132, 2, True) == 3
    # which paged caches take that two-wave rule: the table rule's, and pages of 16 or fewer keys read 8 or
    # more a 128-key tile by MMA tiles of packed rows (BLOCK_M >= 16), not by Sq = 1's 4-row tiles
    assert dec_ops._two_wave(True, 64, 4, 128) and dec_ops._two_wave(False, 16, 16, 128)
    assert not dec_ops._two_wave(False, 16, 4, 128) and not dec_ops._two_wave(False, 64, 16, 128)


# -- validation -------------------------------------------------------------------------------------------
def _paged(B=2, ps=4, max_pages=3, spare=2, Hk=2, D=8):
    c = Cache(B, ps * max_pages, Hk, D, D, torch.float32, ps, spare)
    q = torch.randn(B, 1, 4, D, device=DEV)
    kn = torch.randn(B, 1, Hk, D, device=DEV)
    return c, q, kn


def _call(c, q, kn, lens, **kw):
    kw.setdefault("block_table", c.table)
    return attnkit.attention_with_kvcache(
        q,
        c.k,
        c.v,
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEV),
        k_new=kn,
        v_new=kn.clone(),
        **kw,
    )


@pytest.mark.parametrize(
    "poison, lens, arg",
    [
        ("page_too_big", [5, 2], "block_table"),
        ("page_negative", [5, 2], "block_table"),
        (None, [12, 2], "block_table"),  # 13 keys need 4 pages of 4: the table has 3 (the pool 8)
        (None, [40, 2], "cache_seqlens"),  # past the whole pool (8 pages of 4)
        (None, [-1, 2], "cache_seqlens"),
    ],
)
def test_validate_errors(poison, lens, arg):
    c, q, kn = _paged()
    if poison == "page_too_big":
        c.table[0, 1] = c.k.shape[0]
    elif poison == "page_negative":
        c.table[0, 1] = -1
    before = c.k.clone()
    with pytest.raises(attnkit.AttentionInputError, match=arg):
        _call(c, q, kn, lens)
    assert torch.equal(c.k, before), "a rejected call must not write into the cache"


def test_unused_table_entries_are_not_checked():
    c, q, kn = _paged()
    c.table[1, 1:] = -1  # row 1 uses one page (3 keys of pages of 4)
    c.table[0, 2] = 10**6  # row 0 uses two pages
    _call(c, q, kn, [4, 2], backend="reference")


def test_contiguous_validation_names_arguments():
    B, Hk, D = 2, 2, 8
    kc = torch.randn(B, 6, Hk, D)
    q = torch.randn(B, 1, 4, D)
    sl = torch.tensor([3, 6], dtype=torch.int32)
    ok = dict(cache_seqlens=sl)
    with pytest.raises(attnkit.AttentionInputError, match="cache_seqlens"):  # 6 + 1 > 6
        attnkit.attention_with_kvcache(q, kc, kc, k_new=kc[:, :1], v_new=kc[:, :1], **ok)
    bad = [
        ("cache_seqlens", dict(cache_seqlens=sl.long())),
        ("cache_seqlens", dict(cache_seqlens=sl[:1])),
        ("k_cache", dict(k_cache=kc[:1])),
        ("v_cache", dict(v_cache=kc.double())),
        ("k_cache", dict(k_cache=torch.randn(B, 6, 3, D), v_cache=torch.randn(B, 6, 3, D))),
        ("k_new", dict(k_new=torch.randn(B, 1, 1, D), v_new=torch.randn(B, 1, 1, D))),
        ("v_new", dict(k_new=kc[:, :1])),
        ("block_table", dict(block_table=torch.zeros(B, 2))),
        ("q", dict(q=torch.randn(B, 4, D))),
        ("window", dict(window=(2,))),
        ("softcap", dict(softcap=-1.0)),
        ("alibi_slopes", dict(alibi_slopes=torch.rand(3))),
        ("backend", dict(backend="no_such_backend")),
    ]
    for arg, kw in bad:
        args = dict(q=q, k_cache=kc, v_cache=kc, cache_seqlens=sl)
        args.update(kw)
        qq, kk, vv = args.pop("q"), args.pop("k_cache"), args.pop("v_cache")
        with pytest.raises(attnkit.AttentionInputError, match=arg):
            attnkit.attention_with_kvcache(qq, kk, vv, **args)


@pytest.mark.parametrize("paged, ps", [(False, 4), (True, 4), (True, 16), (True, 64)],
                         ids=["contiguous", "paged4", "paged16", "paged64"])  # fmt: skip
def test_poisoned_table_never_leaves_the_cache(paged, ps):
    """validate=False with a garbage table and lengths: wrong numbers allowed, but every read and write
    stays inside the cache tensors. The caches sit between NaN guards: a stray read makes NaN, a stray
    write changes a guard. Pages of 16 and 64 hold whole key tiles (one table entry a tile: the kernel's
    PAGED == 2), pages of 4 do not."""
    B, Hk, D, max_pages = 3, 2, 16, 3
    n = B * max_pages + 1
    rows = (n, ps) if paged else (B, ps * max_pages)
    numel = rows[0] * rows[1] * Hk * D
    guard = 4096
    store_k = torch.full((2 * guard + numel,), float("nan"), device=DEV)
    store_v = torch.full((2 * guard + numel,), float("nan"), device=DEV)
    kc = store_k[guard : guard + numel].view(*rows, Hk, D)
    vc = store_v[guard : guard + numel].view(*rows, Hk, D)
    kc.copy_(torch.randn_like(kc))
    vc.copy_(torch.randn_like(vc))
    table = torch.randint(-(10**6), 10**6, (B, max_pages), dtype=torch.int32, device=DEV) if paged else None
    seqlens = torch.tensor([10**7, -(10**7), 5], dtype=torch.int32, device=DEV)
    q = torch.randn(B, 2, 4, D, device=DEV)
    kn = torch.randn(B, 2, Hk, D, device=DEV)
    out = attnkit.attention_with_kvcache(
        q,
        kc,
        vc,
        cache_seqlens=seqlens,
        k_new=kn,
        v_new=kn.clone(),
        block_table=table,
        causal=True,
        backend="triton",
        validate=False,
    )
    assert not torch.isnan(out).any(), "a read outside the cache (NaN guard) reached the output"
    for s in (store_k, store_v):
        assert torch.isnan(s[:guard]).all() and torch.isnan(s[guard + numel :]).all(), (
            "a write left the cache"
        )


# -- cascade ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged4"])
@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cascade_equals_plain_decoding(page_size, Sq, backend):
    B, Hq, Hk, D, S_p, cap = 3, 4, 2, 16, 13, 16
    dtype = torch.float32
    c = Cache(B, cap, Hk, D, D, dtype, page_size)
    lens = ragged(B, cap - Sq)
    sk = oracle.randn((S_p, Hk, D), dtype, DEV)
    sv = oracle.randn((S_p, Hk, D), dtype, DEV)
    q = oracle.randn((B, Sq, Hq, D), dtype, DEV)
    kn = oracle.randn((B, Sq, Hk, D), dtype, DEV)
    vn = oracle.randn((B, Sq, Hk, D), dtype, DEV)
    keys = [torch.cat([sk, c.logical(c.k, b, n), kn[b]]) for b, n in enumerate(lens)]
    vals = [torch.cat([sv, c.logical(c.v, b, n), vn[b]]) for b, n in enumerate(lens)]
    out, lse = attnkit.cascade_attention(
        q,
        sk,
        sv,
        c.k,
        c.v,
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=DEV),
        k_new=kn,
        v_new=vn,
        block_table=c.table,
        causal=True,
        softcap=3.0,
        return_lse=True,
        backend=backend,
    )
    check(out, lse, q, expected(q, keys, vals, causal=True, softcap=3.0))
    # the same as decoding each row over the concatenated cache
    full_k = torch.stack([torch.nn.functional.pad(k, (0, 0, 0, 0, 0, S_p + cap - k.shape[0])) for k in keys])
    full_v = torch.stack([torch.nn.functional.pad(v, (0, 0, 0, 0, 0, S_p + cap - v.shape[0])) for v in vals])
    plain = attnkit.attention_with_kvcache(
        q,
        full_k,
        full_v,
        cache_seqlens=torch.tensor([k.shape[0] for k in keys], dtype=torch.int32, device=DEV),
        causal=True,
        softcap=3.0,
        backend=backend,
    )
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_cascade_rejects_queries_inside_the_prefix():
    q = torch.randn(2, 3, 4, 8)
    sk = torch.randn(5, 2, 8)
    kc = torch.randn(2, 6, 2, 8)
    with pytest.raises(attnkit.AttentionInputError, match="cache_seqlens"):
        attnkit.cascade_attention(
            q, sk, sk, kc, kc, cache_seqlens=torch.tensor([0, 4], dtype=torch.int32), causal=True
        )


# -- the triton_decode backend for attention() ----------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize(
    "flags",
    [{}, dict(causal=True), dict(window=(6, 0)), dict(softcap=2.0), dict(alibi="h", causal=True)],
    ids=["plain", "causal", "window", "softcap", "alibi"],
)
@pytest.mark.parametrize("Sq", [1, 5])
def test_triton_decode_backend(layout, flags, Sq):
    flags = dict(flags)
    q, k, v, kw = oracle.make_inputs(layout, B=2, Hq=4, Hk=2, Sq=Sq, Sk=37, D=16, device=DEV)
    if flags.pop("alibi", None):
        flags["alibi_slopes"] = oracle.alibi_slopes(4, DEV)

    def run(q, k, v, bias=None, **kw):
        return attnkit.attention(q, k, v, backend="triton_decode", **kw)

    oracle.check_against_oracle(run, q, k, v, check_grads=False, **kw, **flags)


def test_triton_decode_refuses_with_reasons():
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=17, Sk=20, D=8)
    with pytest.raises(attnkit.UnsupportedError, match="Sq = 17"):
        attnkit.attention(q, k, v, backend="triton_decode", **kw)
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=1, Sk=20, D=8, requires_grad=True)
    with pytest.raises(attnkit.UnsupportedError, match="grad"):
        attnkit.attention(q, k, v, backend="triton_decode", **kw)
    assert "triton_decode" in str(attnkit.explain(q.detach(), k.detach(), v.detach()))


# -- GPU only ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True])
def test_no_host_sync_and_graph_capture(paged):
    B, Hk, D, ps, max_pages = 4, 2, 64, 16, 8
    c = Cache(B, ps * max_pages, Hk, D, D, torch.bfloat16, ps if paged else None)
    q = torch.randn(B, 1, 8, D, device="cuda", dtype=torch.bfloat16)
    kn = torch.randn(B, 1, Hk, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor([0, 5, 70, ps * max_pages - 1], dtype=torch.int32, device="cuda")
    kw = dict(cache_seqlens=sl, k_new=kn, v_new=kn, block_table=c.table, causal=True, validate=False)
    ref = attnkit.attention_with_kvcache(q, c.k.clone(), c.v.clone(), backend="reference", **kw)
    attnkit.attention_with_kvcache(q, c.k.clone(), c.v.clone(), backend="triton", **kw)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k0, v0 = c.k.clone(), c.v.clone()
        out = attnkit.attention_with_kvcache(q, k0, v0, backend="triton", **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    g = torch.cuda.CUDAGraph()
    k1, v1 = c.k.clone(), c.v.clone()
    with torch.cuda.graph(g):
        out_g = attnkit.attention_with_kvcache(q, k1, v1, backend="triton", **kw)
    k1.copy_(c.k)
    v1.copy_(c.v)
    g.replay()
    torch.testing.assert_close(out_g, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_auto_prefers_decode_kernel_for_short_queries():
    q = torch.randn(16, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(16, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
    rep = attnkit.explain(q, k, k)
    assert rep.chosen in ("triton_decode", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"), str(rep)
    assert rep.chosen != "triton", str(rep)


def test_bench_decode_cpu_smoke(tmp_path):
    """``attnkit bench decode`` on a tiny CPU grid: rows for every backend, CSV/JSON with the environment."""
    import json

    from attnkit.bench import decode as bench

    assert bench.main(["--batch", "1", "--lengths", "32", "--pages", "0,16", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    assert "torch" in data["environment"]
    names = {(r["cache"], r["backend"]) for r in data["results"] if r.get("ms") is not None}
    assert {
        ("contiguous", "attnkit_kvcache"),
        ("contiguous", "sdpa"),
        ("paged16", "attnkit_kvcache"),
    } <= names
    assert {"cascade", "per_row_decode"} <= {r["backend"] for r in data["results"]}
    assert (tmp_path / "decode.csv").exists()


def test_bench_decode_tune_sweeps_the_knobs_and_restores_them(tmp_path):
    """``--tune``: the kvcache rows again under every knob combination (tagged), the defaults back after;
    a knob that does not exist is a one-line usage error (exit 2)."""
    import json

    from attnkit.bench import decode as bench

    before = dict(dec_ops._tune())
    argv = ["--batch", "1", "--lengths", "32", "--pages", "0,16", "--no-cascade", "--out", str(tmp_path)]
    assert bench.main(argv + ["--tune", "prefetch=0,1;tail=0"]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["results"]
    tuned = {(r["cache"], r["tune"]) for r in rows if r.get("tune") and r.get("ms") is not None}
    tags = ("prefetch=0,tail=0", "prefetch=1,tail=0")
    assert tuned == {(c, t) for c in ("contiguous", "paged16") for t in tags}
    assert all(r["backend"] == "attnkit_kvcache" for r in rows if r.get("tune"))
    assert dec_ops._tune() == before
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--tune", "prefech=1"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="ATTNKIT_DECODE_TUNE: unknown decode knob 'stage=2'"):
        dec_ops.parse_tune("stage=2")


def test_custom_ops_pass_opcheck():
    """The decode and merge custom ops: schema, fake (meta) implementation and strides agree with eager."""
    from attnkit.backends.triton.ops import combine

    q = torch.randn(2, 3, 4, 16, device=DEV)
    kc = torch.randn(5, 4, 2, 16, device=DEV)
    table = torch.tensor([[3, 0, 4], [1, 2, 0]], dtype=torch.int32, device=DEV)
    lens = torch.tensor([7, 2], dtype=torch.int32, device=DEV)
    args = (q, kc, kc, lens, table, None, 3, 0.25, True, -1, -1, 0.0, 2, False)
    torch.library.opcheck(dec_ops._op, args, test_utils=("test_schema", "test_faketensor"))
    outs = torch.randn(3, 2, 4, 5, 8, device=DEV)
    lses = torch.randn(3, 2, 4, 5, device=DEV)
    torch.library.opcheck(
        combine.merge_stacked, (outs, lses, "bhsd"), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.cuda
@pytest.mark.parametrize("page_size", [None, 16, 256])
@pytest.mark.parametrize("Sq", [1, 4, 16])
def test_gpu_realistic_shapes(page_size, Sq):
    """bf16, 32/8 heads, D=128, a few thousand keys (several splits at B=2), against the oracle."""
    run_case(
        page_size=page_size,
        B=2,
        cap=4608,
        Sq=Sq,
        Sq_new=Sq,
        Hq=32,
        Hk=8,
        D=128,
        Dv=128,
        dtype=torch.bfloat16,
        causal=True,
    )


@given(
    data=st.data(),
    page_size=st.sampled_from([None, 1, 3, 16]),
    B=st.integers(1, 3),
    Sq=st.integers(1, 6),
    Hk=st.integers(1, 2),
    group=st.sampled_from([1, 2, 3]),
    causal=st.booleans(),
    window=st.sampled_from([None, (3, -1), (-1, 1), (5, 2)]),
    softcap=st.sampled_from([None, 1.5]),
    alibi=st.sampled_from([None, "h", "bh"]),
)
def test_random_configurations(data, page_size, B, Sq, Hk, group, causal, window, softcap, alibi):
    """Random shapes and flags (Hypothesis): the decode kernel against the oracle on the gathered keys."""
    Sq_new = data.draw(st.integers(0, Sq))
    cap = (page_size or 1) * data.draw(
        st.integers(max(1, -(-Sq_new // (page_size or 1))), 24 // (page_size or 1) + 2)
    )
    flags = dict(causal=causal, window=window, softcap=softcap, alibi_slopes=alibi)
    flags = {k: v for k, v in flags.items() if v not in (None, False)}
    run_case(
        page_size=page_size,
        B=B,
        cap=cap,
        Sq=Sq,
        Sq_new=Sq_new,
        Hq=Hk * group,
        Hk=Hk,
        dtype=torch.float32,
        **flags,
    )
