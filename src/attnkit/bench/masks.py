"""``attnkit bench masks``: masked attention, attnkit's kernels (masks carried as data) against FlexAttention.

Rows (GPU: B=2, H=16, S=8192, D=128, bf16): a causal document mask (8 documents), prefix-LM (prefix S/4),
a causal sliding window of 1024 (flags), a shared prefix (S/4 prompt, 4 responses of S/16 * 3); forward and
forward+backward. Backends in the same process, each timed in turn: attnkit ``triton`` (masks lowered to
column intervals, :mod:`attnkit.masks._intervals`), the same with ``ATTNKIT_TRITON_IV_SKIP=1``, compiled
FlexAttention (``flex``: its BlockMask built once per mask and cached), FlexAttention's FLASH backend
(``flex_flash``, when ``flash_attn.cute`` imports) and attnkit ``auto``. A backend that cannot serve a row
writes its reason in the ``error`` column. Then what training with a new packing every step costs: a
call with a new document mask each time against the same mask, and how many kernels 100 new packings and
20 new lengths compile (``attnkit.compile_count()``; 0 is the claim).

Timing: the benchmarks' one timer (``attnkit.bench._timing``: ``triton.testing.do_bench`` on a GPU).
Output: a table, and ``masks.csv`` / ``masks.json`` (with the environment) under ``--out``. Without CUDA a
tiny grid runs on the CPU (the Triton interpreter with ``TRITON_INTERPRET=1``, else the reference): a smoke
test, no speed claim.

    python -m attnkit.bench.masks [--out bench_out] [--shape B,H,S,D] [--modes fwd,fwd_bwd]
        [--backends triton,flex,...] [--cases document,prefix-lm,sliding,shared] [--no-packing]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os

import torch

import attnkit
from attnkit import masks as M
from attnkit.bench import _report, _timing

GPU_SHAPE = (2, 16, 8192, 128)
CPU_SHAPE = (1, 2, 64, 16)
BACKENDS = ("triton", "triton IV_SKIP=1", "flex", "flex_flash", "auto")


def doc_ids(S: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Sorted document ids (S,) int32 for ``n`` documents with random boundaries."""
    cuts = torch.sort(torch.randint(1, S, (n - 1,), generator=gen)).values
    return (torch.arange(S).view(1, S) >= cuts.view(-1, 1)).sum(0).to(torch.int32).to(device)


def cases(S: int, gen: torch.Generator, device) -> dict[str, dict]:
    """The rows' masks, as ``attention`` keyword arguments."""
    return {
        "document causal (8 docs)": {"mask": M.document(doc_ids(S, 8, gen, device)) & M.causal()},
        f"prefix-LM {S // 4}": {"mask": M.prefix_lm(S // 4)},
        f"sliding window {S // 8} causal": {"window": (S // 8, 0), "causal": True},
        f"shared prefix {S // 4} + 4x{3 * S // 16}": {"mask": M.shared_prefix(S // 4, [3 * S // 16] * 4)},
    }


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _available() -> set[str]:
    return {r.name for r in attnkit.backends() if r.available}


def mask_rows(shape, modes, on_gpu: bool, dtype, names=BACKENDS, keep=None) -> list[dict]:
    """One row per (case, backend, mode): ms, or the reason it could not run. ``keep``: the first words of
    the cases to run (None: all)."""
    B, H, S, D = shape
    dev = "cuda" if on_gpu else "cpu"
    timer = functools.partial(_timing.median_ms, on_gpu=on_gpu)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True) for _ in "qkv")
    g = torch.randn_like(q)
    have = _available() | {"auto", "triton IV_SKIP=1"}
    rows = []
    for case, kw in cases(S, gen, dev).items():
        if keep is not None and case.split()[0].lower() not in keep:
            continue
        for name in names:
            backend = name.split()[0]
            for mode in modes:
                row = {"case": case, "backend": name, "mode": mode, "ms": None, "error": None}
                rows.append(row)
                if backend not in have:
                    row["error"] = "not available here"
                    continue

                def fwd(backend=backend, kw=kw):
                    with torch.no_grad():
                        attnkit.attention(q, k, v, backend=backend, **kw)

                def fwd_bwd(backend=backend, kw=kw):
                    out = attnkit.attention(q, k, v, backend=backend, **kw)
                    torch.autograd.grad(out, (q, k, v), g)

                with _env("ATTNKIT_TRITON_IV_SKIP", "1" if "SKIP" in name else "0"):
                    try:
                        row["ms"] = timer(fwd if mode == "fwd" else fwd_bwd)
                    except Exception as e:  # a backend that cannot serve a row: say why, go on
                        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:110]}"
                if backend == "auto":
                    row["backend"] = f"auto ({attnkit.explain(q, k, v, **kw).chosen})"
    return rows


def packing_rows(shape, on_gpu: bool, dtype, packings: int = 100, lengths: int = 20) -> list[dict]:
    """A new document mask per call against one mask reused, and the kernels compiled by new packings and
    new lengths after a warm-up (triton; forward)."""
    B, H, S, D = shape
    dev = "cuda" if on_gpu else "cpu"
    timer = functools.partial(_timing.median_ms, on_gpu=on_gpu)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in "qkv")
    fixed = M.document(doc_ids(S, 8, gen, dev)) & M.causal()
    pool = [M.document(doc_ids(S, 8, gen, dev)) & M.causal() for _ in range(50)]
    it = iter(pool * 1000)
    same = timer(lambda: attnkit.attention(q, k, v, mask=fixed, backend="triton"))
    new = timer(lambda: attnkit.attention(q, k, v, mask=next(it), backend="triton"))
    before = attnkit.compile_count()
    for n in range(packings):
        mask = M.document(doc_ids(S, 2 + n % 13, gen, dev)) & M.causal()
        attnkit.attention(q, k, v, mask=mask, backend="triton")
    for s in range(lengths):
        L = max(S // 2 + (S // 64) * s, 2)
        qs = q[:, :, :L]
        attnkit.attention(qs, qs, qs, mask=M.prefix_lm(L // 3), backend="triton")
    compiles = attnkit.compile_count() - before
    return [
        {"case": "same document mask every call", "backend": "triton", "mode": "fwd", "ms": same},
        {"case": "a new document mask every call", "backend": "triton", "mode": "fwd", "ms": new},
        {
            "case": f"kernels compiled by {packings} new packings and {lengths} new lengths",
            "backend": "triton",
            "mode": "fwd",
            "compiles": compiles,
        },
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench masks", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, help="B,H,S,D (default 2,16,8192,128 on a GPU)")
    p.add_argument("--modes", default="fwd,fwd_bwd", help="comma list of fwd, fwd_bwd")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list to keep")
    p.add_argument("--cases", default=None, help="first words of the cases to keep (document,prefix-lm,...)")
    p.add_argument("--no-packing", action="store_true", help="skip the new-packing-per-call rows")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        shape, dtype = GPU_SHAPE, torch.bfloat16
    else:
        print("attnkit bench masks: no CUDA device; a tiny CPU smoke grid (no speed claims)")
        shape, dtype = CPU_SHAPE, torch.float32
    if args.shape:
        shape = tuple(int(x) for x in args.shape.split(","))
    modes = [m for m in args.modes.split(",") if m]
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":  # no kernels to run: the oracle stands in
        names = ["reference" if n.startswith("triton") else n for n in names]
        names = list(dict.fromkeys(names))
    keep = None if args.cases is None else {c.strip().lower() for c in args.cases.split(",")}
    rows = mask_rows(shape, modes, on_gpu, dtype, names, keep)
    if not args.no_packing and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"):
        rows += packing_rows(shape, on_gpu, dtype, *((100, 20) if on_gpu else (3, 2)))
    cols = [(k, k) for k in ("case", "backend", "mode", "ms", "compiles", "error")]
    print(_report.table(rows, cols))
    csv_path, json_path = _report.write(rows, _report.environment(), args.out, "masks")
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
