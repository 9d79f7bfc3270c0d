"""``score_mod`` and ``mask`` in the Triton decode kernel (``attention_with_kvcache``, docs/api.md §4).

Every result is held to the float64 oracle on the keys each row should see (test_kvcache.py's own page walk
and oracle call, ``run_case``), aligned per row with ``Sk_b = cache_seqlens[b] + Sq_new``: contiguous and
paged caches (pages of 1 and 16 in random order), Sq in {1, 5}, GQA (heads the mods see are query heads),
a tanh soft-cap mod, ALiBi with a captured per-head slopes tensor, a learnable table read without grad, a
document mask over doc-id tensors, a mask_mod callable, a sliding window object, causal with a mask, rows
that see no key, the key range split (partials that see no key merged). Outputs are poisoned first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import attnkit  # noqa: E402
import attnkit.masks as M  # noqa: E402
import attnkit.mods as mods  # noqa: E402
from attnkit import compiler, kvcache  # noqa: E402
from test_kvcache import DEV, Cache, run_case  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
dec_ops = pytest.importorskip("attnkit.backends.triton.ops.decode")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(dec_ops, "POISON", True)
    yield


def _doc_ids(B, S, n_docs):
    """Sorted random document ids (B, S), ``n_docs`` documents (some may be empty)."""
    cuts = torch.sort(torch.randint(0, S + 1, (B, n_docs - 1)), dim=1).values
    return (torch.arange(S)[None, None, :] >= cuts[:, :, None]).sum(1).to(torch.int32).to(DEV)


# Each case: the cache and call shape, and ``flags(B, Sq, Hq, cap) -> the mod/mask keywords``.
CASES = {
    "contig_sq1_gqa_tanh": (
        dict(page_size=None, B=3, cap=40, Sq=1, Sq_new=1, Hq=4, Hk=2),
        lambda B, Sq, Hq, cap: dict(score_mod=lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0)),
    ),
    "page1_sq5_alibi_causal": (
        dict(page_size=1, B=2, cap=20, Sq=5, Sq_new=5, Hq=4, Hk=1),
        lambda B, Sq, Hq, cap: dict(score_mod=mods.alibi(torch.rand(Hq, device=DEV)), causal=True),
    ),
    "page16_sq5_table_read_only": (
        dict(page_size=16, B=2, cap=48, Sq=5, Sq_new=3, Hq=6, Hk=3),
        lambda B, Sq, Hq, cap: dict(
            score_mod=mods.relative_bias(torch.randn(Hq, 9, device=DEV, requires_grad=True))
        ),
    ),
    "page16_sq5_document": (
        dict(page_size=16, B=3, cap=32, Sq=5, Sq_new=5, Hq=4, Hk=2),
        lambda B, Sq, Hq, cap: dict(mask=M.document(_doc_ids(B, Sq, 2), _doc_ids(B, cap, 4))),
    ),
    "contig_sq5_mask_mod_heads": (  # a mask of the QUERY head: packed GQA rows must see their own head
        dict(page_size=None, B=2, cap=30, Sq=5, Sq_new=2, Hq=6, Hk=2),
        lambda B, Sq, Hq, cap: dict(mask=lambda b, h, q, kv: (kv + 2 * b + h + q) % 3 != 1),
    ),
    "page1_sq5_sliding_window": (
        dict(page_size=1, B=2, cap=24, Sq=5, Sq_new=5, Hq=4, Hk=2),
        lambda B, Sq, Hq, cap: dict(mask=M.sliding_window(4), score_mod=lambda s, b, h, q, kv: s * 0.5),
    ),
    "page16_sq1_causal_and_mask_mod": (
        dict(page_size=16, B=3, cap=48, Sq=1, Sq_new=1, Hq=4, Hk=2),
        lambda B, Sq, Hq, cap: dict(mask=lambda b, h, q, kv: kv % 4 != h, causal=True),
    ),
    "contig_sq5_mod_then_mask_some_rows_empty": (  # rows (b, i) with b + i even see no key at all
        dict(page_size=None, B=2, cap=24, Sq=5, Sq_new=5, Hq=4, Hk=2),
        lambda B, Sq, Hq, cap: dict(
            mask=lambda b, h, q, kv: (b + q) % 2 == 1,
            score_mod=lambda s, b, h, q, kv: s - 0.1 * (q - kv).abs(),
        ),
    ),
}


def _run(name, dtype, backend="triton"):
    shape, make = CASES[name]
    flags = make(shape["B"], shape["Sq"], shape["Hq"], shape["cap"])
    with torch.no_grad():  # (the learnable table: read only, no gradient wanted)
        return run_case(dtype=dtype, backend=backend, **shape, **flags)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_mods_in_decode_kernel_against_oracle(case, dtype):
    _run(case, dtype)


def test_rows_that_see_no_key_give_zero_and_minus_inf():
    out, lse = _run("contig_sq5_mod_then_mask_some_rows_empty", torch.float32)
    empty = (torch.arange(2)[:, None] + torch.arange(5)[None, :]) % 2 == 0  # (B, Sq)
    assert torch.all(out[empty] == 0) and torch.all(out[~empty].abs().sum(-1) > 0)
    lse = lse.transpose(1, 2)  # (B, Sq, Hq)
    assert torch.all(lse[empty] == float("-inf")) and lse[~empty].isfinite().all()


@pytest.mark.parametrize("case", ["page16_sq5_document", "contig_sq5_mod_then_mask_some_rows_empty"])
def test_forced_splits_with_mods(case, monkeypatch):
    """Three splits, some of which see no key of a row (lse -inf partials), merged by the combine kernel."""
    monkeypatch.setattr(dec_ops, "num_splits", lambda *a: 3)
    _run(case, torch.float32)


@pytest.mark.parametrize("case", ["page16_sq5_document", "contig_sq5_mask_mod_heads"])
def test_reference_path_with_mods(case):
    """The gathered-keys path (backend="reference") with the same masks, mods and alignment."""
    _run(case, torch.float32, backend="reference")


def _small(paged=False, cap=16):
    c = Cache(2, cap, 2, 8, 8, torch.float32, 4 if paged else None)
    q = torch.randn(2, 1, 4, 8, device=DEV)
    lens = torch.tensor([3, cap - 1], dtype=torch.int32, device=DEV)
    return c, q, dict(cache_seqlens=lens, block_table=c.table)


def test_refusals_name_the_reason():
    c, q, kw = _small()
    with pytest.raises(attnkit.UnsupportedError, match="aten::sort"):
        attnkit.attention_with_kvcache(
            q,
            c.k,
            c.v,
            score_mod=lambda s, b, h, qi, kv: torch.sort(s, dim=-1).values,
            backend="triton",
            **kw,
        )
    table = torch.randn(4, 5, device=DEV, requires_grad=True)
    with pytest.raises(attnkit.UnsupportedError, match="no backward.*require grad"):
        attnkit.attention_with_kvcache(
            q, c.k, c.v, score_mod=mods.relative_bias(table), backend="triton", **kw
        )
    with pytest.raises(attnkit.UnsupportedError, match="no backward"):  # (q itself, as before for flags)
        attnkit.attention_with_kvcache(q.requires_grad_(), c.k, c.v, backend="triton", **kw)
    # where gradients are wanted, auto takes the gathered keys, which give them
    out = attnkit.attention_with_kvcache(q, c.k, c.v, score_mod=mods.relative_bias(table), **kw)
    out.square().sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0 and q.grad is not None


def test_mask_data_checked_against_the_capacity():
    """A mask's tensors are checked against Sq and the cache capacity (every position a row may reach)."""
    c, q, kw = _small(paged=True, cap=16)
    ids = torch.zeros(2, 1, dtype=torch.int32, device=DEV)
    good = M.document(ids, torch.zeros(2, 16, dtype=torch.int32, device=DEV))
    attnkit.attention_with_kvcache(q, c.k, c.v, mask=good, backend="triton", **kw)
    short = M.document(ids, torch.zeros(2, 15, dtype=torch.int32, device=DEV))
    with pytest.raises(attnkit.AttentionInputError, match="kv_doc_ids"):  # (a plan of the good one is kept)
        attnkit.attention_with_kvcache(q, c.k, c.v, mask=short, backend="triton", **kw)


def test_decode_loop_with_a_mod_prepares_once(monkeypatch):
    """A loop that builds its mod afresh each step (new slopes, new lambda) keeps one plan and compiles once;
    every step's values are its own (checked against the gathered-keys reference)."""
    c, q, kw = _small(paged=True)
    calls = []
    real = kvcache._prepare
    monkeypatch.setattr(kvcache, "_prepare", lambda *a: calls.append(1) or real(*a))
    generated = None
    for step in range(3):
        slopes = torch.rand(4, device=DEV) * (step + 1)

        def mod(s, b, h, qi, kv, slopes=slopes):
            return s - slopes[h] * (qi - kv).abs()

        banned = torch.tensor([step, 2 * step], device=DEV)  # per row (data: a number is baked into code)
        flags = dict(score_mod=mod, mask=lambda b, h, qi, kv, banned=banned: kv != banned[b], **kw)
        out = attnkit.attention_with_kvcache(q, c.k, c.v, backend="triton", **flags)
        ref = attnkit.attention_with_kvcache(q, c.k, c.v, backend="reference", **flags)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if step == 0:
            generated = compiler.GENERATED[0]
    n_triton = len(calls)
    assert compiler.GENERATED[0] == generated
    # one preparation for the kernel's plan (step 0) and one per step for the reference path (never kept)
    assert n_triton == 1 + 3
    # a window object of other sizes: another plan, not the kept one
    for left in (2, 6):
        out = attnkit.attention_with_kvcache(q, c.k, c.v, mask=M.sliding_window(left), backend="triton", **kw)
        ref = attnkit.attention_with_kvcache(
            q, c.k, c.v, mask=M.sliding_window(left), backend="reference", **kw
        )
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# -- GPU only ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("Sq", [1, 4])
def test_gpu_bf16_mods_auto_takes_the_kernel(page_size, Sq):
    """bf16, 32/8 heads, D=128, thousands of keys (several splits): ALiBi mod and a document mask on the
    kernel, against the oracle; ``auto`` plans the kernel for them and gives the kernel's numbers."""
    B, cap, Hq = 2, 4608, 32
    flags = dict(
        score_mod=mods.alibi(torch.rand(Hq, device=DEV) * 0.01),
        mask=M.document(_doc_ids(B, Sq, 2), _doc_ids(B, cap, 5)),
        causal=True,
    )
    shape = dict(page_size=page_size, B=B, cap=cap, Sq=Sq, Sq_new=Sq, Hq=Hq, Hk=8, D=128, Dv=128)
    out, lse = run_case(dtype=torch.bfloat16, **shape, **flags)
    c = Cache(B, cap, 8, 128, 128, torch.bfloat16, page_size)
    q = torch.randn(B, Sq, Hq, 128, device=DEV, dtype=torch.bfloat16)
    kw = dict(cache_seqlens=torch.tensor([100, cap - 1], dtype=torch.int32, device=DEV), block_table=c.table)
    kvcache._PLANS.clear()
    auto = attnkit.attention_with_kvcache(q, c.k, c.v, **kw, **flags)
    plans = list(kvcache._PLANS.values())
    assert len(plans) == 1 and plans[0].decode_args is not None and plans[0].mods
    tri = attnkit.attention_with_kvcache(q, c.k, c.v, backend="triton", **kw, **flags)
    assert torch.equal(auto, tri)


@pytest.mark.parametrize(
    "kw",
    [
        dict(score_mod=lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0), causal=True),
        dict(mask=lambda b, h, q, kv: (kv + h + q) % 3 != 1),
        dict(mask=M.sliding_window(5), score_mod=lambda s, b, h, q, kv: s - 0.1 * (q - kv).abs()),
    ],
    ids=["tanh_causal", "mask_mod_heads", "window_and_mod"],
)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_attention_short_queries_take_mods_on_the_decode_kernel(kw, layout):
    """``attention()`` with a few query rows runs score_mod / mask on the split-KV decode kernel
    (``backend="triton_decode"``), equal to the oracle, GQA query heads, Sq != Sk aligned bottom-right."""
    import oracle

    q, k, v, extra = oracle.make_inputs(
        layout, B=2, Hq=4, Hk=2, Sq=3, Sk=37, D=16, dtype=torch.float32, device=DEV
    )
    tri = lambda *a, **k2: attnkit.attention(*a, backend="triton_decode", **k2)  # noqa: E731
    oracle.check_against_oracle(tri, q, k, v, **kw, **extra)
