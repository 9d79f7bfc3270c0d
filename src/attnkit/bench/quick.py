"""``attnkit bench``: a quick suite on whatever machine this is (the README's main job).

A few attention shapes, forward and forward+backward, causal and not, on every backend that can serve each
call exactly, plus ``backend="auto"`` and plain ``torch.nn.functional.scaled_dot_product_attention`` as the
peer measured in the same run. On a GPU: bf16, realistic sizes, ``triton.testing.do_bench`` medians. On a
CPU: float32, tiny sizes and one thread (``--threads``), so it finishes in seconds (CPU timings are for
checking, not for comparing; with two threads on a CPU that other processes also use, calls swung 10-50x).
With one thread the CPU times are the process's CPU time, which other processes do not inflate.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit.bench import _report, _timing

GPU_SHAPES = [(4, 16, 2048, 128), (1, 16, 8192, 128), (8, 32, 1024, 64)]
CPU_SHAPES = [(1, 4, 256, 64), (2, 4, 128, 32)]


def _flops(B, H, S, D, causal, backward):
    f = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    return f * (3.5 if backward else 1.0)


def _capable(q, k, v, causal) -> tuple[list[str], str | None]:
    report = attnkit.explain(q, k, v, causal=causal)
    names = [c.name for c in report.candidates if c.status in ("chosen", "capable")]
    return names, report.chosen


def _runner(q, k, v, causal, backward, impl):
    if impl == "torch_sdpa":

        def call():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:

        def call():
            return attnkit.attention(q, k, v, causal=causal, backend=impl)

    if not backward:
        return call
    grad = torch.randn_like(q)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        call().backward(grad)

    return fwd_bwd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/quick", help="folder for quick.csv and quick.json")
    p.add_argument(
        "--budget-ms", type=float, default=None, help="time per measurement (default 100 GPU, 60 CPU)"
    )
    p.add_argument("--include-reference", action="store_true", help="also time the reference oracle on a GPU")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch threads while timing (default 1: tiny shapes, and steady on a shared machine)",
    )
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads or 1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    budget = args.budget_ms or (100.0 if on_gpu else 60.0)
    env = _report.environment()
    if not on_gpu:
        print(
            "attnkit bench: no GPU here; tiny float32 shapes on the CPU (checks the setup, not speed). "
            f"Run it on a GPU for real numbers. {torch.get_num_threads()} thread(s)"
            + (", times in process CPU time." if torch.get_num_threads() == 1 else ", wall times.")
        )
    jobs = [
        (shape, causal, backward)
        for shape in (GPU_SHAPES if on_gpu else CPU_SHAPES)
        for causal in (False, True)
        for backward in (False, True)
    ]
    # one thread on a CPU: its process CPU time is the calls' own cost, whatever else the machine runs
    clock = time.process_time if not on_gpu and torch.get_num_threads() == 1 else time.perf_counter
    rows = []
    for (B, H, S, D), causal, backward in _report.progress(jobs, "attnkit bench"):
        q, k, v = (
            torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=backward) for _ in range(3)
        )
        names, chosen = _capable(q, k, v, causal)
        if on_gpu and not args.include_reference:
            names = [n for n in names if n != "reference"]
        if not on_gpu:  # Triton on a CPU is its interpreter: a correctness tool, not a timing
            names = [n for n in names if n != "triton"]
        impls = ["auto"] + names + ["torch_sdpa"]
        for impl in impls:
            row = dict(
                shape=f"{B}x{H}x{S}x{D}",
                causal=causal,
                mode="fwd+bwd" if backward else "fwd",
                backend=impl if impl != "auto" else f"auto ({chosen})",
                ms=None,
                tflops=None,
                spread=None,
                note=None,
            )
            try:
                t = _timing.measure(_runner(q, k, v, causal, backward, impl), on_gpu, budget, clock=clock)
                tflops = _flops(B, H, S, D, causal, backward) / (t.ms * 1e-3) / 1e12
                row.update(ms=t.ms, tflops=tflops, spread=t.spread)
            except Exception as e:
                row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            rows.append(row)
    where = env.get("gpu") or env.get("cpu")
    print(
        f"\nattnkit bench on {where} ({dtype}, torch {env['torch']}, attnkit {env['attnkit']}, {env['date']})"
    )
    print(
        _report.table(
            rows,
            [
                ("shape", "B x H x S x D"),
                ("causal", "causal"),
                ("mode", "mode"),
                ("backend", "backend"),
                ("ms", "ms"),
                ("tflops", "TFLOP/s"),
                ("spread", "spread"),
                ("note", "note"),
            ],
        )
    )
    csv_path, json_path = _report.write(rows, env, args.out, "quick")
    print(f"\nwrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
