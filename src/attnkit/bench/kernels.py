"""``attnkit bench kernels``: attention kernels against their peers, measured in one run with one timer.

Every row is timed with ``triton.testing.do_bench`` (CUDA events, median, warm-up), over several input sets
in rotation so that small shapes do not run out of L2. Each shape's backends are timed in turn, ``--rounds``
times over (3 on a GPU), each round in another order (:func:`round_order`), and each keeps its median
round: the lent GPUs' clocks and hosts drift by 5-10% within a minute, and alternating spreads that drift
over every backend alike (the ``spread`` column is each backend's (slowest - fastest) / median round).
FLOPs count only visible (query, key) pairs (``attnkit.backends.base.attention_flops``: 4·B·H·Sq·Sk·D for
dense forward, about half that causal, x3.5 for forward+backward). Peers run in the same process: every
SDPA backend (``torch.nn.attention.sdpa_kernel``), compiled FlexAttention, attnkit's ``triton`` backend,
attnkit ``auto``, and every optional peer that is installed (``attnkit:flash_attn4``, ``attnkit:flex_flash``,
``attnkit:xformers``, and FA4 / xFormers called directly).

Output: a table on the terminal, ``kernels.csv`` / ``kernels.json`` rows (GPU, torch, triton, attnkit
versions, date) and ``kernels.png`` (TFLOP/s vs sequence length, if matplotlib is installed) under ``--out``.
On a machine without CUDA it runs a tiny sweep of the CPU-capable backends and says so.

    python -m attnkit.bench.kernels [--quick] [--out bench_out] [--modes fwd,fwd_bwd] [--no-causal]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import sys

import torch

# (B, H, S, D) of docs/anchors.md, then the rest of a constant-token sweep for the plot
ANCHOR_SHAPES = [
    (32, 16, 512, 128),
    (4, 16, 4096, 128),
    (1, 16, 16384, 128),
    (4, 32, 4096, 64),
    (1, 32, 16384, 64),
    (32, 32, 512, 64),
]
SWEEP_SHAPES = [(16, 16, 1024, 128), (8, 16, 2048, 128), (2, 16, 8192, 128)]
CPU_SHAPES = [(1, 2, 64, 32), (1, 2, 128, 32)]


def _env_info() -> dict:
    import attnkit

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    gpu = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or 'cpu'})"
    )
    return dict(
        gpu=gpu,
        torch=torch.__version__,
        triton=tv,
        attnkit=attnkit.__version__,
        date=_dt.datetime.now().isoformat(timespec="seconds"),
    )


def _flops(B, H, S, D, causal, backward):
    from attnkit._call import normalize
    from attnkit.backends.base import attention_flops

    meta = torch.empty((B, H, S, D), device="meta")
    call = normalize(meta, meta, meta, causal=causal)
    return attention_flops(call, backward)


def _runners(causal: bool, on_gpu: bool, keep=frozenset()) -> dict:
    """name -> fn(q, k, v) -> out, only the names in ``keep`` (all when it is empty). Peers that cannot run
    here are left out with a one-line note (:func:`_peer_runners`)."""
    import torch.nn.functional as F

    import attnkit

    run = {}
    if on_gpu:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, be in (
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("sdpa_math", SDPBackend.MATH),
        ):

            def fn(q, k, v, be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            run[name] = fn
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention, dynamic=False)
            masks = {}

            def fn_flex(q, k, v):
                bm = None
                if causal:
                    key = (q.shape[-2], k.shape[-2])
                    if key not in masks:
                        masks[key] = create_block_mask(
                            lambda b, h, i, j: i >= j, None, None, key[0], key[1], device=q.device
                        )
                    bm = masks[key]
                return flex(q, k, v, block_mask=bm)

            run["flex"] = fn_flex
        except ImportError:
            pass
        run["attnkit:triton"] = lambda q, k, v: attnkit.attention(q, k, v, causal=causal, backend="triton")
        # deterministic backward (separate dQ pass, no atomics); the same forward
        run["attnkit:triton_det"] = lambda q, k, v: attnkit.attention(
            q, k, v, causal=causal, backend="triton", deterministic=True
        )
        run["attnkit:auto"] = lambda q, k, v: attnkit.attention(q, k, v, causal=causal)
        run.update(_peer_runners(causal, keep))
    else:
        run["attnkit:reference"] = lambda q, k, v: attnkit.attention(
            q, k, v, causal=causal, backend="reference"
        )
        run["sdpa (cpu)"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            run["attnkit:triton (interpreter)"] = lambda q, k, v: attnkit.attention(
                q, k, v, causal=causal, backend="triton"
            )
    return {name: fn for name, fn in run.items() if not keep or name in keep}


PEER_BACKENDS = ("flash_attn4", "flex_flash", "xformers")
FA4_DIRECT, XFORMERS_DIRECT = "fa4 (flash_attn.cute)", "xformers (direct)"
_NOTED: set = set()


def _note(name: str, why: str) -> None:
    """One line, once per run, for a peer that drops out of the run."""
    if name not in _NOTED:
        _NOTED.add(name)
        print(f"note: {name} drops out of this run: {why}", flush=True)


def _peer_import_error(name: str) -> str | None:
    """Why the package behind peer backend ``name`` does not import here (the import happens now), or None."""
    from attnkit.backends import _cute
    from attnkit.backends import xformers as xformers_backend

    return xformers_backend.import_error() if name == "xformers" else _cute.import_error()


def _peer_runners(causal: bool, keep=frozenset()) -> dict:
    """The optional peers that are installed and import here, of those in ``keep`` (all when empty):
    through attnkit's adapters (``attnkit:flash_attn4`` ...) and, for FA4 and xFormers, called directly in
    their own (B, S, H, D) layout, as their users call them. A peer that is unavailable or does not import
    drops out of the run with a one-line note (never a crash of the benchmark)."""
    import importlib

    import attnkit

    records = {r.name: r for r in attnkit.backends()}
    run = {}
    wanted = lambda name: not keep or name in keep  # noqa: E731
    builders = {f"attnkit:{name}": name for name in PEER_BACKENDS}
    builders.update({FA4_DIRECT: "flash_attn4", XFORMERS_DIRECT: "xformers"})
    for label, name in builders.items():
        if not wanted(label):
            continue
        rec = records.get(name)
        why = None if rec is None or rec.available else rec.reason
        if rec is None:
            why = f"no backend named {name}"
        try:
            why = why or _peer_import_error(name)
            if why is None:
                run[label] = _peer_fn(label, name, causal, importlib, attnkit)
        except Exception as e:  # a broken install drops the peer, never the benchmark
            why = _error(e)
        if why is not None:
            _note(label, why)
    return run


def _peer_fn(label: str, name: str, causal: bool, importlib, attnkit):
    """The runner ``label`` of peer backend ``name`` (imports its package: may raise)."""
    if label.startswith("attnkit:"):
        return lambda q, k, v: attnkit.attention(q, k, v, causal=causal, backend=name)
    if label == FA4_DIRECT:
        fa4 = importlib.import_module("flash_attn.cute")

        def fn_fa4(q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) views, as the adapter passes
            return fa4.flash_attn_func(q, k, v, causal=causal)[0].transpose(1, 2)

        return fn_fa4
    xops = importlib.import_module("xformers.ops")
    bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None

    def fn_xf(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias).transpose(1, 2)

    return fn_xf


def _timer(fn, on_gpu: bool, warmup_ms=25, rep_ms=100) -> float:
    if on_gpu:
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    from attnkit.bench._timing import median_ms  # the shared CPU timer: warm-up until the time settles

    return median_ms(fn, False, budget_ms=rep_ms / 4)


def round_order(n: int, r: int) -> list[int]:
    """The order of round ``r`` over ``n`` backends (indices): it starts at backend ``r mod n`` and steps by
    the r-th number coprime with n (1, then the next), so each round starts one backend later (clock drift
    within a round falls on every backend alike) and, as far as n allows, no backend follows the same one
    in two rounds (a backend run right after a heavy one may inherit its heat and lowered clocks, the lent
    H200 running at its power cap under load: with plain rotation ``auto`` always followed ``triton_det``)."""
    steps = [m for m in range(1, n) if math.gcd(m, n) == 1] or [1]
    m = steps[r % len(steps)]
    return [(r + i * m) % n for i in range(n)]


def prepare(fn, B, H, S, D, mode, dtype, device, on_gpu):
    """One timing step of ``fn`` (forward, or forward+backward) over rotating input sets, run once (compile,
    autotune) before it is returned."""
    need_grad = mode == "fwd_bwd"
    per_set = 3 * B * H * S * D * torch.tensor([], dtype=dtype).element_size()
    n_sets = max(1, min(4, math.ceil(200e6 / max(per_set, 1)))) if on_gpu else 1
    sets = []
    for _ in range(n_sets):
        qkv = [
            torch.randn(B, H, S, D, device=device, dtype=dtype).requires_grad_(need_grad) for _ in range(3)
        ]
        sets.append(qkv)
    grad = torch.randn(B, H, S, D, device=device, dtype=dtype)
    it = [0]

    def step():
        q, k, v = sets[it[0] % n_sets]
        it[0] += 1
        out = fn(q, k, v)
        if need_grad:
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None

    step()  # compile / autotune outside the timing
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out", help="folder for kernels.csv/json/png (default bench_out)")
    p.add_argument("--modes", default="fwd,fwd_bwd", help="comma list of fwd, fwd_bwd")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--quick", action="store_true", help="anchor shapes only (no extra sweep points)")
    p.add_argument("--no-causal", action="store_true", help="skip causal rows")
    p.add_argument("--backends", default="", help="comma list to keep (default: all that run here)")
    p.add_argument("--shapes", default="", help="'B,H,S,D;B,H,S,D' overrides the sweep")
    p.add_argument("--rounds", type=int, default=0, help="timings per backend, alternated (default 3, CPU 1)")
    args = p.parse_args(argv)

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    rounds = args.rounds if args.rounds > 0 else (3 if on_gpu else 1)
    # compiled FlexAttention recompiles per shape and grad mode: keep it compiled for the whole sweep
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    elif on_gpu:
        shapes = ANCHOR_SHAPES + ([] if args.quick else SWEEP_SHAPES)
    else:
        print(
            "attnkit bench kernels: no CUDA device, running a tiny CPU sweep (numbers mean nothing for GPUs)"
        )
        shapes = CPU_SHAPES
        dtype = torch.float32
    modes = [m for m in args.modes.split(",") if m]
    env = _env_info()
    print(
        f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | attnkit {env['attnkit']} | "
        f"{env['date']} | {str(dtype).split('.')[-1]}"
    )
    rows = []
    keep = set(filter(None, args.backends.split(",")))
    for causal in [False] if args.no_causal else [False, True]:
        runners = _runners(causal, on_gpu, keep)
        for name in sorted(keep - set(runners)):
            _note(name, "not a backend of this benchmark here (or it cannot run here)")
        for B, H, S, D in shapes:
            for mode in modes:
                flops = _flops(B, H, S, D, causal, mode == "fwd_bwd")
                steps, errors, times = {}, {}, {}
                for name, fn in runners.items():
                    if name == "sdpa_math" and S > 4096:
                        continue  # materialises S x S scores: minutes and tens of GB
                    try:
                        steps[name] = prepare(fn, B, H, S, D, mode, dtype, device, on_gpu)
                    except Exception as e:  # a peer that cannot run this shape is recorded, not fatal
                        errors[name] = _error(e)
                names = list(steps)
                for r in range(rounds if names else 0):  # every backend once a round (round_order)
                    for name in (names[i] for i in round_order(len(names), r)):
                        step = steps[name]
                        if name in errors:
                            continue
                        try:
                            times.setdefault(name, []).append(_timer(step, on_gpu))
                        except Exception as e:
                            errors[name] = _error(e)
                del steps
                if on_gpu:
                    torch.cuda.empty_cache()
                for name in runners:
                    if name not in errors and name not in times:
                        continue
                    ts = sorted(times.get(name, [])) if name not in errors else []
                    ms = ts[(len(ts) - 1) // 2] if ts else float("nan")  # the median round (lower middle)
                    spread = (ts[-1] - ts[0]) / ms if ts else float("nan")
                    row = dict(
                        env,
                        backend=name,
                        mode=mode,
                        B=B,
                        H=H,
                        S=S,
                        D=D,
                        causal=causal,
                        dtype=str(dtype).split(".")[-1],
                        ms=ms,
                        tflops=flops / (ms * 1e-3) / 1e12,
                        rounds=len(ts),
                        spread=spread,
                        error=errors.get(name, ""),
                    )
                    rows.append(row)
                    print(
                        f"{name:<28} {mode:<8} B={B:<3} H={H:<3} S={S:<6} D={D:<4} causal={causal!s:<5} "
                        f"{ms:9.3f} ms {row['tflops']:8.1f} TFLOP/s spread {spread:5.1%} "
                        f"rounds {'/'.join(f'{t:.3f}' for t in times.get(name, []))} {row['error']}",
                        flush=True,
                    )
                _write(rows, args.out, plot=False)
    _write(rows, args.out)
    _table(rows)
    return 0


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _write(rows, out_dir, plot: bool = True):
    """kernels.json / kernels.csv of the rows so far (rewritten after every shape, so that a run stopped
    by its time limit keeps what it measured) and, at the end, the plot."""
    os.makedirs(out_dir, exist_ok=True)
    if not rows:
        return
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "kernels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if not plot:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    panels = sorted({(r["mode"], r["causal"], r["D"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (mode, causal, D) in zip(axes[0], panels):
        sel = [r for r in rows if (r["mode"], r["causal"], r["D"]) == (mode, causal, D)]
        for name in sorted({r["backend"] for r in sel}):
            pts = sorted(
                (r["S"], r["tflops"]) for r in sel if r["backend"] == name and r["tflops"] == r["tflops"]
            )
            if pts:
                ax.plot([s for s, _ in pts], [t for _, t in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, D={D}{', causal' if causal else ''}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['gpu']}, {rows[0]['dtype']}, torch {rows[0]['torch']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "kernels.png"), dpi=110)


def _table(rows):
    """Terminal summary: TFLOP/s per backend (columns) for each (shape, mode, causal)."""
    names = list(dict.fromkeys(r["backend"] for r in rows))
    keys = list(dict.fromkeys((r["B"], r["H"], r["S"], r["D"], r["mode"], r["causal"]) for r in rows))
    short = [n.replace("attnkit:", "ak:").replace("sdpa_", "") for n in names]
    print("\nTFLOP/s (median)")
    print(f"{'B,H,S,D':<18}{'mode':<9}{'causal':<7}" + "".join(f"{s:>11}" for s in short))
    for key in keys:
        vals = {
            r["backend"]: r["tflops"]
            for r in rows
            if (r["B"], r["H"], r["S"], r["D"], r["mode"], r["causal"]) == key
        }
        cells = "".join(f"{vals.get(n, float('nan')):>11.1f}" for n in names)
        shape = ",".join(str(x) for x in key[:4])
        print(f"{shape:<18}{key[4]:<9}{key[5]!s:<7}{cells}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
