"""``attnkit bench decode``: decoding against KV caches, attnkit and its peers in one run, one timer.

Rows: B in {1, 16, 64}, KV length 1k .. 128k (every row full: ``cache_seqlens = L``), Sq in {1, 4}
(non-causal, so every peer computes the same thing), Hq = 32, Hk = 8, D = 128, bf16; caches contiguous
and paged (pages of 16, 64, 256 in random order). Peers in the same process: SDPA (``enable_gqa``, the
contiguous cache), FlexAttention's decode kernel (``kernel_options={"BACKEND": "TRITON_DECODE"}``,
compiled, contiguous), ``flash_attn.cute`` when it imports (contiguous, and paged through its
``page_table``), attnkit ``attention_with_kvcache`` (``triton``, ``validate=False``: what a serving
engine's decode loop or a CUDA graph runs; ``validate=True`` adds one device sync a call, see
docs/decoding.md) and attnkit ``auto`` (``attention()`` on the contiguous cache: what dispatch picks for a
short-query call). A cascade row: 64 rows sharing a 16k prefix with 1k keys each of their own,
``cascade_attention`` against decoding each row.

Timing: ``triton.testing.do_bench`` (CUDA events, warm-up, median), inputs rotated over enough copies to
exceed L2. ``TB/s`` is the K+V bytes a row holds, read once, over the time. Output: a table, and
``decode.csv`` / ``decode.json`` (with the environment) under ``--out``. Without CUDA a tiny grid runs on
the CPU (the reference and SDPA, plus the interpreter with ``TRITON_INTERPRET=1``): a smoke test only.

``--tune "tail=0,1;prefetch=0,1"`` times attnkit's kvcache call again under every combination of the
decode kernel's knobs (``ops/decode.TUNE_DEFAULTS``, docs/decoding.md "Tuning"), in the same process as the
default rows and the peers; those rows carry a ``tune`` column.

``--host`` prints only the host time per call at B=1, L=8k (calls enqueued back to back, no sync in the
timed loop) for attnkit's decode paths and SDPA, and a cProfile of the ``validate=False`` call.

    python -m attnkit.bench.decode [--quick] [--out bench_out] [--batch 1,16] [--lengths 8192,32768]
    python -m attnkit.bench.decode --quick --no-cascade --tune "tail=0,1;prefetch=0,1"
    python -m attnkit.bench.decode --host
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from attnkit.bench import _report

HQ, HK, D = 32, 8, 128
BATCHES = (1, 16, 64)
LENGTHS = (1024, 4096, 8192, 32768, 131072)
PAGES = (None, 16, 64, 256)
SQS = (1, 4)
MAX_CACHE_BYTES = 8 << 30  # K+V per configuration (B=64 stops at 32k)
L2_BYTES = 128 << 20


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _timer(on_gpu: bool):
    if on_gpu:
        import triton

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu(fn):
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu


def _paged_copy(k: torch.Tensor, page_size: int, gen: torch.Generator):
    """(pages (num_pages, ps, H, D), block_table int32 (B, max_pages)): k (B, L, H, D) in random order."""
    B, L, H, Dh = k.shape
    per_row = -(-L // page_size)
    n = B * per_row
    perm = torch.randperm(n, generator=gen).to(k.device)
    pages = torch.empty(n, page_size, H, Dh, dtype=k.dtype, device=k.device)
    padded = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, per_row * page_size - L))
    pages[perm] = padded.view(n, page_size, H, Dh)
    return pages, perm.view(B, per_row).to(torch.int32)


def _peers(on_gpu: bool) -> dict:
    """name -> fn(q bshd, k bshd, v bshd) for the contiguous cache; absent peers are left out."""
    import torch.nn.functional as F

    import attnkit

    peers = {}

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        )

    peers["sdpa"] = sdpa
    peers["attnkit_auto"] = lambda q, k, v: attnkit.attention(q, k, v, layout="bshd")
    if on_gpu:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex = torch.compile(flex_attention, dynamic=False)

            def flex_decode(q, k, v):
                return flex(
                    q.transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    enable_gqa=True,
                    kernel_options={"BACKEND": "TRITON_DECODE"},
                )

            peers["flex_decode"] = flex_decode
        except Exception as e:  # pragma: no cover - depends on torch
            print(f"flex decode unavailable: {e}")
        try:
            from flash_attn.cute import flash_attn_func

            peers["flash_attn4"] = lambda q, k, v: flash_attn_func(q, k, v)
        except Exception as e:
            print(f"flash_attn.cute unavailable: {type(e).__name__}: {e}")
    return peers


def _fa4_paged():
    try:
        from flash_attn.cute import flash_attn_varlen_func

        return flash_attn_varlen_func
    except Exception:
        return None


def run_rows(batches, lengths, pages, sqs, on_gpu, dtype, hq=HQ, hk=HK, d=D, peers=True) -> list[dict]:
    """Every (B, L, Sq, cache) row: attnkit's kvcache call and (``peers``) the peers on the same inputs."""
    import attnkit

    dev = "cuda" if on_gpu else "cpu"
    timer = _timer(on_gpu)
    gen = torch.Generator().manual_seed(0)
    peers = _peers(on_gpu) if peers else {}
    fa4_paged = _fa4_paged() if on_gpu and peers else None
    kv_backend = "triton" if (on_gpu or os.environ.get("TRITON_INTERPRET") == "1") else "reference"
    rows = []
    for B in batches:
        for L in lengths:
            nbytes = B * L * hk * 2 * d * torch.finfo(dtype).bits // 8
            if nbytes > MAX_CACHE_BYTES:
                continue
            sets = max(1, min(8, -(-L2_BYTES // nbytes))) if on_gpu else 1
            caches = [
                (
                    torch.randn(B, L, hk, d, dtype=dtype, device=dev),
                    torch.randn(B, L, hk, d, dtype=dtype, device=dev),
                )
                for _ in range(sets)
            ]
            seqlens = torch.full((B,), L, dtype=torch.int32, device=dev)
            for Sq in sqs:
                qs = [torch.randn(B, Sq, hq, d, dtype=dtype, device=dev) for _ in range(sets)]
                for ps in pages:
                    layout = "contiguous" if ps is None else f"paged{ps}"
                    if ps is None:
                        inputs = [(q, k, v, None) for q, (k, v) in zip(qs, caches)]
                    else:
                        inputs = []
                        for q, (k, v) in zip(qs, caches):
                            kp, table = _paged_copy(k, ps, gen)
                            inputs.append((q, kp, _same_order(v, kp, table, ps), table))
                    fns = {}
                    it = {"i": 0}

                    def rotate(f, inputs=inputs, it=it):
                        def call():
                            q, k, v, t = inputs[it["i"] % len(inputs)]
                            it["i"] += 1
                            return f(q, k, v, t)

                        return call

                    fns["attnkit_kvcache"] = rotate(
                        lambda q, k, v, t, sl=seqlens: attnkit.attention_with_kvcache(
                            q, k, v, cache_seqlens=sl, block_table=t, backend=kv_backend, validate=False
                        )
                    )
                    if ps is None:
                        for name, f in peers.items():
                            fns[name] = rotate(lambda q, k, v, t, f=f: f(q, k, v))
                    elif fa4_paged is not None and "flash_attn4" in peers:
                        fns["flash_attn4"] = rotate(
                            lambda q, k, v, t, sl=seqlens: _fa4_paged_call(fa4_paged, q, k, v, t, sl)
                        )
                    for name, fn in fns.items():
                        row = dict(B=B, L=L, Sq=Sq, cache=layout, backend=name)
                        try:
                            ms = timer(fn)
                            row.update(ms=ms, tb_s=nbytes / (ms * 1e-3) / 1e12)
                        except Exception as e:
                            row.update(ms=None, tb_s=None, error=f"{type(e).__name__}: {str(e)[:120]}")
                        rows.append(row)
            del caches
            if on_gpu:
                torch.cuda.empty_cache()
    return rows


def _same_order(v, kp, table, ps):
    """v's pages laid out in the page order of k's table (one table for both caches)."""
    B, L, H, Dh = v.shape
    per_row = table.shape[1]
    out = torch.empty(kp.shape[0], ps, H, Dh, dtype=v.dtype, device=v.device)
    padded = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, per_row * ps - L))
    out[table.view(-1).long()] = padded.view(B * per_row, ps, H, Dh)
    return out


def _fa4_paged_call(fn, q, k, v, table, seqlens):
    """FA4's paged path (``flash_attn.cute.flash_attn_varlen_func``, flash-attn-4 4.0.0b36): without
    cu_seqlens_q, q stays (B, Sq, Hq, D); k / v are the pages (num_pages, page_size, Hk, D); page_table is
    (B, max_pages) int32, contiguous in its last dim; seqused_k (B,) int32 the keys used per row."""
    return fn(q, k, v, page_table=table.contiguous(), seqused_k=seqlens)


def cascade_rows(on_gpu: bool, dtype, B=64, prefix=16384, own=1024, hq=HQ, hk=HK, d=D) -> list[dict]:
    """64 rows sharing a 16k prefix, 1k keys each of their own: cascade against per-row decoding."""
    import attnkit

    dev = "cuda" if on_gpu else "cpu"
    timer = _timer(on_gpu)
    backend = "triton" if on_gpu else "reference"
    q = torch.randn(B, 1, hq, d, dtype=dtype, device=dev)
    sk, sv = (torch.randn(prefix, hk, d, dtype=dtype, device=dev) for _ in range(2))
    ok, ov = (torch.randn(B, own, hk, d, dtype=dtype, device=dev) for _ in range(2))
    full_k = torch.cat([sk.expand(B, -1, -1, -1), ok], dim=1)
    full_v = torch.cat([sv.expand(B, -1, -1, -1), ov], dim=1)
    own_lens = torch.full((B,), own, dtype=torch.int32, device=dev)
    full_lens = own_lens + prefix
    fns = {
        "cascade": lambda: attnkit.cascade_attention(
            q, sk, sv, ok, ov, cache_seqlens=own_lens, backend=backend, validate=False
        ),
        "per_row_decode": lambda: attnkit.attention_with_kvcache(
            q, full_k, full_v, cache_seqlens=full_lens, backend=backend, validate=False
        ),
    }
    rows = []
    for name, fn in fns.items():
        ms = timer(fn)
        rows.append(dict(B=B, L=prefix + own, Sq=1, cache=f"shared{prefix}+own{own}", backend=name, ms=ms))
    return rows


def host_us(fn, n: int = 200, rounds: int = 5) -> float:
    """Host microseconds per call: ``n`` calls enqueued back to back, no sync inside the timed loop (the
    launch queue holds them all, so the loop waits on the host alone), the best of ``rounds``."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return best


def host_rows(dtype, B: int = 1, L: int = 8192, hq=HQ, hk=HK, d=D, profile: bool = True) -> list[dict]:
    """Host time per decode call at B=1 (where the GPU work is ~10 us): attnkit's paths and SDPA, and a
    cProfile of the ``validate=False`` call (top functions by own time)."""
    import cProfile
    import pstats

    import torch.nn.functional as F

    import attnkit

    q = torch.randn(B, 1, hq, d, dtype=dtype, device="cuda")
    k, v = (torch.randn(B, L, hk, d, dtype=dtype, device="cuda") for _ in range(2))
    kn = torch.randn(B, 1, hk, d, dtype=dtype, device="cuda")
    sl = torch.full((B,), L - 1, dtype=torch.int32, device="cuda")
    kp, table = _paged_copy(k, 64, torch.Generator().manual_seed(0))
    vp = _same_order(v, kp, table, 64)
    kv = attnkit.attention_with_kvcache
    fns = {
        "attnkit_kvcache validate=False": lambda: kv(
            q, k, v, cache_seqlens=sl, backend="triton", validate=False
        ),
        "attnkit_kvcache validate=True (a sync)": lambda: kv(q, k, v, cache_seqlens=sl, backend="triton"),
        "attnkit_kvcache +k_new/v_new": lambda: kv(
            q, k, v, cache_seqlens=sl, k_new=kn, v_new=kn, backend="triton", validate=False
        ),
        "attnkit_kvcache paged64": lambda: kv(
            q, kp, vp, cache_seqlens=sl, block_table=table, backend="triton", validate=False
        ),
        "attention triton_decode": lambda: attnkit.attention(q, k, v, layout="bshd", backend="triton_decode"),
        "attention auto": lambda: attnkit.attention(q, k, v, layout="bshd"),
        "sdpa": lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        ),
    }
    rows = [
        dict(B=B, L=L, Sq=1, cache="host", backend=name, host_us=host_us(fn)) for name, fn in fns.items()
    ]
    if profile:
        fn = fns["attnkit_kvcache validate=False"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print("cProfile of 500 attnkit_kvcache validate=False calls (own time):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return rows


def _tune_knobs():
    from attnkit.backends.triton.ops import decode

    return decode


def _tune_grid(text: str) -> list[dict]:
    """``"tail=0,1;prefetch=0,1"`` -> every combination as a dict (checked against the knobs there are)."""
    import itertools

    axes = []
    for part in text.split(";"):
        if not part.strip():
            continue
        key, _, vals = part.partition("=")
        key = key.strip()
        # (parse_tune: an unknown knob or a value that is not an int is an error naming it)
        axes.append([(key, _tune_knobs().parse_tune(f"{key}={v}", "--tune")[key]) for v in vals.split(",")])
    return [dict(c) for c in itertools.product(*axes)]


def _tune_arg(text: str) -> list[dict]:
    try:
        return _tune_grid(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--tune: ")) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench decode", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B 1 and 16, L 8k and 32k (and 128k at B=1), Sq 1")
    p.add_argument("--batch", type=_ints, default=None)
    p.add_argument("--lengths", type=_ints, default=None)
    p.add_argument("--pages", type=_ints, default=None, help="page sizes (0 = contiguous)")
    p.add_argument("--sq", type=_ints, default=None)
    p.add_argument("--no-cascade", action="store_true")
    p.add_argument(
        "--tune",
        default=None,
        type=_tune_arg,
        help='decode knob sweep, e.g. "tail=0,1;prefetch=0,1": the rows again for every combination, '
        "attnkit's kvcache call only (peers once, with the defaults); rows carry a 'tune' column",
    )
    p.add_argument(
        "--host", action="store_true", help="only the host time per call at B=1, L=8k (CUDA), and a cProfile"
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if args.host:
        if not on_gpu:
            print("attnkit bench decode --host: needs CUDA (host time against an asynchronous device)")
            return 0
        rows = host_rows(torch.bfloat16)
        print(_report.table(rows, [(k, k) for k in ("B", "L", "Sq", "backend", "host_us")]))
        return 0
    if on_gpu:
        dtype = torch.bfloat16
        batches, lengths, pages, sqs = BATCHES, LENGTHS, PAGES, SQS
        if args.quick:
            batches, lengths, pages, sqs = (1, 16), (8192, 32768, 131072), (None, 64), (1,)
        hq, hk, d = HQ, HK, D
    else:
        print("attnkit bench decode: no CUDA device; a tiny CPU smoke grid (no speed claims)")
        dtype = torch.float32
        batches, lengths, pages, sqs = (1, 2), (64,), (None, 16), (1,)
        hq, hk, d = 4, 2, 16
    batches = args.batch or batches
    lengths = args.lengths or lengths
    pages = [None if x == 0 else x for x in args.pages] if args.pages else pages
    sqs = args.sq or sqs
    rows = run_rows(batches, lengths, pages, sqs, on_gpu, dtype, hq, hk, d)
    if args.tune:
        try:
            for combo in args.tune:
                knobs = _tune_knobs().set_tune(**combo)
                tag = ",".join(f"{k}={v}" for k, v in combo.items())
                print(f"tune {tag}: {knobs}")
                for row in run_rows(batches, lengths, pages, sqs, on_gpu, dtype, hq, hk, d, peers=False):
                    rows.append(dict(row, tune=tag))
        finally:
            _tune_knobs().set_tune()
    if not args.no_cascade:
        if on_gpu:
            rows += cascade_rows(True, dtype)
        else:
            rows += cascade_rows(False, dtype, B=2, prefix=32, own=8, hq=hq, hk=hk, d=d)
    env = _report.environment()
    names = ("B", "L", "Sq", "cache", "backend") + (("tune",) if args.tune else ()) + ("ms", "tb_s", "error")
    cols = [(k, k) for k in names]
    print(_report.table(rows, cols))
    csv_path, json_path = _report.write(rows, env, args.out, "decode")
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
