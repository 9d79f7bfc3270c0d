"""Command line: ``attnkit info``, ``attnkit explain ...``, ``attnkit bench [SUITE] ...``.

Bad input (a malformed option, an argument ``attnkit.attention`` refuses, a device this machine lacks)
prints one line, ``attnkit <command>: error: ...``, and exits with status 2: no traceback.
"""

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
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "").strip() or "0 (unset)",
    }


def cmd_info(args) -> int:
    import attnkit
    from attnkit.backends import _optional

    rows = attnkit.backends()
    data = {
        "versions": _versions(),
        "device": _device_info(),
        "backends": [
            {"name": r.name, "available": r.available, "reason": r.reason, "description": r.description}
            for r in rows
        ],
        "peers_without_adapter": _optional.probe(),
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
    print("other peers (import probe only, no attnkit backend)")
    for r in data["peers_without_adapter"]:
        print(f"  {r['name']:<16} unavailable: {r['reason']}")
    return 0


class CLIError(Exception):
    """Bad command-line input: :func:`main` prints its message on one line and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a :class:`CLIError` (one line, exit status 2 from :func:`main`)."""

    def error(self, message):
        raise CLIError(f"{message} (see {self.prog} --help)")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _ints_of(n: int, what: str):
    """An argparse type: exactly ``n`` comma-separated integers (``what`` names them in the error)."""

    def parse(text: str) -> list[int]:
        vals = _ints(text)
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {what} ({n} integers), got {text!r}")
        return vals

    return parse


def _build_call_args(args):
    """Tensors and keyword arguments for attention/explain from the command line description."""
    import attnkit

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise CLIError(f"--device: expected cpu or cuda, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: this machine has no CUDA device (use --device cpu)")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[
        dtype_name
    ]
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
        kw["window"] = tuple(args.window)
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
            raise CLIError(f"--mask: unknown {name!r} (document, prefix, chunked, sliding, custom)")
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


# ``attnkit bench SUITE``: suite name -> (module with ``main(argv) -> int``, one-line description).
# Register a new suite here, with one line; ``attnkit bench --help`` lists them all.
BENCH_SUITES = {
    "quick": ("attnkit.bench.quick", "a few shapes on every capable backend, sized for this machine"),
    "kernels": ("attnkit.bench.kernels", "our kernels against every SDPA backend and FlexAttention"),
    "vit": ("attnkit.bench.vit", "a ViT training step for every attention, eager and compiled"),
    "packed": ("attnkit.bench.packed", "a Llama training step on mixed-length documents, padded vs packed"),
    "masks": ("attnkit.bench.masks", "masked attention: masks as data on our kernels against FlexAttention"),
    "decode": ("attnkit.bench.decode", "decoding on contiguous and paged KV caches, with the peers"),
    "cp": ("attnkit.bench.cp", "context-parallel attention over W GPUs: tokens/s and scaling"),
}


def _bench_help() -> str:
    lines = [
        "usage: attnkit bench [SUITE] [options]",
        "",
        "suites (default: quick):",
        *(f"  {name:<10} {text}" for name, (_, text) in BENCH_SUITES.items()),
        "",
        "Each suite's options: attnkit bench SUITE --help",
    ]
    return "\n".join(lines)


def cmd_bench(argv: list[str]) -> int:
    """``attnkit bench [SUITE] [options]``: every option after the suite goes to the suite's own parser."""
    if argv and argv[0] in ("-h", "--help"):
        print(_bench_help())
        return 0
    if argv and not argv[0].startswith("-"):
        suite, rest = argv[0], argv[1:]
        if suite not in BENCH_SUITES:
            raise CLIError(f"unknown suite {suite!r} (one of {', '.join(BENCH_SUITES)})")
    else:
        suite, rest = "quick", argv
    mod_name = BENCH_SUITES[suite][0]
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name == mod_name:
            raise CLIError(f"the {suite} suite is not part of this build") from None
        raise
    return int(mod.main(rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="attnkit", description="Fast and flexible attention for PyTorch.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="environment, device and backends")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    ex = sub.add_parser("explain", help="which backend serves a call, and why the others cannot")
    ex.add_argument(
        "--shape",
        type=_ints_of(4, "B,Hq,Sq,D"),
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
    ex.add_argument(
        "--dtype", choices=["fp16", "bf16", "fp32", "fp64"], help="default: bf16 on CUDA, fp32 on a CPU"
    )
    ex.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    ex.add_argument("--causal", action="store_true")
    ex.add_argument("--window", type=_ints_of(2, "left,right"), help="left,right (-1 = unbounded)")
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

    sub.add_parser(  # parsed by cmd_bench: each suite parses its own options
        "bench", help=f"benchmarks: {' | '.join(BENCH_SUITES)} (attnkit bench --help)", add_help=False
    )
    return p


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip(" -") for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input prints ``attnkit <command>: error: ...`` (one line) and returns 2.

    For ``info`` and ``explain`` bad input is also any ``AttentionInputError``, ``UnsupportedError`` or
    ``ValueError`` from the described call; a benchmark's own errors keep their traceback."""
    from attnkit.errors import AttentionInputError, UnsupportedError

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"attnkit {argv[0]}" if argv and argv[0] in ("info", "explain", "bench") else "attnkit"
    try:
        if argv and argv[0] == "bench":  # the suites parse their own options
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        try:
            return {"info": cmd_info, "explain": cmd_explain}[args.cmd](args)
        except (AttentionInputError, UnsupportedError, ValueError) as e:
            raise CLIError(_one_line(e)) from e
    except CLIError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
