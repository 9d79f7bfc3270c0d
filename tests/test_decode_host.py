"""Host work of a decode call (``attention_with_kvcache``, ``triton_decode``): what it dispatches and reads.

A decode step's GPU work at small batch is a few microseconds, so its latency is the host's: every torch op
costs a dispatch (and, on CUDA, often a launch), and a value read (``.item()``, ``.tolist()``, ``bool(t)``)
waits for the device and breaks CUDA-graph capture. These tests hold a repeated call with
``validate=False`` to its floor: no value read at all (first call included: a graph may capture it), and
no torch op but the ``torch.empty`` of its outputs and split workspaces. The Triton launches are replaced
by recorders (on the CPU the interpreter would run torch ops of its own); ``test_kvcache.py`` checks the
numbers with the real kernels, and the GPU test at the end captures the calls in a CUDA graph.
"""

from __future__ import annotations

import collections
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import attnkit  # noqa: E402
import oracle  # noqa: E402

dec_ops = pytest.importorskip("attnkit.backends.triton.ops.decode")
from attnkit.backends.triton.ops import combine as comb_ops  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16
# what a warm call may dispatch: torch.empty of out and lse, and with several splits of the partial outputs
# and lses (one each); views, index math, fills, copies or a lengths tensor would each add one
MAX_OPS = 4
# value reads that sync a CUDA device (and fail inside graph capture)
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class _Ops(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Launcher:
    """Stands in for a ``Launch``: records the grid of every launch, runs nothing."""

    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self.name, tuple(grid)))


@pytest.fixture
def launches(monkeypatch):
    log: list = []
    monkeypatch.setattr(dec_ops, "_KERNEL", _Launcher(log, "decode"))
    monkeypatch.setattr(dec_ops, "_APPEND", _Launcher(log, "append"))
    monkeypatch.setattr(comb_ops, "_COMBINE", _Launcher(log, "combine"))
    monkeypatch.setattr(dec_ops, "POISON", False)
    return log


@pytest.fixture
def no_reads(monkeypatch):
    """Every value read of a tensor raises (a sync on CUDA)."""

    def forbid(name):
        def read(self, *a, **k):
            raise AssertionError(f"Tensor.{name} on the decode path with validate=False (a host sync)")

        return read

    def arm():
        for name in _READS:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return arm


def _case(B, cap, Hq, Hk, D, page_size, append):
    q = oracle.randn((B, 1, Hq, D), DT, DEV)
    if page_size is None:
        k, v, table = oracle.randn((B, cap, Hk, D), DT, DEV), oracle.randn((B, cap, Hk, D), DT, DEV), None
    else:
        n = B * cap // page_size
        k, v = (oracle.randn((n, page_size, Hk, D), DT, DEV) for _ in range(2))
        table = torch.randperm(n).view(B, -1).to(torch.int32).to(DEV)
    lens = torch.randint(0, cap - 1, (B,)).to(torch.int32).to(DEV)
    kn = oracle.randn((B, 1, Hk, D), DT, DEV) if append else None
    kw = dict(cache_seqlens=lens, k_new=kn, v_new=kn, block_table=table, causal=True)
    return q, k, v, kw


SHAPES = [  # ((B, cap, Hq, Hk, D), split): one split (the grid fills the machine) and several
    pytest.param(((4, 64, 4, 2, 16), False), id="one_split"),
    # (several splits need >= 8 key blocks a split: 16-key blocks in the interpreter, 64 on a GPU)
    pytest.param(((1, 4096 if torch.cuda.is_available() else 256, 4, 1, 16), True), id="splits"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("append", [False, True])
def test_warm_decode_call_dispatches_only_its_outputs(launches, no_reads, shape, page_size, append):
    shape, split = shape
    q, k, v, kw = _case(*shape, page_size, append)
    no_reads()
    attnkit.attention_with_kvcache(q, k, v, backend="triton", validate=False, **kw)  # builds the plans
    first = len(launches)
    with _Ops() as mode:
        attnkit.attention_with_kvcache(q, k, v, backend="triton", validate=False, return_lse=True, **kw)
        attnkit.attention_with_kvcache(q, k, v, backend="triton", validate=False, **kw)
    names = [n for n, _ in launches[first:]]
    splits = launches[first + (1 if append else 0)][1][0]
    assert (splits > 1) == split
    assert names.count("decode") == 2 and names.count("append") == (2 if append else 0)
    assert names.count("combine") == (2 if splits > 1 else 0)
    assert set(mode.ops) == {"empty"}, dict(mode.ops)
    assert mode.ops["empty"] == 2 * (4 if splits > 1 else 2) <= 2 * MAX_OPS


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_warm_triton_decode_backend_dispatches_only_its_outputs(launches, no_reads, layout):
    """attention() on the decode kernel: no lengths tensor (the kernel's FULL), no transposes."""
    q, k, v, kw = oracle.make_inputs(layout, B=1, Hq=4, Hk=1, Sq=1, Sk=256, D=16, device=DEV, dtype=DT)
    no_reads()
    attnkit.attention(q, k, v, backend="triton_decode", **kw)  # (the first call of a signature too)
    with _Ops() as mode:
        attnkit.attention(q, k, v, backend="triton_decode", **kw)
    assert set(mode.ops) <= {"empty"} and mode.ops["empty"] <= MAX_OPS, dict(mode.ops)


def test_warm_cascade_reads_no_value_and_takes_the_decode_kernel_twice(launches, no_reads):
    """cascade_attention with validate=False: no value read (a CUDA graph captures it), the prefix on the
    decode kernel (one launch for every row's queries, its combine when the prefix's keys are split) beside
    the suffixes' launch and their append, one merge; torch ops only for outputs, the prefix's one-row
    lengths and the merge's stacking."""
    B, Hq, Hk, D, S_p = 3, 4, 2, 16, 256
    q, k, v, kw = _case(B, 64, Hq, Hk, D, None, True)
    kw.pop("block_table")
    sk, sv = (oracle.randn((S_p, Hk, D), DT, DEV) for _ in range(2))
    no_reads()
    attnkit.cascade_attention(q, sk, sv, k, v, backend="triton", validate=False, **kw)
    first = len(launches)
    with _Ops() as mode:
        attnkit.cascade_attention(q, sk, sv, k, v, backend="triton", validate=False, **kw)
    names = [n for n, _ in launches[first:]]
    assert names.count("decode") == 2 and names.count("append") == 1, names
    grids = [g for n, g in launches[first:] if n == "decode"]
    assert names.count("combine") == 1 + sum(g[0] > 1 for g in grids), names  # the merge, and any split
    assert grids[1][1] == Hk, grids  # the prefix: one row, every KV head once
    allowed = {"empty", "full", "stack", "view", "unsqueeze", "transpose", "select"}
    assert set(mode.ops) <= allowed, dict(mode.ops)


def test_plan_cache_keeps_every_check(launches):
    """A call whose shapes match a cached plan still fails for each bad argument the full path rejects:
    only validated calls are stored, and scalars are keyed with their types (``1 == True`` in a dict)."""
    q, k, v, kw = _case(2, 64, 4, 2, 16, None, False)
    attnkit.attention_with_kvcache(q, k, v, backend="triton", validate=False, **kw)
    bad = [
        dict(causal=1),
        dict(window=(1.0, 2)),
        dict(softcap=float("nan")),
        dict(cache_seqlens=kw["cache_seqlens"].long()),
        dict(cache_seqlens=kw["cache_seqlens"].tolist()),
    ]
    for change in bad:
        with pytest.raises(attnkit.AttentionInputError):
            attnkit.attention_with_kvcache(q, k, v, backend="triton", validate=False, **{**kw, **change})
    with pytest.raises(attnkit.AttentionInputError, match="validate"):
        attnkit.attention_with_kvcache(q, k, v, backend="triton", validate=1, **kw)
    with pytest.raises(attnkit.AttentionInputError):
        attnkit.attention_with_kvcache(q, k, v[:, :, :1], backend="triton", validate=False, **kw)


def test_validate_true_reads_the_values_once(monkeypatch, launches):
    """validate=True costs exactly one value read (a sync on CUDA: documented in docs/decoding.md)."""
    q, k, v, kw = _case(2, 64, 4, 2, 16, 16, True)
    attnkit.attention_with_kvcache(q, k, v, backend="triton", **kw)
    reads = collections.Counter()
    for name in _READS:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _orig=orig, **kw_):
            reads[_name] += 1
            return _orig(self, *a, **kw_)

        monkeypatch.setattr(torch.Tensor, name, counted)
    attnkit.attention_with_kvcache(q, k, v, backend="triton", **kw)
    assert dict(reads) == {"tolist": 1}


@pytest.mark.parametrize("page_size", [None, 4])
def test_a_kept_plan_serves_new_tensors(page_size, monkeypatch):
    """The real kernels (interpreter on the CPU): calls of one signature on fresh caches, lengths, tables
    and new tokens, through the kept plans, give bit for bit what the same calls give with every plan built
    anew (the plan keeps no tensor; several splits and the append included). Numbers: test_kvcache.py."""
    from attnkit import kvcache

    def call(q, k, v, kw):
        kw = dict(kw, backend="triton", validate=False, return_lse=True)
        return attnkit.attention_with_kvcache(q, k, v, **kw)

    q, k, v, kw = _case(1, 256, 4, 1, 16, page_size, True)
    call(q, k, v, kw)  # the plans of this signature
    for _ in range(2):
        q, k, v, kw = _case(1, 256, 4, 1, 16, page_size, True)
        kw["v_new"] = oracle.randn(kw["k_new"].shape, DT, DEV)
        k2, v2 = k.clone(), v.clone()
        kept = call(q, k, v, kw)
        for mod, name in ((kvcache, "_PLANS"), (dec_ops, "_PLANS"), (dec_ops, "_APPEND_PLANS")):
            monkeypatch.setattr(mod, name, {})
        fresh = call(q, k2, v2, kw)
        assert all(torch.equal(a, b) for a, b in zip(kept + (k, v), fresh + (k2, v2)))


# -- GPU only ---------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_triton_decode_backend_in_a_cuda_graph(layout):
    """attention() on the decode kernel, captured and replayed on new inputs: the oracle's answer."""
    q, k, v, kw = oracle.make_inputs(
        layout, B=1, Hq=32, Hk=8, Sq=1, Sk=8192, D=128, device="cuda", dtype=torch.bfloat16
    )
    attnkit.attention(q, k, v, backend="triton_decode", **kw)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a warm call syncs nothing
    try:
        attnkit.attention(q, k, v, backend="triton_decode", **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = attnkit.attention(q, k, v, backend="triton_decode", **kw)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    g.replay()
    want = attnkit.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_cascade_in_a_cuda_graph():
    """cascade_attention (validate=False) captured and replayed on new queries and caches: the same as
    decoding each row over its concatenated keys."""
    B, Hq, Hk, D, S_p, own = 8, 32, 8, 128, 4096, 512
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(B, 1, Hq, D, **bf)
    sk, sv = (torch.randn(S_p, Hk, D, **bf) for _ in range(2))
    k, v = (torch.randn(B, own, Hk, D, **bf) for _ in range(2))
    lens = torch.randint(1, own, (B,), device="cuda", dtype=torch.int32)

    def step():
        return attnkit.cascade_attention(
            q, sk, sv, k, v, cache_seqlens=lens, backend="triton", validate=False
        )

    step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for t in (q, sk, sv, k, v):
        t.copy_(torch.randn_like(t))
    lens.copy_(torch.randint(1, own, (B,), device="cuda", dtype=torch.int32))
    g.replay()
    full_k = torch.cat([sk.expand(B, -1, -1, -1), k], dim=1)
    full_v = torch.cat([sv.expand(B, -1, -1, -1), v], dim=1)
    want = attnkit.attention_with_kvcache(q, full_k, full_v, cache_seqlens=lens + S_p, backend="reference")
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
