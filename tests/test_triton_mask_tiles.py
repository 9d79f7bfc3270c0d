"""Block sparsity for masks the triton backend evaluates in its kernels (no interval lowering: ``mask_mod``
callables, ``|``, ``~``, ``neighborhood_2d``, unsorted document ids): per-tile states computed on the device
(``backends/triton/ops/tiles.py``), empty tiles skipped, full tiles unmasked. The states against each mask's
dense definition (exact), the kernels (forward, lse, dq/dk/dv) against the float64 oracle, the skipping
itself (NaN keys only empty tiles see), and the memo. Interpreter on the CPU (fp16/fp32, 16x16 tiles in
the attention kernels), natively (bf16) on a GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attnkit
import oracle
from attnkit import masks as M
from attnkit import mods
from attnkit._call import normalize

tiles = pytest.importorskip("attnkit.backends.triton.ops.tiles")
from attnkit.backends.triton import backend as _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.usefixtures("poison_triton_outputs")  # (conftest.py)
tri = oracle.tri


def _blocks(size):
    """Checkerboard of size x size blocks: whole tiles kept (full) and dropped (empty) at tile = size."""
    return lambda b, h, i, j: (i // size + j // size) % 2 == 0


def _mixed():
    """Empty, full and partial 16x16 tiles: the checkerboard, a 1-wide band and a global first column."""
    return M.sliding_window(1) | _blocks(16) | (lambda b, h, i, j: j == 0)


def _masks(B, H, Sq, Sk):
    """Masks without an interval lowering, by name (captured tensors per batch element and per head)."""
    ids = torch.randint(0, 3, (B, max(Sq, Sk)), device=DEV)  # interleaved documents (not sorted)
    width = torch.arange(H, device=DEV) * 3 + 2  # a window per head
    return {
        "mixed": _mixed(),
        "neighborhood_or_causal": M.neighborhood_2d(6, 8, 3) | M.causal(),
        "window_or_global": M.sliding_window(5) | (lambda b, h, i, j: j < 2),
        "not_chunked": ~M.chunked(16),
        "interleaved_docs": M.document(ids[:, :Sq], ids[:, :Sk]),
        "per_head_window": lambda b, h, i, j: (i - j).abs() <= width[h],
        "rows_without_keys": lambda b, h, i, j: (i >= 20) & (j <= i) & (j >= 4),
    }


def _params(q, k, v, mask, **kw):
    """What the launchers get for a call whose mask is evaluated in the kernels (the fields tiles reads)."""
    call = normalize(q, k, v, mask=mask, **kw)
    view = _backend._mask_as_mod(call)
    assert view is not call, "this mask lowers to intervals: not a tile-states case"
    key, c0, c1, c2, c3, meta = _backend._score_mod_args(view)
    p = SimpleNamespace(
        score_mod=key, smod_c0=c0, smod_c1=c1, smod_c2=c2, smod_c3=c3, smod_meta=meta, layout=call.layout,
        max_seqlen_q=int(call.Sq), max_seqlen_k=int(call.Sk), q=call.q, cu_seqlens_q=call.cu_seqlens_q,
        cu_seqlens_k=call.cu_seqlens_k,
    )  # fmt: skip
    return p, call


def _dense_states(dense, BM, BN):
    """(..., Sq, Sk) bool -> (..., ceil(Sq / BM), ceil(Sk / BN)) int8: 0 none kept, 2 all kept, else 1."""
    Sq, Sk = dense.shape[-2:]
    nm, nn = -(-Sq // BM), -(-Sk // BN)
    kept = torch.zeros(dense.shape[:-2] + (nm * BM, nn * BN), dtype=torch.int32)
    valid = torch.zeros_like(kept)
    kept[..., :Sq, :Sk] = dense.int()
    valid[..., :Sq, :Sk] = 1
    tile = (*dense.shape[:-2], nm, BM, nn, BN)
    k, n = kept.view(tile).sum((-3, -1)), valid.view(tile).sum((-3, -1))
    return torch.where(k == 0, 0, torch.where(k == n, 2, 1)).to(torch.int8)


# -- the states ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("BM,BN", [(16, 16), (16, 32), (32, 16)])
@pytest.mark.parametrize("Sq,Sk", [(48, 48), (40, 57)])
def test_states_equal_the_dense_mask_per_tile(BM, BN, Sq, Sk):
    B, H = 2, 3
    q, k, v, _ = oracle.make_inputs("bhsd", B=B, Hq=H, Sq=Sq, Sk=Sk, D=16, device=DEV)
    for name, mask in _masks(B, H, Sq, Sk).items():
        p, call = _params(q, k, v, mask)
        st = tiles.states(p, B, H, BM, BN)
        dense = call.mask.to_dense(B, H, Sq, Sk, device=DEV).cpu()
        want = _dense_states(dense, BM, BN)
        # O(tiles), broadcast over the dims the mask does not read
        b_dim = B if name == "interleaved_docs" else 1
        h_dim = H if name == "per_head_window" else 1
        assert st.dtype == torch.int8 and st.shape == (b_dim, h_dim, -(-Sq // BM), -(-Sk // BN)), name
        assert torch.equal(st.cpu().expand_as(want), want), name
        if name == "mixed" and (BM, BN) == (16, 16):
            assert set(st.unique().tolist()) == {0, 1, 2}  # (this test sees all three kinds)


def test_states_thd_per_sequence():
    """thd: one row of states per sequence, tiles counted inside it, ``off`` its own Sk - Sq."""
    lq, lk = [5, 0, 33, 20], [9, 4, 30, 20]
    q, k, v, kw = oracle.make_inputs("thd", Hq=2, D=16, seqlens_q=lq, seqlens_k=lk, device=DEV)
    mask = M.sliding_window(3) | (lambda b, h, i, j: j < 2)
    p, call = _params(q, k, v, mask, **kw)
    st = tiles.states(p, len(lq), 2, 16, 16).cpu()
    assert st.shape == (len(lq), 1, -(-max(lq) // 16), -(-max(lk) // 16))
    for n, (a, b) in enumerate(zip(lq, lk)):
        want = _dense_states(call.mask.to_dense(1, 1, a, b, device=DEV).cpu()[0, 0], 16, 16)
        got = st[n, 0]
        assert torch.equal(got[: want.shape[0], : want.shape[1]], want), n
        assert bool((got[want.shape[0] :] == 0).all()) and bool((got[:, want.shape[1] :] == 0).all())


def test_states_are_memoized_on_the_mask_data(monkeypatch):
    """A second call computes nothing (forward and backward share the states at equal tiles: one launch in
    the interpreter, at most one per distinct tile shape natively); an in-place change of a captured tensor,
    or a new one, does."""
    launches = []
    real = tiles.compute
    monkeypatch.setattr(tiles, "compute", lambda *a: launches.append(a[3:5]) or real(*a))
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=32, D=16, device=DEV, requires_grad=True)
    cols = torch.tensor([0, 5], device=DEV)
    mask = M.sliding_window(3) | (lambda b, h, i, j: (j == cols[i * 0]) | (j == cols[i * 0 + 1]))
    tri(q, k, v, mask=mask).sum().backward()
    first = len(launches)
    assert 1 <= first == len(set(launches)) <= 3  # (one per tile shape: fwd, dK/dV, dQ)
    if not HAS_CUDA:
        assert first == 1
    tri(q, k, v, mask=mask).sum().backward()
    assert len(launches) == first
    cols.add_(1)  # (a new version: the states are stale)
    want = attnkit.attention(q, k, v, mask=mask, backend="reference")
    assert (tri(q, k, v, mask=mask) - want).abs().max() < 1e-3
    assert len(launches) == first + 1
    tri(q, k, v, mask=M.sliding_window(3) | (lambda b, h, i, j: j == 7))
    assert len(launches) == first + 2


# -- the kernels against the oracle -------------------------------------------------------------------------
def _check(q, k, v, mask, **kw):
    return oracle.check_against_oracle(tri, q, k, v, mask=mask, **kw)


@pytest.mark.parametrize("name", ["mixed", "neighborhood_or_causal", "not_chunked", "interleaved_docs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_masks_fwd_bwd(name, dtype):
    B, Hq, S = 2, 2, 48
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=B, Hq=Hq, Hk=1, Sq=S, D=16, dtype=dtype, device=DEV, requires_grad=True
    )
    _check(q, k, v, _masks(B, Hq, S, S)[name], **kw)


@pytest.mark.parametrize("Sq,Sk", [(23, 50), (50, 23)])
def test_sq_ne_sk_gqa_per_head_and_empty_rows(Sq, Sk):
    B, Hq = 1, 4
    q, k, v, kw = oracle.make_inputs(
        "bshd", B=B, Hq=Hq, Hk=2, Sq=Sq, Sk=Sk, D=16, device=DEV, requires_grad=True
    )
    masks = _masks(B, Hq, Sq, Sk)
    _check(q, k, v, masks["per_head_window"], **kw)
    res = _check(q, k, v, masks["rows_without_keys"], **kw)
    assert bool((res["lse"][:, :, :20] == float("-inf")).all())  # (bshd lse is (B, H, Sq))
    assert bool((res["out"][:, :20] == 0).all())


def test_thd_and_a_score_mod_with_the_mask():
    lq = [5, 0, 33, 20]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=2, Hk=1, D=16, seqlens_q=lq, device=DEV, requires_grad=True, dtype=torch.float16
    )
    mask = M.sliding_window(3) | (lambda b, h, i, j: j < 2)
    _check(q, k, v, mask, score_mod=mods.softcap(5.0), **kw)


def test_captured_tensor_gradient_through_a_score_mod_beside_the_mask():
    """A learnable relative bias next to a mask evaluated per tile: full tiles run the inner mod alone,
    partial ones mask it; the table's gradient against float64 through the reference backend."""
    S = 40
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=S, D=16, device=DEV, requires_grad=True)
    table = torch.randn(2 * S + 1, device=DEV, requires_grad=True)
    mask = _mixed()
    res = _check(q, k, v, mask, score_mod=mods.relative_bias(table), **kw)
    g = torch.randn(res["out"].shape, device=DEV)
    t32 = table.detach().clone().requires_grad_(True)
    t64 = table.detach().double().requires_grad_(True)
    qi, ki, vi = (res["inputs"][n].detach() for n in "qkv")
    tri(qi, ki, vi, mask=mask, score_mod=mods.relative_bias(t32)).backward(g)
    out64 = attnkit.attention(
        qi.double(),
        ki.double(),
        vi.double(),
        mask=mask,
        score_mod=mods.relative_bias(t64),
        backend="reference",
    )
    out64.backward(g.double())
    err = (t32.grad.double() - t64.grad).abs().max()
    assert err < 1e-4 * max(1.0, float(t64.grad.abs().max())), err


def test_empty_tiles_are_skipped():
    """Keys only empty tiles see are NaN in K and V: a kernel that visited those tiles would give NaN
    (0 * NaN in P V, and NaN scores), forward and backward; with tile states off, it does. The NaN keys fill
    whole key tiles at any tile size up to ``T`` (16 in the interpreter, 128 on a GPU), between two non-empty
    tiles of the last query tiles (skipped inside the loop, not cut off its ends)."""
    T = 16 if DEV == "cpu" else 128
    S = 4 * T
    q, k, v, kw = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=S, D=16, device=DEV, requires_grad=True)
    # keys 2..2T-1 unseen
    mask = M.full() & (lambda b, h, i, j: (j < 2) | ((j >= 2 * T) & ((i - j).abs() <= 4)))
    want = _check(q, k, v, mask, **kw)
    kn, vn = (t.detach().clone() for t in (k, v))
    kn[:, :, T : 2 * T], vn[:, :, T : 2 * T] = float("nan"), float("nan")
    qn, kn, vn = (t.requires_grad_(True) for t in (q.detach().clone(), kn, vn))
    out = tri(qn, kn, vn, mask=mask)
    assert torch.equal(out, want["out"].detach())
    out.backward(torch.randn_like(out))
    assert all(bool(t.grad.isfinite().all()) for t in (qn, kn, vn))
    unseen = slice(2, 2 * T)
    assert bool((kn.grad[:, :, unseen] == 0).all()) and bool((vn.grad[:, :, unseen] == 0).all())
    with pytest.MonkeyPatch.context() as mp:  # (the per-element path visits them: the test can fail)
        mp.setenv("ATTNKIT_TRITON_TILE_STATES", "0")
        assert bool(tri(qn, kn, vn, mask=mask).isnan().any())


def test_cost_model_sees_the_sparsity():
    """The cost of a sparse mask evaluated per tile falls with the tiles it leaves (sampled, memoized)."""
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=2, Sq=1024, D=16, device=DEV)
    be = _backend.BACKEND

    def pairs(mask):
        view = _backend._mask_as_mod(normalize(q, k, v, mask=mask))
        return be._flops_pairs(view)[1]

    dense = 1024 * 1024.0
    assert pairs(M.sliding_window(1) | (lambda b, h, i, j: i >= 0)) == dense
    sparse = pairs(M.sliding_window(64) | (lambda b, h, i, j: j == 0))
    assert sparse < 0.4 * dense
    report = str(
        attnkit.explain(q, k, v, mask=M.sliding_window(64) | (lambda b, h, i, j: j == 0), backend="triton")
    )
    assert "per-tile states" in report, report


# -- on the GPU (bf16, native tiles) ------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mixed", "neighborhood_or_causal", "window_or_global", "not_chunked",
                                  "interleaved_docs", "per_head_window", "rows_without_keys"])  # fmt: skip
def test_cuda_bf16_masks(name):
    B, Hq, S = 2, 4, 1024
    q, k, v, kw = oracle.make_inputs(
        "bhsd", B=B, Hq=Hq, Hk=2, Sq=S, D=64, dtype=torch.bfloat16, device="cuda", requires_grad=True
    )
    _check(q, k, v, _masks(B, Hq, S, S)[name], **kw)


@pytest.mark.cuda
def test_cuda_empty_tiles_are_skipped_at_native_tiles():
    S = 1024
    q, k, v, _ = oracle.make_inputs("bhsd", B=1, Hq=4, Sq=S, D=128, dtype=torch.bfloat16, device="cuda")
    mask = M.full() & (lambda b, h, i, j: (j < 16) | ((j >= 512) & ((i - j).abs() <= 64)))
    want = tri(q, k, v, mask=mask)
    k[:, :, 128:384], v[:, :, 128:384] = float("nan"), float("nan")  # (keys 16..447: seen by nobody)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = tri(q, k, v, mask=mask)
    assert torch.equal(out, want)
    out.backward(torch.randn_like(out))
    assert all(bool(t.grad.isfinite().all()) for t in (q, k, v))


@pytest.mark.cuda
def test_cuda_thd_bf16():
    lq = [300, 1, 700, 129]
    q, k, v, kw = oracle.make_inputs(
        "thd", Hq=4, Hk=1, D=64, seqlens_q=lq, device="cuda", requires_grad=True, dtype=torch.bfloat16
    )
    _check(q, k, v, M.neighborhood_2d(16, 16, 5) | (lambda b, h, i, j: j < 4), **kw)
