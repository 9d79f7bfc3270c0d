"""``attnkit bench cp``: context-parallel attention, tokens per second and scaling efficiency over W GPUs.

For each sequence length (default 32k, 128k, 512k tokens) and mask (``causal``; ``document``: uneven
documents of the whole sequence, causal inside each), it times one forward + backward of
``attnkit.distributed.context_parallel_attention`` (zigzag sharding) on W = 1, 2, 4 ... GPUs, one process per
GPU (``torch.multiprocessing.spawn``, NCCL). W = 1 is plain ``attnkit.attention`` on one GPU: the peer the
others are measured against. Rows give the median step time (rank 0, CUDA events, after a barrier), tokens
per second of the whole group (S / time) and the scaling efficiency ``time(1) / (W * time(W))``; a run that
does not fit in memory is recorded as such (at 512k one GPU may not fit, which is the point).

``--smoke`` runs the same pipeline on the CPU with gloo, tiny sizes and the reference backend: it checks the
pipeline, not speed. Nothing here has been run on several GPUs yet (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch

from attnkit.bench import _report


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _doc_ids(S: int, mean: int, seed: int = 0) -> torch.Tensor:
    """Uneven document lengths (exponential around ``mean``), cut to S tokens in total."""
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < S:
        n = max(1, int(torch.empty(1).exponential_(1.0 / mean, generator=g).item()))
        n = min(n, S - total)
        lens.append(n)
        total += n
    return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))


def _kwargs(mask_name: str, S: int, device, doc_mean: int) -> dict:
    from attnkit import masks

    if mask_name == "causal":
        return {"causal": True}
    return {"causal": True, "mask": masks.document(_doc_ids(S, doc_mean).to(device))}


def _time(fn, steps: int, warmup: int, device, barrier=None) -> float:
    """Median milliseconds of ``fn()`` over ``steps`` after ``warmup``."""
    times = []
    for i in range(warmup + steps):
        if barrier is not None:
            barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def _inputs(cfg: dict, S: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)  # the same tensors on every rank, made on the device

    def mk(H, D):
        return torch.randn(cfg["batch"], S, H, D, generator=g, device=device, dtype=dtype)

    return mk(cfg["heads"], cfg["dim"]), mk(cfg["kv_heads"], cfg["dim"]), mk(cfg["kv_heads"], cfg["dim"])


def _step(q, k, v, attend):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = attend(q, k, v)
    out.backward(torch.ones_like(out))


def _single(cfg: dict, S: int, mask_name: str) -> dict:
    """W = 1: ``attnkit.attention`` on the whole sequence, one device."""
    import attnkit

    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    kw = _kwargs(mask_name, S, device, cfg["doc_mean"])
    q, k, v = _inputs(cfg, S, device, dtype)
    attend = lambda q, k, v: attnkit.attention(q, k, v, layout="bshd", backend=cfg["backend"], **kw)  # noqa: E731
    return {"median_ms": _time(lambda: _step(q, k, v, attend), cfg["steps"], cfg["warmup"], device)}


def _worker(rank: int, W: int, cfg: dict, S: int, mask_name: str, store: str, out_path: str):
    import torch.distributed as dist

    from attnkit import distributed as akd

    on_gpu = cfg["device"] == "cuda"
    if on_gpu:
        torch.cuda.set_device(rank)
    device, dtype = (
        torch.device("cuda", rank) if on_gpu else torch.device("cpu"),
        getattr(torch, cfg["dtype"]),
    )
    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=W,
        timeout=datetime.timedelta(seconds=600),
    )
    row: dict = {}
    try:
        kw = _kwargs(mask_name, S, device, cfg["doc_mean"])
        q, k, v = (akd.shard(t, 1) for t in _inputs(cfg, S, device, dtype))
        attend = lambda q, k, v: akd.context_parallel_attention(  # noqa: E731
            q, k, v, layout="bshd", backend=cfg["backend"], method=cfg["method"], **kw
        )
        row["median_ms"] = _time(
            lambda: _step(q, k, v, attend), cfg["steps"], cfg["warmup"], device, dist.barrier
        )
    except torch.cuda.OutOfMemoryError:
        row["note"] = "out of memory"
    except Exception as e:  # record and go on
        row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(row, f)
    dist.barrier()  # no rank closes its connections while a peer still reads from them
    dist.destroy_process_group()


def _distributed(cfg: dict, W: int, S: int, mask_name: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "row.json")
        mp.spawn(_worker, args=(W, cfg, S, mask_name, os.path.join(d, "store"), out), nprocs=W, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench cp", description=__doc__.splitlines()[0])
    p.add_argument(
        "--gpus", type=_ints, default=None, help="world sizes, e.g. 1,2,4 (default: 1, 2, 4, ... up to all)"
    )
    p.add_argument("--seqlens", type=_ints, default=None, help="global tokens (default 32768,131072,524288)")
    p.add_argument("--masks", default="causal,document", help="comma list of causal, document")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--doc-mean", type=int, default=None, help="mean document length (default S / 16)")
    p.add_argument("--method", default="auto", choices=["auto", "ring", "allgather"])
    p.add_argument(
        "--backend", default=None, help="attnkit backend for every block (default auto; reference on CPU)"
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument(
        "--smoke", action="store_true", help="CPU, gloo, tiny sizes: checks the pipeline, not speed"
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)

    on_gpu = torch.cuda.is_available() and not args.smoke
    if not on_gpu and not args.smoke:
        print("attnkit bench cp: no GPU here; running the CPU smoke mode (gloo, tiny sizes, not timings).")
    n_dev = torch.cuda.device_count() if on_gpu else 2
    worlds = args.gpus or [w for w in (1, 2, 4, 8) if w <= n_dev]
    seqlens = args.seqlens or ([32768, 131072, 524288] if on_gpu else [48, 96])
    cfg = dict(
        device="cuda" if on_gpu else "cpu",
        dtype="bfloat16" if on_gpu else "float32",
        batch=1,
        heads=args.heads if on_gpu else 2,
        kv_heads=args.kv_heads if on_gpu else 1,
        dim=args.dim if on_gpu else 8,
        backend=args.backend or ("auto" if on_gpu else "reference"),
        method=args.method,
        steps=args.steps or (5 if on_gpu else 2),
        warmup=args.warmup if args.warmup is not None else (2 if on_gpu else 1),
    )
    env = _report.environment()
    rows = []
    for S in seqlens:
        for mask_name in [m for m in args.masks.split(",") if m]:
            cfg["doc_mean"] = args.doc_mean or max(1, S // 16)
            base = None
            for W in worlds:
                row = dict(mask=mask_name, seqlen=S, gpus=W if on_gpu else None, ranks=W, method=args.method)
                if S % (2 * W):
                    row["note"] = f"S not a multiple of 2W = {2 * W}"
                else:
                    try:
                        row.update(
                            _single(cfg, S, mask_name) if W == 1 else _distributed(cfg, W, S, mask_name)
                        )
                    except torch.cuda.OutOfMemoryError:
                        row["note"] = "out of memory"
                ms = row.get("median_ms")
                if ms:
                    row["tokens_per_s"] = S / ms * 1e3
                    if W == 1:
                        base = ms
                    elif base:
                        row["scaling_eff"] = base / (W * ms)
                rows.append(row)
                print(_report.table(rows[-1:], _COLUMNS).splitlines()[-1], flush=True)
    print(_report.table(rows, _COLUMNS))
    csv_path, _ = _report.write(rows, env, args.out, "cp")
    print(f"wrote {csv_path}")
    return 0


_COLUMNS = [
    ("mask", "mask"),
    ("seqlen", "tokens"),
    ("ranks", "W"),
    ("median_ms", "fwd+bwd ms"),
    ("tokens_per_s", "tokens/s"),
    ("scaling_eff", "scaling eff."),
    ("note", "note"),
]


if __name__ == "__main__":
    raise SystemExit(main())
