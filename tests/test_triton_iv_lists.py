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
from test_triton_iv_body import CASES, _force, _ids  # noqa: E402

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
