"""attnkit.distributed on CPUs: 2 and 3 gloo processes (torch.multiprocessing.spawn, file:// store).

One spawn per world size runs every case below on every rank and records, per case and rank, "ok" or the
failure; the parametrized tests then read those records. Each rank builds the same seeded float32 inputs,
computes the whole-sequence float64 oracle (``oracle.attention64``) and the plain float32 baseline
(``reference_forward(upcast=False)``), and holds its own shard of out, lse and dq/dk/dv to the oracle rule.
"""

from __future__ import annotations

import datetime
import json
import os
import traceback

import pytest
import torch

import oracle

S = 24  # a multiple of 2W for W = 2 and 3
DOCS = [5, 9, 3, 7]  # uneven documents, not aligned to any chunk boundary


def _doc_ids(lengths, B=None):
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids if B is None else torch.stack([ids, ids.roll(5)])


def _cases(device="cpu"):
    from attnkit import masks

    doc = masks.document(_doc_ids(DOCS).to(device))
    doc_b = masks.document(_doc_ids(DOCS, B=2).to(device))
    late = masks.from_mask_mod(lambda b, h, q, kv: q >= 3, "rows_from_3")  # rows 0..2 see nothing
    # name: (layout, sharding, method, dict(B, Hq, Hk, D, Dv), attention kwargs)
    return {
        "full_contig_ring_gqa": ("bshd", "contiguous", "ring", (2, 4, 2, 8, 8), {}),
        "full_zigzag_ring_dv": ("bhsd", "zigzag", "ring", (1, 2, 2, 8, 16), {}),
        "causal_zigzag_ring": ("bshd", "zigzag", "ring", (2, 4, 2, 8, 8), {"causal": True}),
        "causal_contig_ring_bhsd": ("bhsd", "contiguous", "ring", (1, 4, 4, 8, 8), {"causal": True}),
        "causal_zigzag_allgather_mqa": ("bshd", "zigzag", "allgather", (1, 4, 1, 8, 8), {"causal": True}),
        "window_zigzag_ring": ("bshd", "zigzag", "ring", (1, 2, 1, 8, 8), {"window": (5, 3)}),
        "window_contig_allgather": ("bshd", "contiguous", "allgather", (1, 2, 1, 8, 8), {"window": (2, 7)}),
        "causal_window_zigzag_ring": (
            "bshd",
            "zigzag",
            "ring",
            (1, 4, 2, 8, 8),
            {"causal": True, "window": (5, -1)},
        ),
        "doc_causal_zigzag_ring": (
            "bshd",
            "zigzag",
            "auto",
            (2, 4, 2, 8, 8),
            {"causal": True, "mask": doc_b},
        ),
        "doc_contig_allgather": ("bhsd", "contiguous", "allgather", (1, 2, 1, 8, 8), {"mask": doc}),
        "doc_and_causal_mask_zigzag": (
            "bshd",
            "zigzag",
            "auto",
            (1, 2, 2, 8, 8),
            {"mask": masks.causal() & doc},
        ),
        "doc_window_zigzag_ring": (
            "bshd",
            "zigzag",
            "ring",
            (1, 2, 2, 8, 8),
            {"window": (4, 0), "mask": doc},
        ),
        "prefix_lm_zigzag_auto": ("bshd", "zigzag", "auto", (1, 2, 1, 8, 8), {"mask": masks.prefix_lm(7)}),
        "prefix_lm_contig_ring": (
            "bshd",
            "contiguous",
            "ring",
            (1, 2, 1, 8, 8),
            {"mask": masks.prefix_lm(7)},
        ),
        "masked_rows_zigzag_ring": (
            "bshd",
            "zigzag",
            "ring",
            (1, 2, 1, 8, 8),
            {"causal": True, "mask": late},
        ),
        # Sq = 2 Sk, causal (bottom-right): the first Sk queries see nothing, so some ranks see no key at all
        "cross_long_q_causal_allgather": (
            "bshd",
            "contiguous",
            "allgather",
            (1, 2, 1, 8, 8, 2 * S),
            {"causal": True},
        ),
        "cross_long_q_window_zigzag_ring": (
            "bshd",
            "zigzag",
            "ring",
            (1, 2, 1, 8, 8, 2 * S),
            {"window": (5, 3)},
        ),
        "softcap_scale_zigzag": ("bshd", "zigzag", "ring", (1, 2, 2, 16, 8), {"softcap": 5.0, "scale": 0.3}),
    }


CPU = {"device": "cpu", "dtype": "float32", "backend": "reference", "dist": "gloo"}
GPU = {"device": "cuda", "dtype": "bfloat16", "backend": "auto", "dist": "nccl"}


def _inputs(shape, layout, seed, cfg=CPU):
    B, Hq, Hk, D, Dv, *sq = shape  # an optional 6th entry: Sq != Sk = S
    Sq = sq[0] if sq else S
    g = torch.Generator().manual_seed(seed)

    def mk(H, d, n=S):
        dims = (B, n, H, d) if layout == "bshd" else (B, H, n, d)
        return torch.randn(dims, generator=g).to(cfg["device"], getattr(torch, cfg["dtype"]))

    return mk(Hq, D, Sq), mk(Hk, D), mk(Hk, Dv), mk(Hq, Dv, Sq)


def _run_case(name, spec, seed, cfg=CPU):
    from attnkit import distributed as akd
    from attnkit.backends.reference import reference_forward

    layout, sharding, method, shape, kw = spec
    sd = 1 if layout == "bshd" else 2
    q, k, v, dout = _inputs(shape, layout, seed, cfg)
    # whole-sequence float64 oracle and plain-float32 baseline, with gradients
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = oracle.attention64(*ref, layout=layout, **kw)
    out64.backward(dout.double())
    base = [t.clone().requires_grad_() for t in (q, k, v)]
    outb, lseb = reference_forward(
        oracle.make_call(*base, layout=layout, return_lse=True, **kw), upcast=False
    )
    outb.backward(dout)

    def sh(t, dim=sd):
        return akd.shard(t.detach(), dim, sharding=sharding)

    mine = [sh(t).requires_grad_() for t in (q, k, v)]
    out, lse = akd.context_parallel_attention(
        *mine, layout=layout, sharding=sharding, method=method, return_lse=True, backend=cfg["backend"], **kw
    )
    out.backward(sh(dout))
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    oracle.assert_close(out, sh(out64), sh(outb), name="out")
    oracle.assert_close(lse, sh(lse64, -1), sh(lseb, -1), name="lse")
    terms = float(dout.float().norm(dim=-1).max() * v.float().norm(dim=-1).max())
    for n, a, r, b in zip("qkv", mine, ref, base):
        oracle.assert_close(a.grad, sh(r.grad), sh(b.grad), name=f"grad {n}", term_scale=terms)
    # every rank gets the whole output back
    full = akd.unshard(out.detach(), sd, sharding=sharding)
    oracle.assert_close(full, out64, outb, name="unshard(out)")


THD_DOCS = [12, 0, 24, 12]  # every length a multiple of 2W for W = 2 and 3; an empty document too


def _run_thd(rank, W):
    """layout="thd": every document split evenly over the ranks (TransformerEngine's THD layout)."""
    from attnkit import distributed as akd
    from attnkit.backends.reference import reference_forward

    res = {}
    cu = oracle.cu_seqlens(THD_DOCS)
    T = int(cu[-1])
    cases = [
        ("thd_causal_zigzag_ring", "zigzag", "ring", {"causal": True}),
        ("thd_window_contig_ring", "contiguous", "ring", {"window": (5, 2)}),
        ("thd_full_zigzag_allgather", "zigzag", "allgather", {}),
    ]
    for i, (name, sharding, method, kw) in enumerate(cases):
        try:
            g = torch.Generator().manual_seed(50 + i)
            q, k, v, dout = (torch.randn(T, h, 8, generator=g) for h in (4, 2, 2, 4))
            ref = [t.double().requires_grad_() for t in (q, k, v)]
            seq = {"cu_seqlens_q": cu, "cu_seqlens_k": cu}
            out64, lse64 = oracle.attention64(*ref, layout="thd", **seq, **kw)
            out64.backward(dout.double())
            base = [t.clone().requires_grad_() for t in (q, k, v)]
            call = oracle.make_call(*base, layout="thd", return_lse=True, **seq, **kw)
            outb, lseb = reference_forward(call, upcast=False)
            outb.backward(dout)

            def sh(t, dim=0, sharding=sharding):
                return akd.shard(t.detach(), dim, sharding=sharding, cu_seqlens=cu)

            mine = [sh(t).requires_grad_() for t in (q, k, v)]
            out, lse = akd.context_parallel_attention(
                *mine,
                layout="thd",
                cu_seqlens=cu,
                sharding=sharding,
                method=method,
                return_lse=True,
                backend="reference",
                **kw,
            )
            out.backward(sh(dout))
            oracle.assert_close(out, sh(out64), sh(outb), name="out")
            oracle.assert_close(lse, sh(lse64, -1), sh(lseb, -1), name="lse")
            terms = float(dout.norm(dim=-1).max() * v.norm(dim=-1).max())
            for n, a, r, b in zip("qkv", mine, ref, base):
                oracle.assert_close(a.grad, sh(r.grad), sh(b.grad), name=f"grad {n}", term_scale=terms)
            full = akd.unshard(out.detach(), 0, sharding=sharding, cu_seqlens=cu)
            oracle.assert_close(full, out64, outb, name="unshard(out)")
            res[name] = "ok"
        except Exception:  # noqa: BLE001
            res[name] = traceback.format_exc(limit=4)
            break
    return res


def _run_errors(rank, W):
    """Bad input: every rank must raise the same AttentionInputError (none may hang)."""
    import attnkit
    from attnkit import distributed as akd

    results = {}
    q = torch.randn(1, 4 + (2 if rank == 0 else 0), 2, 8)  # rank 0's shard is longer

    def expect(name, fn, arg):
        try:
            fn()
        except attnkit.AttentionInputError as e:
            results[name] = "ok" if e.arg == arg else f"wrong argument named: {e.arg!r} ({e})"
        except Exception as e:  # noqa: BLE001
            results[name] = f"raised {type(e).__name__}: {e}"
        else:
            results[name] = "did not raise"

    expect(
        "err_unequal_shards", lambda: akd.context_parallel_attention(q, q, q, backend="reference"), "q_local"
    )
    odd = torch.randn(1, 3, 2, 8)
    expect(
        "err_odd_zigzag", lambda: akd.context_parallel_attention(odd, odd, odd, sharding="zigzag"), "q_local"
    )
    expect("err_sharding", lambda: akd.shard(torch.randn(1, 12, 2, 8), 1, sharding="ring"), "sharding")
    expect("err_layout", lambda: akd.context_parallel_attention(odd, odd, odd, layout="sbhd"), "layout")
    expect("err_method", lambda: akd.context_parallel_attention(odd, odd, odd, method="a2a"), "method")
    expect("err_shard_len", lambda: akd.shard(torch.randn(1, 2 * W + 1, 2, 8), 1), "x")
    expect("err_3d", lambda: akd.context_parallel_attention(odd[0], odd, odd), "q_local")
    expect("err_window", lambda: akd.context_parallel_attention(odd, odd, odd, window=(-2, 0)), "window")
    expect("err_mask", lambda: akd.context_parallel_attention(odd, odd, odd, mask="causal"), "mask")
    return results


def _run_roundtrip(rank, W):
    from attnkit import distributed as akd

    res = {}
    for sharding in ("contiguous", "zigzag"):
        x = torch.randn(2, 2 * W * 3, 5, generator=torch.Generator().manual_seed(7))
        loc = akd.shard(x, 1, sharding=sharding)
        pos = akd.position_ids(x.shape[1], sharding=sharding)
        ok = torch.equal(akd.unshard(loc, 1, sharding=sharding), x) and torch.equal(loc, x[:, pos])
        ok = ok and torch.equal(akd.shard(x, 1, sharding=sharding, rank=rank, world_size=W), loc)
        # unshard is differentiable: the gradient of the replicated result comes back as this rank's slice
        leaf = loc.clone().requires_grad_()
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
        (akd.unshard(leaf, 1, sharding=sharding) * w).sum().backward()
        ok = ok and torch.equal(leaf.grad, akd.shard(w, 1, sharding=sharding))
        # packed documents: positions restart per document, each document split over every rank
        cu = oracle.cu_seqlens(THD_DOCS)
        pos = akd.position_ids(int(cu[-1]), sharding=sharding, cu_seqlens=cu)
        want = torch.cat([torch.arange(n) for n in THD_DOCS])
        ok = ok and torch.equal(akd.unshard(pos, 0, sharding=sharding, cu_seqlens=cu), want)
        ok = ok and len(pos) == int(cu[-1]) // W
        res[f"roundtrip_{sharding}"] = "ok" if ok else "mismatch"
    return res


def init_group(rank, W, store, cfg=CPU):
    """One rank's process group (gloo on the CPU, NCCL on GPU ``rank``), through a file:// store."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if cfg["device"] == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        cfg["dist"],
        init_method=f"file://{store}",
        rank=rank,
        world_size=W,
        timeout=datetime.timedelta(seconds=20),
    )


def finish_group(rank, out_dir, results: dict, failed: bool):
    """Write this rank's records (``rank{r}.json``) and leave the group."""
    import torch.distributed as dist

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if failed:
        os._exit(0)  # peers may still be blocked in a collective: do not wait for a clean shutdown
    dist.barrier()  # no rank closes its connections while a peer still reads from them
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: a gloo thread still joinable there aborted one rank of a CI
    # run ("terminate called without an active exception", SIGABRT) after every case had passed. The
    # records are written and closed above; exit code 0 is what spawn checks.
    os._exit(0)


def spawn_ranks(worker, W, d, *args) -> list[dict]:
    """``worker(rank, W, store, out_dir, *args)`` in W processes; every rank's records, in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(W, str(d / "store"), str(d), *args), nprocs=W, join=True)
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(W)]


def _worker(rank, W, store, out_dir, cfg=CPU):
    init_group(rank, W, store, cfg)
    results, failed = {}, False
    for i, (name, spec) in enumerate(_cases(cfg["device"]).items()):
        if failed:  # the ranks may be out of step now: stop rather than wait on timeouts case after case
            results[name] = "not run: an earlier case failed on this rank"
            continue
        try:
            _run_case(name, spec, seed=1000 + i, cfg=cfg)
            results[name] = "ok"
        except Exception:  # noqa: BLE001
            results[name] = traceback.format_exc(limit=4)
            failed = True
    if not failed and cfg["device"] == "cpu":
        results.update(_run_thd(rank, W))
        results.update(_run_errors(rank, W))
        results.update(_run_roundtrip(rank, W))
    finish_group(rank, out_dir, results, failed)


_RESULTS: dict = {}


def _results(W, tmp_path_factory):
    if W not in _RESULTS:
        _RESULTS[W] = spawn_ranks(_worker, W, tmp_path_factory.mktemp(f"cp{W}"))
    return _RESULTS[W]


_NAMES = list(_cases()) + [
    "err_unequal_shards",
    "err_odd_zigzag",
    "err_sharding",
    "err_layout",
    "err_method",
    "err_shard_len",
    "thd_causal_zigzag_ring",
    "thd_window_contig_ring",
    "thd_full_zigzag_allgather",
    "err_3d",
    "err_window",
    "err_mask",
    "roundtrip_contiguous",
    "roundtrip_zigzag",
]


@pytest.mark.parametrize("W", [2, 3])
@pytest.mark.parametrize("case", _NAMES)
def test_context_parallel(W, case, tmp_path_factory):
    per_rank = _results(W, tmp_path_factory)
    bad = {r: res.get(case, "not run") for r, res in enumerate(per_rank) if res.get(case) != "ok"}
    assert not bad, f"W={W} {case}: " + "\n".join(f"rank {r}: {m}" for r, m in bad.items())


def test_needs_initialized_group():
    import torch.distributed as dist

    import attnkit
    from attnkit import distributed as akd

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    x = torch.randn(1, 8, 2, 8)
    with pytest.raises(attnkit.AttentionInputError, match="group"):
        akd.context_parallel_attention(x, x, x)
    with pytest.raises(attnkit.AttentionInputError, match="group"):
        akd.shard(x, 1)
    assert torch.equal(akd.shard(x, 1, sharding="contiguous", rank=1, world_size=2), x[:, 4:])


def test_bench_cp_smoke(tmp_path):
    """``attnkit bench cp --smoke``: the pipeline (spawn, gloo, timing, rows, CSV) at tiny sizes."""
    from attnkit.bench import cp

    args = ["--smoke", "--seqlens", "24", "--masks", "document", "--gpus", "1,2"]
    assert cp.main([*args, "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "cp.csv").read_text().splitlines()
    assert len(text) == 3 and text[0].startswith("mask,seqlen")  # header + W in (1, 2)
    assert all("error:" not in line and "out of memory" not in line for line in text), text


@pytest.mark.cuda
def test_context_parallel_nccl(tmp_path):
    """The same cases with NCCL on every GPU of the machine (2 or more), bf16, backend="auto"."""
    W = min(torch.cuda.device_count(), 4)
    if W < 2:
        pytest.skip("needs 2 or more GPUs")
    per_rank = spawn_ranks(_worker, W, tmp_path, GPU)
    bad = {(r, c): m for r, res in enumerate(per_rank) for c, m in res.items() if m != "ok"}
    assert not bad, "\n".join(f"rank {r} {c}: {m}" for (r, c), m in bad.items())


def _simulated(q, k, v, W, layout, sharding, backend, **kw):
    """Context parallelism with W ranks simulated in one process: every rank's blocks (exactly the blocks
    the ring computes) and merge, differentiable through the whole tensors. Returns each rank's (out, lse)."""
    from attnkit import distributed as akd
    from attnkit.distributed import _blocks, _cp

    sd = 1 if layout == "bshd" else 2
    local = [[akd.shard(t, sd, sharding=sharding, rank=r, world_size=W) for t in (q, k, v)] for r in range(W)]
    res = []
    for r in range(W):
        g = _cp.plan_call(local[r][0], local[r][1], W, layout, sharding, **kw, backend=backend)
        q_chunks = _blocks.chunks(local[r][0], sd, g["qd"](r))
        parts = [[] for _ in q_chunks]
        for src in range(W):
            pieces = g["kd"](src)
            kv = zip(_blocks.chunks(local[src][1], sd, pieces), _blocks.chunks(local[src][2], sd, pieces))
            for (kc, ko, *_), (vc, *_) in kv:
                for qi, (qc, qo, *_) in enumerate(q_chunks):
                    part = _blocks.block(qc, qo, kc, vc, ko, g)
                    if part is not None:
                        parts[qi].append(part)
        res.append(_blocks.finish(q_chunks, parts, v.shape[-1], layout, sd))
    return res


_SIM_CPU = ["causal_zigzag_ring", "doc_window_zigzag_ring", "prefix_lm_contig_ring"]
_SIM_GPU = _SIM_CPU + [
    "window_zigzag_ring",
    "doc_causal_zigzag_ring",
    "full_contig_ring_gqa",
    "masked_rows_zigzag_ring",
]


@pytest.mark.parametrize(
    "device, case",
    [("cpu", c) for c in _SIM_CPU] + [pytest.param("cuda", c, marks=pytest.mark.cuda) for c in _SIM_GPU],
)
def test_blocks_simulated_w4(device, case):
    """The block decomposition for W = 4 in one process, against the float64 oracle: on the CPU with the
    reference backend, on a GPU with backend="auto" in bf16 (the kernels attnkit would run per block)."""
    from attnkit import distributed as akd
    from attnkit.backends.reference import reference_forward

    cfg = CPU if device == "cpu" else GPU
    layout, sharding, _, shape, kw = _cases(device)[case]
    q, k, v, dout = _inputs(shape, layout, seed=7, cfg=cfg)
    sd = 1 if layout == "bshd" else 2
    names = ("causal", "window", "softcap", "scale", "mask")
    full = {n: kw.get(n) for n in names}
    full["causal"] = bool(full["causal"])
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    W = 4 if S % 8 == 0 else 2
    outs = _simulated(*mine, W, layout, sharding, cfg["backend"], **full)
    out = torch.cat(
        [akd.shard(torch.arange(S), 0, sharding=sharding, rank=r, world_size=W) for r in range(W)]
    )
    inv = torch.empty_like(out)
    inv[out] = torch.arange(S)
    out_full = torch.cat([o for o, _ in outs], dim=sd).index_select(sd, inv.to(q.device))
    lse_full = torch.cat([s for _, s in outs], dim=-1).index_select(-1, inv.to(q.device))
    out_full.backward(dout)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = oracle.attention64(*ref, layout=layout, **kw)
    out64.backward(dout.double())
    base = [t.clone().requires_grad_() for t in (q, k, v)]
    outb, lseb = reference_forward(
        oracle.make_call(*base, layout=layout, return_lse=True, **kw), upcast=False
    )
    outb.backward(dout)
    oracle.assert_close(out_full, out64, outb, name="out")
    oracle.assert_close(lse_full, lse64, lseb, dtype=q.dtype, name="lse")
    terms = float(dout.float().norm(dim=-1).max() * v.float().norm(dim=-1).max())
    for n, a, r, b in zip("qkv", mine, ref, base):
        oracle.assert_close(a.grad, r.grad, b.grad, name=f"grad {n}", term_scale=terms)
