"""Command line: ``attnkit info``, ``attnkit explain ...``, ``attnkit bench [kernels|vit] ...``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys

import torch


def _versions() -> dict:
    import attnkit

    info = {"python": platform.python_version(), "torch": torch.__version__, "attnkit": attnkit.__version__}
    for mod in ("triton", "numpy", "transformers", "timm"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception:
            info[mod] = None
    return info


def _device_info() -> dict:
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        return {
            "device": "cuda",
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "count": torch.cuda.device_count(),
            "memory_gib": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return {
        "device": "cpu",
        "name": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


def cmd_info(args) -> int:
    import attnkit

    rows = attnkit.backends()
    data = {
        "versions": _versions(),
        "device": _device_info(),
        "backends": [
            {"name": r.name, "available": r.available, "reason": r.reason, "description": r.description}
            for r in rows
        ],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("attnkit environment")
    for k, v in data["versions"].items():
        print(f"  {k:<13} {v if v is not None else 'not installed'}")
    print("device")
    for k, v in data["device"].items():
        print(f"  {k:<13} {v}")
    print("backends")
    for r in rows:
        state = "available" if r.available else f"unavailable: {r.reason}"
        print(f"  {r.name:<16} {state}")
        print(f"  {'':<16} ({r.description})")
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip() != ""]


def _build_call_args(args):
    """Tensors and keyword arguments for attention/explain from the command line description."""
    import attnkit

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[
        args.dtype
    ]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    B, Hq, Sq, D = args.shape
    Hk = args.hk or Hq
    Sk = args.sk or Sq
    Dv = args.dv or D
    grad = args.grad
    kw: dict = {"layout": args.layout}
    if args.layout == "thd":
        lq = _ints(args.seqlens) if args.seqlens else [Sq] * B
        lk = _ints(args.seqlens_k) if args.seqlens_k else lq
        cq = torch.tensor([0] + [sum(lq[: i + 1]) for i in range(len(lq))], dtype=torch.int32, device=device)
        ck = torch.tensor([0] + [sum(lk[: i + 1]) for i in range(len(lk))], dtype=torch.int32, device=device)
        q = torch.empty(sum(lq), Hq, D, dtype=dtype, device=device)
        k = torch.empty(sum(lk), Hk, D, dtype=dtype, device=device)
        v = torch.empty(sum(lk), Hk, Dv, dtype=dtype, device=device)
        kw.update(cu_seqlens_q=cq, cu_seqlens_k=ck)
        B, Sq, Sk = len(lq), max(lq), max(lk)
    else:
        perm = (
            (lambda b, h, s, d: (b, h, s, d)) if args.layout == "bhsd" else (lambda b, h, s, d: (b, s, h, d))
        )
        q = torch.empty(perm(B, Hq, Sq, D), dtype=dtype, device=device)
        k = torch.empty(perm(B, Hk, Sk, D), dtype=dtype, device=device)
        v = torch.empty(perm(B, Hk, Sk, Dv), dtype=dtype, device=device)
    for t in (q, k, v):
        t.requires_grad_(grad)
    kw["causal"] = args.causal
    if args.window:
        kw["window"] = tuple(_ints(args.window))
    if args.softcap:
        kw["softcap"] = args.softcap
    if args.alibi:
        kw["alibi_slopes"] = torch.ones(Hq, dtype=torch.float32, device=device)
    if args.bias:
        shape = {"full": (B, Hq, Sq, Sk), "head": (Hq, 1, Sk), "batch": (B, 1, 1, Sk)}[args.bias]
        kw["bias"] = torch.zeros(shape, dtype=dtype, device=device, requires_grad=args.bias_grad)
    if args.mask:
        name, _, val = args.mask.partition(":")
        masks = attnkit.masks
        if name == "document":
            n = int(val or 4)
            kw["mask"] = masks.document(torch.arange(Sq, device=device) * n // max(Sq, 1))
        elif name == "prefix":
            kw["mask"] = masks.prefix_lm(int(val or Sq // 4))
        elif name == "chunked":
            kw["mask"] = masks.chunked(int(val or 128))
        elif name == "sliding":
            kw["mask"] = masks.sliding_window(int(val or 128))
        elif name == "custom":
            kw["mask"] = masks.from_mask_mod(lambda b, h, qi, ki: (qi - ki) % 2 == 0, "custom")
        else:
            raise SystemExit(
                f"attnkit explain: unknown --mask {name!r} (document, prefix, chunked, sliding, custom)"
            )
    if args.score_mod:
        kw["score_mod"] = {
            "relative": attnkit.mods.relative_bias(torch.zeros(Hq, 33, device=device)),
            "softcap": attnkit.mods.softcap(30.0),
        }[args.score_mod]
    if args.dropout:
        kw["dropout_p"] = args.dropout
    kw["return_lse"] = args.return_lse
    kw["deterministic"] = args.deterministic
    return q, k, v, kw


def cmd_explain(args) -> int:
    import attnkit

    q, k, v, kw = _build_call_args(args)
    with torch.set_grad_enabled(args.grad or args.bias_grad):
        print(attnkit.explain(q, k, v, backend=args.backend, **kw))
    return 0


_BENCH_SUITES = {
    None: "attnkit.bench.quick",
    "kernels": "attnkit.bench.kernels",
    "vit": "attnkit.bench.vit",
    "packed": "attnkit.bench.packed",
    "cp": "attnkit.bench.cp",
}


def cmd_bench(argv: list[str]) -> int:
    """``attnkit bench [kernels|vit] [options]``: every option goes to the suite's own parser."""
    suite = argv[0] if argv and argv[0] in _BENCH_SUITES else None
    rest = argv[1:] if suite else argv
    mod_name = _BENCH_SUITES[suite]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            print(f"attnkit bench: {suite or 'quick'} suite is not part of this build", file=sys.stderr)
            return 2
        raise
    return int(mod.main(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="Fast and flexible attention for PyTorch.")
    sub = p.add_subparsers(dest="cmd", required=True)
    info = sub.add_parser("info", help="environment, device and backends")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    ex = sub.add_parser("explain", help="which backend serves a call, and why the others cannot")
    ex.add_argument(
        "--shape",
        type=_ints,
        default=[2, 8, 1024, 128],
        metavar="B,Hq,Sq,D",
        help="query shape (for thd: N,Hq,max_len,D unless --seqlens)",
    )
    ex.add_argument("--hk", type=int, help="key/value heads (GQA/MQA)")
    ex.add_argument("--sk", type=int, help="key length (default Sq)")
    ex.add_argument("--dv", type=int, help="value head dim (default D)")
    ex.add_argument("--layout", choices=["bhsd", "bshd", "thd"], default="bhsd")
    ex.add_argument("--seqlens", help="thd: comma-separated query lengths")
    ex.add_argument("--seqlens-k", help="thd: comma-separated key lengths (default: --seqlens)")
    ex.add_argument("--dtype", choices=["fp16", "bf16", "fp32", "fp64"], default="bf16")
    ex.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    ex.add_argument("--causal", action="store_true")
    ex.add_argument("--window", help="left,right (-1 = unbounded)")
    ex.add_argument("--softcap", type=float)
    ex.add_argument("--alibi", action="store_true")
    ex.add_argument("--bias", choices=["full", "head", "batch"])
    ex.add_argument("--bias-grad", action="store_true", help="the bias requires grad")
    ex.add_argument("--mask", help="document[:n_docs] | prefix[:len] | chunked[:size] | sliding[:w] | custom")
    ex.add_argument("--score-mod", choices=["relative", "softcap"])
    ex.add_argument("--dropout", type=float)
    ex.add_argument("--return-lse", action="store_true")
    ex.add_argument("--grad", action="store_true", help="training call (inputs require grad)")
    ex.add_argument("--deterministic", action="store_true")
    ex.add_argument("--backend", default="auto")

    b = sub.add_parser(
        "bench",
        help="benchmarks: quick suite, kernels, vit, packed or cp (--help after the suite)",
        add_help=False,
    )
    b.add_argument("suite", nargs="?", choices=["kernels", "vit", "packed", "cp"], default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the suites parse their own options
        return cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return {"info": cmd_info, "explain": cmd_explain}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
