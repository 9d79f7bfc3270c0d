"""``attnkit bench masks``: masked attention, attnkit's kernels (masks carried as data) against FlexAttention.

Rows (GPU: B=2, H=16, S=8192, D=128, bf16), forward and forward+backward: the library masks (a causal document
mask of 8 documents, prefix-LM S/4, a causal sliding window S/8 as flags, a shared prefix of S/4 with 4
responses of 3S/16, global+window, a dilated window, chunked), the mods (softcap, ALiBi, a learnable T5 bias,
a learnable relative bias read twice: FlexAttention reads a clone the second time, which it needs), and
``mask_mod`` callables (a 2-D neighborhood on a grid of rows of 128 tokens, or of 8 when S is short, and a
window | a global column). Backends in the same process, each timed in turn: attnkit ``triton`` (masks lowered
to column intervals, :mod:`attnkit.masks._intervals`; with ``--backends`` also its A/B variants ``"triton
IV_SKIP=0|1"``, the empty-tile skip forced, ``"triton IV_BODY=0"``, every tile classified, and ``"triton
IV_LIST=0"``, the classified loops instead of tile lists), compiled
FlexAttention (``flex``: its BlockMask built once per mask and cached), FlexAttention's FLASH backend
(``flex_flash``, when ``flash_attn.cute`` imports) and attnkit ``auto``. A backend that cannot serve a row
writes its reason in the ``error`` column. Then what training with a new packing every step costs: a call with
a new document mask each time against the same mask, and how many kernels 100 new packings and 20 new lengths
compile (``attnkit.compile_count()``; 0 is the claim), and, per total length of ``--metadata``, what a new
packing's metadata costs: attnkit's interval lowering against ``create_block_mask`` eager and compiled, in ms
and peak extra device memory.

Timing: the benchmarks' one timer (``attnkit.bench._timing``: ``triton.testing.do_bench`` on a GPU).
Output: a table, and ``masks.csv`` / ``masks.json`` (with the environment) under ``--out``. Without CUDA a
tiny grid runs on the CPU (the Triton interpreter with ``TRITON_INTERPRET=1``, else the reference): a smoke
test, no speed claim.

    python -m attnkit.bench.masks [--out bench_out] [--shape B,H,S,D] [--modes fwd,fwd_bwd]
        [--backends triton,flex,...] [--cases document,prefix-lm,sliding,shared,softcap,...] [--no-packing]
        [--metadata 8192,32768,131072]
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
BACKENDS = ("triton", "flex", "flex_flash", "auto")
# A/B variants of triton for --backends: "triton IV_SKIP=0|1" (the empty-tile skip forced off / on; plain
# "triton" decides it per mask), "triton IV_BODY=0" (every tile of a row's range classified, no plain body),
# "triton IV_LIST=0" (the classified loops instead of tile lists: ops/ivlists.py), "triton GLUON_LISTED=0"
# (the listed Triton forward instead of the Hopper Gluon one), "triton GLUON_LISTED_BWD=0" (the listed
# Triton dK/dV instead of the Gluon one), "triton GLUON_DQ=1" (dQ added by the Gluon dK/dV kernel instead of
# the dQ pass); several may be combined ("triton IV_SKIP=1 IV_BODY=0").
_SWITCHES = ("IV_SKIP", "IV_BODY", "IV_LIST", "GLUON_LISTED", "GLUON_LISTED_BWD", "GLUON_DQ")


def doc_ids(S: int, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Sorted document ids (S,) int32 for ``n`` documents with random boundaries."""
    cuts = torch.sort(torch.randint(1, S, (n - 1,), generator=gen)).values
    return (torch.arange(S).view(1, S) >= cuts.view(-1, 1)).sum(0).to(torch.int32).to(device)


def _rel_twice(table: torch.Tensor, table2: torch.Tensor | None = None):
    """A learnable relative-position bias read twice per score (near and mirrored distance): what
    FlexAttention refuses unless the second read is of a clone (``table2``)."""
    R = table.shape[-1]
    half = R // 2
    second = table if table2 is None else table2

    def fn(s, b, h, q, kv):
        d = q - kv
        return s + table[h, d.clamp(-half, half) + half] + 0.5 * second[h, (-d).clamp(-half, half) + half]

    return attnkit.mods.from_score_mod(fn, "relative_bias read twice")


def cases(S: int, H: int, gen: torch.Generator, device) -> dict[str, dict]:
    """The rows: ``kw`` (``attention`` keyword arguments), ``learn`` (tensors that get gradients in
    fwd_bwd), ``flex_kw`` (what FlexAttention needs instead, where it differs: a clone for a second read)."""
    width = 128 if S >= 4096 else 8
    w = S // 8
    table = torch.randn(H, 2 * 1024 + 1, device=device, requires_grad=True)
    t5 = torch.randn(H, 32, device=device, requires_grad=True)
    rows = {
        "document causal (8 docs)": {"kw": {"mask": M.document(doc_ids(S, 8, gen, device)) & M.causal()}},
        f"prefix-LM {S // 4}": {"kw": {"mask": M.prefix_lm(S // 4)}},
        f"sliding window {w} causal": {"kw": {"window": (w, 0), "causal": True}},
        f"shared prefix {S // 4} + 4x{3 * S // 16}": {
            "kw": {"mask": M.shared_prefix(S // 4, [3 * S // 16] * 4)}
        },
        f"global_sliding 64 + {w}": {"kw": {"mask": M.global_sliding(64, w)}},
        f"dilated window {2 * w} step 2 causal": {"kw": {"mask": M.dilated_sliding_window(2 * w, 2)}},
        f"chunked {w}": {"kw": {"mask": M.chunked(w)}},
        "softcap 30 causal": {"kw": {"score_mod": attnkit.mods.softcap(30.0), "causal": True}},
        "alibi causal": {"kw": {"score_mod": attnkit.mods.alibi(alibi_slopes(H, device)), "causal": True}},
        "t5 bias (learnable) causal": {
            "kw": {"score_mod": attnkit.mods.t5_bias(t5, 32, 128), "causal": True},
            "learn": (t5,),
        },
        "relative bias read twice (learnable) causal": {
            "kw": {"score_mod": _rel_twice(table), "causal": True},
            "learn": (table,),
            "flex_kw": lambda: {"score_mod": _rel_twice(table, table.clone()), "causal": True},
        },
    }
    if S % width == 0:
        grid = M.neighborhood_2d(S // width, width, 15)
        rows[f"neighborhood_2d {S // width}x{width} k=15 (mask_mod)"] = {"kw": {"mask": grid}}
    either = M.sliding_window(w, w) | M.from_mask_mod(lambda b, h, q, kv: kv < 64)
    rows[f"window {w} | global 64 (mask_mod)"] = {"kw": {"mask": either}}
    return rows


def alibi_slopes(H: int, device) -> torch.Tensor:
    """ALiBi's geometric slopes for ``H`` heads."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], device=device)


@contextlib.contextmanager
def _env(name: str, value: str):
    """``name`` set to ``value`` inside the block."""
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


def kept(case: str, keep) -> bool:
    """Whether ``--cases`` keeps ``case``: its first word starts with one of ``keep`` (lower case; None keeps
    every case), so that ``global`` keeps "global_sliding 64 + 1024" and ``prefix-lm`` "prefix-LM 2048"."""
    first = case.split()[0].lower()
    return keep is None or any(first.startswith(k) for k in keep)


def mask_rows(shape, modes, on_gpu: bool, dtype, names=BACKENDS, keep=None) -> list[dict]:
    """One row per (case, backend, mode): ms, or the reason it could not run. ``keep``: the starts of the
    first words of the cases to run (:func:`kept`; None: all)."""
    B, H, S, D = shape
    dev = "cuda" if on_gpu else "cpu"
    timer = functools.partial(_timing.median_ms, on_gpu=on_gpu)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True) for _ in "qkv")
    g = torch.randn_like(q)
    have = _available() | {"auto"}  # (the A/B variants of triton: its first word is "triton")
    rows = []
    for case, spec in cases(S, H, gen, dev).items():
        if not kept(case, keep):
            continue
        learn = spec.get("learn", ())
        for name in names:
            backend = name.split()[0]
            kw_of = spec["flex_kw"] if "flex_kw" in spec and backend.startswith("flex") else None
            for mode in modes:
                row = {"case": case, "backend": name, "mode": mode, "ms": None, "error": None}
                rows.append(row)
                if backend not in have:
                    row["error"] = "not available here"
                    continue

                def fwd(backend=backend, kw=spec["kw"], kw_of=kw_of):
                    with torch.no_grad():
                        attnkit.attention(q, k, v, backend=backend, **(kw_of() if kw_of else kw))

                def fwd_bwd(backend=backend, kw=spec["kw"], kw_of=kw_of, learn=learn):
                    out = attnkit.attention(q, k, v, backend=backend, **(kw_of() if kw_of else kw))
                    torch.autograd.grad(out, (q, k, v, *learn), g)

                with contextlib.ExitStack() as forced:
                    for word in name.split()[1:]:  # (checked by main: VAR=0|1, VAR in _SWITCHES)
                        var, _, value = word.partition("=")
                        forced.enter_context(_env(f"ATTNKIT_TRITON_{var}", value))
                    try:
                        row["ms"] = timer(fwd if mode == "fwd" else fwd_bwd)
                    except Exception as e:  # a backend that cannot serve a row: say why, go on
                        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:110]}"
                if backend == "auto":  # (asked as the row ran: the forward rows without grad)
                    with torch.no_grad() if mode == "fwd" else contextlib.nullcontext():
                        row["backend"] = f"auto ({attnkit.explain(q, k, v, **spec['kw']).chosen})"
                print(f"  {case} | {row['backend']} | {mode} | {row['ms'] or row['error']}", flush=True)
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


def metadata_rows(lengths, on_gpu: bool, dtype, heads: int = 16, D: int = 128) -> list[dict]:
    """What a new packing of 8 documents costs before any attention runs, at each total length in
    ``lengths`` (B=1): attnkit's lowering to column intervals (``masks._intervals.lower``, fresh doc ids
    each time) against FlexAttention's ``create_block_mask`` eager and compiled; ms and the peak extra
    device memory (MiB). Lowering is measured on a call's normalized view, as ``attention`` does it."""
    gen = torch.Generator().manual_seed(2)
    rows = []
    for S in lengths:
        rows += _metadata_at(S, on_gpu, dtype, heads, D, gen)
    return rows


def _metadata_at(S: int, on_gpu: bool, dtype, heads: int, D: int, gen) -> list[dict]:
    from attnkit._call import normalize
    from attnkit.masks import _intervals

    dev = "cuda" if on_gpu else "cpu"
    timer = functools.partial(_timing.median_ms, on_gpu=on_gpu, budget_ms=50.0)
    q = torch.empty(1, heads, S, D, device=dev, dtype=dtype)
    ids = [doc_ids(S, 8, gen, dev) for _ in range(8)]
    it = iter(ids * 100000)
    call = normalize(q, q, q, mask=M.document(ids[0]) & M.causal())

    def ours():
        _intervals.lower(M.document(next(it)) & M.causal(), call)

    def flex(build):
        def run():
            d = next(it)
            build(lambda b, h, qi, ki: (d[qi] == d[ki]) & (qi >= ki), 1, None, S, S, device=dev)

        return run

    builders = [("attnkit (intervals)", ours)]
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        builders.append(("create_block_mask eager", flex(create_block_mask)))
        if on_gpu:  # (on a CPU, inductor's C++ build would dominate a smoke run)
            builders.append(("create_block_mask compiled", flex(torch.compile(create_block_mask))))
    except ImportError:
        pass
    rows = []
    for name, fn in builders:
        row = {"case": f"new packing metadata S={S}", "backend": name, "mode": "build", "ms": None}
        rows.append(row)
        try:
            fn()  # warm-up (compilation for the compiled builder)
            base = _peak_reset(on_gpu)
            fn()  # (one call alone: the timer's own buffers must not count)
            row["peak_mib"] = _peak_mib(on_gpu, base)
            row["ms"] = timer(fn)
        except Exception as e:  # out of memory at long S (flex eager), or a builder that cannot run
            row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:110]}"
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


def _peak_reset(on_gpu: bool) -> int:
    if not on_gpu:
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_mib(on_gpu: bool, base: int) -> float | None:
    if not on_gpu:
        return None
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit bench masks", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default=None, help="B,H,S,D (default 2,16,8192,128 on a GPU)")
    p.add_argument("--modes", default="fwd,fwd_bwd", help="comma list of fwd, fwd_bwd")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list to keep")
    p.add_argument("--cases", default=None, help="starts of the cases' first words: document,global,...")
    p.add_argument("--no-packing", action="store_true", help="skip the new-packing-per-call rows")
    p.add_argument(
        "--metadata",
        default=None,
        help="lengths of the new-packing metadata rows (GPU default 8192,32768,131072; 0: none)",
    )
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
    for n in names:
        for word in n.split()[1:]:
            var, _, value = word.partition("=")
            if not n.startswith("triton ") or var not in _SWITCHES or value not in ("0", "1"):
                p.error(f"--backends: {n!r} (variants: 'triton IV_SKIP=0|1', 'triton IV_BODY=0|1', "
                        "'triton IV_LIST=0|1', 'triton GLUON_LISTED=0|1', 'triton GLUON_LISTED_BWD=0|1', "
                        "'triton GLUON_DQ=0|1')")
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":  # no kernels to run: the oracle stands in
        names = ["reference" if n.startswith("triton") else n for n in names]
        names = list(dict.fromkeys(names))
    keep = None if args.cases is None else {c.strip().lower() for c in args.cases.split(",")}
    rows = mask_rows(shape, modes, on_gpu, dtype, names, keep)
    if not args.no_packing and (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"):
        rows += packing_rows(shape, on_gpu, dtype, *((100, 20) if on_gpu else (3, 2)))
    lengths = args.metadata or ("8192,32768,131072" if on_gpu else "0")
    lengths = [int(x) for x in lengths.split(",") if int(x) > 0]
    if lengths:
        rows += metadata_rows(lengths, on_gpu, dtype)
    cols = [(k, k) for k in ("case", "backend", "mode", "ms", "peak_mib", "compiles", "error")]
    print(_report.table(rows, cols))
    csv_path, json_path = _report.write(rows, _report.environment(), args.out, "masks")
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
