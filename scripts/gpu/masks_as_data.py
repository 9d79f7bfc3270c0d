"""GPU timing of masks carried as data (issue 14 item 3) against FlexAttention, in one run.

B=2 H=16 S=8192 D=128 bf16: causal document (8 docs), prefix-LM 2048, sliding window 1024 causal (flags),
shared prefix; forward and forward+backward; attnkit triton (default, and ATTNKIT_TRITON_IV_SKIP=1) against
flex (block mask built once, compiled) and, where it imports, flex_flash. Also the cost of a new packing per
call, and whether new packings and new lengths compile anything.

When to run: after changing the mask lowering (masks/_intervals.py) or the masked kernels, on a GPU.

    python scripts/gpu/masks_as_data.py            # prints one table; no file written
"""

from __future__ import annotations

import os

import torch
from triton.testing import do_bench

import attnkit
from attnkit import masks as M

B, H, S, D = 2, 16, 8192, 128
dev, dt = "cuda", torch.bfloat16


def docs(n, gen):
    cuts = torch.sort(torch.randint(1, S, (n - 1,), generator=gen)).values
    return (torch.arange(S).view(1, S) >= cuts.view(-1, 1)).sum(0).to(torch.int32).to(dev)


def cases(gen):
    return {
        "document causal (8 docs)": dict(mask=M.document(docs(8, gen)) & M.causal()),
        "prefix-LM 2048": dict(mask=M.prefix_lm(2048)),
        "sliding window 1024 causal": dict(window=(1024, 0), causal=True),
        "shared prefix 2048 + 4x1536": dict(mask=M.shared_prefix(2048, [1536] * 4)),
    }


def timed(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dt, requires_grad=True) for _ in "qkv")
    g = torch.randn_like(q)
    have = {r.name for r in attnkit.backends() if r.available}
    names = [n for n in ("triton", "flex", "flex_flash") if n in have]
    print(f"{'case':32s} {'backend':18s} {'fwd ms':>8s} {'fwd+bwd ms':>11s}")
    for case, kw in cases(gen).items():
        for name in names + ["triton IV_SKIP=1"]:
            backend = name.split()[0]
            os.environ["ATTNKIT_TRITON_IV_SKIP"] = "1" if "SKIP" in name else "0"
            try:
                def fwd(backend=backend, kw=kw):
                    with torch.no_grad():
                        attnkit.attention(q, k, v, backend=backend, **kw)

                def fwd_bwd(backend=backend, kw=kw):
                    out = attnkit.attention(q, k, v, backend=backend, **kw)
                    torch.autograd.grad(out, (q, k, v), g)

                print(f"{case:32s} {name:18s} {timed(fwd):8.3f} {timed(fwd_bwd):11.3f}")
            except Exception as e:  # a backend that cannot serve a case: say so, go on
                print(f"{case:32s} {name:18s} {type(e).__name__}: {str(e)[:60]}")
    os.environ["ATTNKIT_TRITON_IV_SKIP"] = "0"
    print("auto picks:", {c: attnkit.explain(q, k, v, **kw).chosen for c, kw in cases(gen).items()})

    # a new packing every call, against the same packing; then compiles over new packings and lengths
    fixed = M.document(docs(8, gen)) & M.causal()
    packs = [M.document(docs(8, gen)) & M.causal() for _ in range(50)]
    it = iter(packs * 100)
    same = timed(lambda: attnkit.attention(q, k, v, mask=fixed, backend="triton"))
    new = timed(lambda: attnkit.attention(q, k, v, mask=next(it), backend="triton"))
    print(f"new packing per call: {new:.3f} ms, same packing: {same:.3f} ms ({new / same:.2f}x)")
    before = attnkit.compile_count()
    for n in range(100):
        attnkit.attention(q, k, v, mask=M.document(docs(2 + n % 13, gen)) & M.causal(), backend="triton")
    for s in range(20):
        L = 1000 + 37 * s
        qs = q[:, :, :L]
        attnkit.attention(qs, qs, qs, mask=M.prefix_lm(L // 3), backend="triton")
    print("compiles over 100 packings and 20 lengths:", attnkit.compile_count() - before)


if __name__ == "__main__":
    main()
