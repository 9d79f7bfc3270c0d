"""The peers in the benchmarks and at import: a peer that is installed but does not import is a reason,
never a crash (of dispatch or of a benchmark); the benchmarks call the peers as their APIs say. CPU only,
with stand-ins (tests/test_peers.py's FA4 semantics in float64)."""

from __future__ import annotations

import importlib.util
import sys

import torch

import attnkit
from attnkit import dispatch
from attnkit.backends import _cute, _optional
from attnkit.backends import xformers as xformers_backend
from test_peers import _fa_semantics, _fake_fa4

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# a peer that is installed but does not import: a reason, never a crash (of dispatch or of a benchmark)
# ----------------------------------------------------------------------------------------------------------
def _broken_xformers():
    # what the H200 image raised: flash_attn is FA4's namespace package, without FA2's interface
    raise ModuleNotFoundError("No module named 'flash_attn.flash_attn_interface'")


def test_find_problem_reports_any_exception_of_a_parent_import(monkeypatch):
    def find_spec(name):
        raise RuntimeError("xformers/__init__.py exploded")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    why = _cute.find_problem("not_a_module_xyz.ops", "xyz")
    assert "RuntimeError" in why and "exploded" in why
    assert not _cute.findable("not_a_module_xyz.ops")
    assert not _optional._found("not_a_module_xyz.ops")
    monkeypatch.undo()
    assert "is not installed" in _cute.find_problem("not_a_module_xyz.ops", "xyz")  # no parent package


def test_xformers_that_does_not_import_is_unavailable_with_the_reason(monkeypatch):
    monkeypatch.setattr(_cute, "find_problem", lambda name, package: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(xformers_backend, "xformers_ops", _broken_xformers)
    monkeypatch.setattr(xformers_backend, "_IMPORT_ERROR", [])
    be = xformers_backend.XFormersBackend()
    assert be._check_available() == (True, None)  # (the cheap part, checked at import attnkit)
    why = be.import_problem()  # (the import, at the first call or attnkit info)
    assert "ModuleNotFoundError" in why and "flash_attn_interface" in why
    monkeypatch.setattr(dispatch, "_REGISTRY", {"xformers": be})
    monkeypatch.setattr(dispatch, "_LOADED", True)
    (rec,) = dispatch.backends()
    assert not rec.available and rec.reason == why


def test_bench_kernels_drops_a_peer_that_does_not_import(monkeypatch, capsys):
    from attnkit.bench import kernels

    records = [dispatch.BackendRecord(n, True, None, "") for n in ("flash_attn4", "flex_flash", "xformers")]
    monkeypatch.setattr(attnkit, "backends", lambda: records)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _fake_fa4([]))
    monkeypatch.setattr(_cute, "_IMPORT_ERROR", [None])
    monkeypatch.setattr(xformers_backend, "_IMPORT_ERROR", [None])  # the adapter's check passed ...
    monkeypatch.setitem(sys.modules, "xformers.ops", None)  # ... but the direct import fails
    monkeypatch.setattr(kernels, "_NOTED", set())
    run = kernels._peer_runners(False)
    assert set(run) == {"attnkit:flash_attn4", "attnkit:flex_flash", "attnkit:xformers", kernels.FA4_DIRECT}
    out = capsys.readouterr().out
    assert out.count("drops out") == 1 and f"{kernels.XFORMERS_DIRECT} drops out" in out

    monkeypatch.setattr(xformers_backend, "_IMPORT_ERROR", [])
    monkeypatch.setattr(xformers_backend, "xformers_ops", _broken_xformers)
    monkeypatch.setattr(kernels, "_NOTED", set())
    assert "attnkit:xformers" not in kernels._peer_runners(False)
    assert "flash_attn_interface" in capsys.readouterr().out

    built = []
    real = kernels._peer_fn
    monkeypatch.setattr(kernels, "_peer_fn", lambda label, *a: built.append(label) or real(label, *a))
    run = kernels._peer_runners(True, {"attnkit:flash_attn4", kernels.FA4_DIRECT, "sdpa_cudnn"})
    assert set(run) == set(built) == {"attnkit:flash_attn4", kernels.FA4_DIRECT}  # only the kept peers


def _fake_fa4_paged(q, k, v, page_table=None, seqused_k=None, **rest):
    """FA4's paged varlen call as its interface.py asserts it (no cu_seqlens: q (B, Sq, Hq, D); pages
    (num_pages, page_size, Hk, D); page_table (B, max_pages) int32; seqused_k (B,) int32), in float64."""
    assert not rest, rest
    B, Sq, Hq, D = q.shape  # a 3-D q here is what failed on the H200 ("input of rank 3")
    num_pages, ps, Hk, _ = k.shape
    assert page_table.dtype == torch.int32 and page_table.shape[0] == B and page_table.stride(-1) == 1
    assert seqused_k.dtype == torch.int32 and seqused_k.shape == (B,)
    outs = []
    for b in range(B):
        n = int(seqused_k[b])
        rows = page_table[b].long()
        kb, vb = (t[rows].reshape(-1, Hk, t.shape[-1])[:n][None] for t in (k, v))
        outs.append(_fa_semantics(q[b : b + 1], kb, vb, D**-0.5, False, (None, None), 0.0)[0])
    return torch.cat(outs), None


def test_bench_decode_calls_fa4_paged_as_its_api_says():
    from attnkit.bench import decode

    gen = torch.Generator().manual_seed(0)
    B, L, Sq, Hq, Hk, D, ps = 2, 37, 2, 4, 2, 8, 16
    q = torch.randn(B, Sq, Hq, D, dtype=F64)
    k, v = (torch.randn(B, L, Hk, D, dtype=F64) for _ in range(2))
    kp, table = decode._paged_copy(k, ps, gen)
    vp = decode._same_order(v, kp, table, ps)
    lens = torch.full((B,), L, dtype=torch.int32)
    out, _ = decode._fa4_paged_call(_fake_fa4_paged, q, kp, vp, table, lens)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref)
