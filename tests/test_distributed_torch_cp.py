"""attnkit inside PyTorch's ``context_parallel`` (docs/distributed.md, "With PyTorch's context_parallel").

Two gloo processes on the CPU (one spawn for every case, as in test_distributed.py, whose helpers these
reuse). Each rank builds the same seeded inputs and, on the WHOLE sequence, the float64 oracle and the plain
float32 baseline with their gradients; all of them go into torch's ``context_parallel(mesh, buffers=...)``
together, so torch itself cuts the expected values in its own order (head-tail with load balancing, else
contiguous), and each rank holds its shard of out (lse) and dq/dk/dv to the oracle rule. Two entries:
``F.scaled_dot_product_attention`` under ``akd.use_with_torch_context_parallel()`` (torch's CP has no CPU
SDPA handler: without attnkit this raises), and ``attnkit.attention`` on DTensor shards.
"""

from __future__ import annotations

import contextlib
import traceback

import pytest
import torch
import torch.nn.functional as F

import oracle
import test_distributed as tdist

_cp = pytest.importorskip("torch.distributed.tensor.experimental")
if not hasattr(_cp, "context_parallel") or not torch.distributed.is_available():
    pytest.skip("this torch has no tensor.experimental.context_parallel", allow_module_level=True)

# name: (entry, layout, torch's load balancing, (B, Hq, Hk, D, Dv), attention kwargs, use our context)
_CASES = {
    "sdpa_causal_balanced_gqa": ("sdpa", "bhsd", True, (2, 4, 2, 8, 8), {"causal": True}, True),
    "sdpa_causal_unbalanced": ("sdpa", "bhsd", False, (1, 2, 2, 8, 8), {"causal": True}, True),
    "sdpa_full_balanced_scale_dv": ("sdpa", "bhsd", True, (1, 2, 2, 8, 16), {"scale": 0.3}, True),
    "sdpa_full_unbalanced_mqa": ("sdpa", "bhsd", False, (1, 4, 1, 8, 8), {}, True),
    "attnkit_causal_window_balanced": (
        "attnkit",
        "bhsd",
        True,
        (1, 4, 2, 8, 8),
        {"causal": True, "window": (5, -1)},
        True,
    ),
    # torch's module style (_context_parallel_shard + _ContextParallel on the attention module)
    "module_causal_balanced_gqa": ("module", "bhsd", True, (1, 4, 2, 8, 8), {"causal": True}, True),
    "module_full_unbalanced": ("module", "bhsd", False, (1, 2, 2, 8, 8), {}, True),
    # without use_with_torch_context_parallel(): attnkit.attention reads torch's order by itself
    "attnkit_bshd_document_unbalanced": ("attnkit", "bshd", False, (1, 2, 1, 8, 8), {"mask": "doc"}, False),
    "attnkit_bshd_document_causal_balanced": (
        "attnkit",
        "bshd",
        True,
        (2, 2, 2, 8, 8),
        {"mask": "doc", "causal": True},
        False,
    ),
}


def _expected(q, k, v, dout, layout, kw):
    """Whole-sequence oracle and plain baseline: (out, lse, dq, dk, dv) of each."""
    from attnkit.backends.reference import reference_forward

    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = oracle.attention64(*ref, layout=layout, **kw)
    out64.backward(dout.double())
    base = [t.clone().requires_grad_() for t in (q, k, v)]
    outb, lseb = reference_forward(
        oracle.make_call(*base, layout=layout, return_lse=True, **kw), upcast=False
    )
    outb.backward(dout)
    return [out64, lse64, *(t.grad for t in ref)], [outb, lseb, *(t.grad for t in base)]


@contextlib.contextmanager
def _torch_sharded(entry, balance, bufs, dims, mesh):
    """torch's CP on: ``context_parallel`` (SDPA patched, buffers sharded in place), or for the module
    entry torch's newer style (``_context_parallel_shard`` + its dispatcher, the module wrapped by
    ``_ContextParallel``, as torchtitan does). Yields the local buffers (copies, valid after exit)."""
    from torch.distributed.tensor.experimental import _attention as tcp
    from torch.distributed.tensor.experimental import context_parallel

    old = tcp._cp_options.enable_load_balance
    tcp._cp_options.enable_load_balance = balance
    try:
        if entry != "module":
            with context_parallel(mesh, buffers=bufs, buffer_seq_dims=dims):
                local = [t.clone() for t in bufs]
                yield local
            return
        S = bufs[0].shape[dims[0]]
        lb = tcp._HeadTailLoadBalancer(S, mesh.size(), bufs[0].device) if balance else None
        local = tcp._context_parallel_shard(mesh, bufs, dims, load_balancer=lb)
        tcp._enable_context_parallel_dispatcher()
        try:
            yield local
        finally:
            tcp._disable_context_parallel_dispatcher()
    finally:
        tcp._cp_options.enable_load_balance = old


class _SDPAModule(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kw)


def _run_case(name, spec, seed, mesh, cfg):
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.experimental._attention import _ContextParallel
    from torch.distributed.tensor.parallel import parallelize_module

    import attnkit
    from attnkit import distributed as akd
    from attnkit import masks

    entry, layout, balance, shape, kw, ours = spec
    q, k, v, dout = tdist._inputs(shape, layout, seed, cfg)
    if kw.get("mask") == "doc":
        kw = {**kw, "mask": masks.document(tdist._doc_ids(tdist.DOCS).to(q.device))}
    want, base = _expected(q, k, v, dout, layout, kw)
    sd = 1 if layout == "bshd" else 2
    bufs = [t.detach().clone() for t in (q, k, v, dout, *want, *base)]
    dims = [sd] * 4 + [sd, 2, sd, sd, sd] * 2  # lse is (B, H, S) in both layouts
    backend = cfg["backend"]
    sdpa_kw = {"is_causal": kw.get("causal", False), "scale": kw.get("scale"), "enable_gqa": True}
    lse = None
    with _torch_sharded(entry, balance, bufs, dims, mesh) as local:
        assert akd._torch_cp.torch_sharding() == ("zigzag" if balance else "contiguous")
        mine = [t.clone().requires_grad_() for t in local[:3]]
        ctx = akd.use_with_torch_context_parallel(backend=backend) if ours else contextlib.nullcontext()
        with ctx:
            if entry == "sdpa":
                out = F.scaled_dot_product_attention(*mine, **sdpa_kw)
                assert type(out) is torch.Tensor, type(out)  # torch's wrapper hands back the local shard
            elif entry == "module":
                style = _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.SDPA)
                out = parallelize_module(_SDPAModule(**sdpa_kw), mesh, style)(*mine)
            else:
                dts = [DTensor.from_local(t, mesh, [Shard(sd)], run_check=False) for t in mine]
                out, lse = attnkit.attention(*dts, layout=layout, return_lse=True, backend=backend, **kw)
                assert isinstance(out, DTensor) and out.placements == (Shard(sd),), out.placements
                assert out.shape == want[0].shape and lse.shape == want[1].shape
                out, lse = out.to_local(), lse.to_local()
        out.backward(local[3])
    w, b = local[4:9], local[9:14]
    oracle.assert_close(out, w[0], b[0], name="out")
    if lse is not None:
        oracle.assert_close(lse, w[1], b[1], dtype=q.dtype, name="lse")
    terms = float(dout.float().norm(dim=-1).max() * v.float().norm(dim=-1).max())
    for n, a, r, bl in zip("qkv", mine, w[2:], b[2:]):
        oracle.assert_close(a.grad, r, bl, name=f"grad {n}", term_scale=terms)


def _run_refusals(mesh, cfg):
    """Calls that cannot be done right are refused, naming the argument, on every rank (no hang)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.experimental import context_parallel

    import attnkit
    from attnkit import distributed as akd

    q, k, v, _ = tdist._inputs((1, 4, 2, 8, 8), "bhsd", 5, cfg)
    res = {}

    def expect(name, fn, arg):
        try:
            fn()
        except attnkit.AttentionInputError as e:
            res[name] = "ok" if e.arg == arg else f"wrong argument named: {e.arg!r} ({e})"
        except Exception as e:  # noqa: BLE001
            res[name] = f"raised {type(e).__name__}: {e}"
        else:
            res[name] = "did not raise"

    bufs = [t.clone() for t in (q, k, v)]
    with (
        context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2]),
        akd.use_with_torch_context_parallel(),
    ):
        ql, kl, vl = bufs
        mask = torch.ones(1, 1, ql.shape[2], ql.shape[2] * mesh.size(), dtype=torch.bool, device=ql.device)
        expect(
            "err_attn_mask", lambda: F.scaled_dot_product_attention(ql, kl, vl, attn_mask=mask), "attn_mask"
        )
        drop = {"dropout_p": 0.1, "enable_gqa": True}
        expect("err_dropout", lambda: F.scaled_dot_product_attention(ql, kl, vl, **drop), "dropout_p")
        expect("err_gqa_flag", lambda: F.scaled_dot_product_attention(ql, kl, vl), "enable_gqa")
        dq, dk, dv = (DTensor.from_local(t, mesh, [Shard(2)], run_check=False) for t in bufs)
        bias = torch.zeros(1, device=ql.device)
        expect("err_bias", lambda: attnkit.attention(dq, dk, dv, bias=bias), "bias")
        expect("err_thd", lambda: attnkit.attention(dq, dk, dv, layout="thd"), "layout")
        expect("err_mixed", lambda: attnkit.attention(dq, kl, dv), "k")
        rep = DTensor.from_local(ql, mesh, [Replicate()], run_check=False)
        expect("err_replicated", lambda: attnkit.attention(rep, dk, dv), "q")
        expect("err_bshd_dim", lambda: attnkit.attention(dq, dk, dv, layout="bshd"), "q")
    bad = akd.use_with_torch_context_parallel(sharding="ring")
    expect("err_sharding", bad.__enter__, "sharding")
    return res


_REFUSALS = [
    "err_attn_mask",
    "err_dropout",
    "err_gqa_flag",
    "err_bias",
    "err_thd",
    "err_mixed",
    "err_replicated",
    "err_bshd_dim",
    "err_sharding",
]


def _worker(rank, W, store, out_dir, cfg=tdist.CPU):
    from torch.distributed.device_mesh import init_device_mesh

    tdist.init_group(rank, W, store, cfg)
    mesh = init_device_mesh(cfg["device"], (W,))
    results, failed = {}, False
    for i, (name, spec) in enumerate(_CASES.items()):
        if failed:
            results[name] = "not run: an earlier case failed on this rank"
            continue
        try:
            _run_case(name, spec, 2000 + i, mesh, cfg)
            results[name] = "ok"
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc(limit=5)
            failed = True
    if not failed:
        results.update(_run_refusals(mesh, cfg))
    tdist.finish_group(rank, out_dir, results, failed)


_RESULTS: dict = {}


@pytest.mark.parametrize("case", [*_CASES, *_REFUSALS])
def test_torch_context_parallel(case, tmp_path_factory):
    if "cpu" not in _RESULTS:
        _RESULTS["cpu"] = tdist.spawn_ranks(_worker, 2, tmp_path_factory.mktemp("torchcp"))
    bad = {r: res.get(case, "not run") for r, res in enumerate(_RESULTS["cpu"]) if res.get(case) != "ok"}
    assert not bad, f"{case}: " + "\n".join(f"rank {r}: {m}" for r, m in bad.items())


def test_plain_tensors_untouched():
    """Outside torch's CP (no DTensors) the context changes nothing and needs no process group."""
    from attnkit import distributed as akd

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with akd.use_with_torch_context_parallel():
        got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert akd._torch_cp.torch_sharding() == "contiguous"  # DTensor Shard outside torch's CP: chunks
    assert torch.equal(got, want)


@pytest.mark.cuda
def test_torch_context_parallel_nccl(tmp_path):
    """The same cases with NCCL on 2 GPUs, bf16, blocks on backend="auto" (torch's CP would run its ring
    with the flash op here: the cases check that attnkit's ring runs instead and is right)."""
    W = min(torch.cuda.device_count(), 4)
    if W < 2:
        pytest.skip("needs 2 or more GPUs")
    per_rank = tdist.spawn_ranks(_worker, W, tmp_path, tdist.GPU)
    bad = {(r, c): m for r, res in enumerate(per_rank) for c, m in res.items() if m != "ok"}
    assert not bad, "\n".join(f"rank {r} {c}: {m}" for (r, c), m in bad.items())
