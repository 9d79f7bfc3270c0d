"""GPU probe: every CUDA backend against the float64 reference on a grid of features, forward and backward.

Prints one row per (case, backend): refused (with the first reason), or the relative errors of out / lse /
grads next to the error of plain PyTorch in the same dtype (STYLE.md's oracle rule: ok if <= 2x + floor).
Run on a GPU machine:  PYTHONPATH=src python3 scripts/gpu_probe.py
"""

from __future__ import annotations

import sys
import time

import torch

import attnkit
from attnkit import masks, mods
from attnkit._call import normalize
from attnkit.backends.reference import reference_forward


def rel(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), fin):
        return float("inf")
    a, b = torch.where(fin, a, 0), torch.where(fin, b, 0)
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def make(case, dtype, dev):
    g = torch.Generator(device=dev).manual_seed(hash(case) % 2**31)
    B, Hq, Hk, Sq, Sk, D, Dv = 2, 8, 2, 300, 300, 64, 64
    kw = {}
    if case == "causal_sq<sk":
        Sq = 200
        kw["causal"] = True
    elif case == "causal_sq>sk":
        Sk = 200
        kw["causal"] = True
    elif case == "causal":
        kw["causal"] = True
    elif case == "window":
        kw["window"] = (64, 0)
    elif case == "bias_grad":
        kw["bias"] = torch.randn(B, Hq, Sq, Sk, device=dev, dtype=dtype, generator=g).requires_grad_()
        kw["_learn"] = [kw["bias"]]
    elif case == "alibi":
        kw["alibi_slopes"] = torch.rand(Hq, device=dev, generator=g) * 0.1
    elif case == "document":
        kw["mask"] = masks.document(torch.arange(Sq, device=dev) * 3 // Sq) & masks.causal()
    elif case == "softcap_relbias":
        kw["softcap"] = 5.0
        table = torch.randn(Hq, 63, device=dev, generator=g).requires_grad_()
        kw["score_mod"] = mods.relative_bias(table)
        kw["_learn"] = [table]
    elif case == "d80_dv":
        D, Dv = 80, 128
    elif case == "d128":
        D = Dv = 128
    elif case == "lse":
        kw["return_lse"] = True
        kw["causal"] = True
    elif case == "deterministic":
        kw["deterministic"] = True
    if case == "thd":
        lens = [37, 0, 1, 150, 64]
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
        T = sum(lens)
        q = torch.randn(T, Hq, D, device=dev, dtype=dtype, generator=g)
        k = torch.randn(T, Hk, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(T, Hk, Dv, device=dev, dtype=dtype, generator=g)
        kw.update(layout="thd", cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    else:
        q = torch.randn(B, Hq, Sq, D, device=dev, dtype=dtype, generator=g)
        k = torch.randn(B, Hk, Sk, D, device=dev, dtype=dtype, generator=g)
        v = torch.randn(B, Hk, Sk, Dv, device=dev, dtype=dtype, generator=g)
    return q, k, v, kw


def grads(out, inputs, gout):
    return torch.autograd.grad(out, inputs, gout, allow_unused=True)


def main() -> int:
    dev = "cuda"
    cases = [
        "plain",
        "causal",
        "causal_sq<sk",
        "causal_sq>sk",
        "window",
        "bias_grad",
        "alibi",
        "document",
        "softcap_relbias",
        "d80_dv",
        "d128",
        "lse",
        "deterministic",
        "thd",
    ]
    names = [r.name for r in attnkit.backends() if r.available and r.name != "reference"]
    bad = 0
    print(
        f"{'case':<16} {'dtype':<9} {'backend':<15} {'out':>9} {'base':>9} {'grad':>9} {'gbase':>9}  status"
    )
    for dtype in (torch.bfloat16, torch.float16):
        for case in cases if dtype == torch.bfloat16 else ["plain", "causal_sq>sk", "bias_grad", "thd"]:
            q, k, v, kw = make(case, dtype, dev)
            leaves = [t.requires_grad_() for t in (q, k, v)]
            ins = leaves + kw.pop("_learn", [])
            # float64 reference on upcast inputs, and plain low-precision PyTorch as the error baseline
            call64 = normalize(
                *(t.double() for t in (q, k, v)),
                **{**kw, "bias": kw["bias"].double() if "bias" in kw else None},
            )
            ref, ref_lse = reference_forward(call64)
            gout = torch.randn_like(ref)
            gref = grads(ref, ins, gout)
            calllo = normalize(q, k, v, **kw)
            base, _ = reference_forward(calllo, upcast=False)
            gbase = grads(base, ins, gout.to(dtype))
            e_base = rel(base, ref)
            g_base = max(rel(a, b) for a, b in zip(gbase, gref) if b is not None)
            for name in names:
                t0 = time.time()
                try:
                    res = attnkit.attention(q, k, v, backend=name, **kw)
                except attnkit.UnsupportedError as e:
                    print(f"{case:<16} {str(dtype)[6:]:<9} {name:<15} refused: {e.reasons[0][:90]}")
                    continue
                except Exception as e:  # a backend that accepted and then failed is a bug
                    bad += 1
                    print(
                        f"{case:<16} {str(dtype)[6:]:<9} {name:<15} ERROR {type(e).__name__}: {str(e)[:150]}"
                    )
                    continue
                out, lse = res if isinstance(res, tuple) else (res, None)
                e_out = rel(out, ref)
                try:
                    g = grads(out, ins, gout.to(dtype))
                    e_g = max(rel(a, b) for a, b in zip(g, gref) if b is not None)
                except Exception as e:
                    e_g = float("inf")
                    print(f"   backward error: {type(e).__name__}: {str(e)[:150]}")
                e_lse = rel(lse, ref_lse) if lse is not None else 0.0
                ok = e_out <= 2 * e_base + 1e-3 and e_g <= 2 * g_base + 1e-3 and e_lse <= 1e-2
                bad += not ok
                print(
                    f"{case:<16} {str(dtype)[6:]:<9} {name:<15} {e_out:9.2e} {e_base:9.2e} {e_g:9.2e} "
                    f"{g_base:9.2e}  {'ok' if ok else 'FAIL'} ({time.time() - t0:.1f}s)"
                )
    # Recompilation check: new document boundaries and new thd lengths must not compile again.
    if "flex" in names:
        for trial in range(3):
            q, k, v, kw = make("document", torch.bfloat16, dev)
            kw["mask"] = (
                masks.document(torch.randint(0, 4, (300,), device=dev).sort().values) & masks.causal()
            )
            t0 = time.time()
            attnkit.attention(q, k, v, backend="flex", **kw).float().sum().item()
            lens = torch.randint(0, 200, (5,)).tolist()
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=dev)
            qt = torch.randn(sum(lens), 8, 64, device=dev, dtype=torch.bfloat16)
            t1 = time.time()
            attnkit.attention(
                qt,
                qt[:, :2],
                qt[:, :2],
                layout="thd",
                cu_seqlens_q=cu,
                cu_seqlens_k=cu,
                causal=True,
                backend="flex",
            ).float().sum().item()
            print(
                f"flex re-run {trial}: new doc mask {t1 - t0:.2f}s, new thd lengths {time.time() - t1:.2f}s"
            )
    print(f"probe done: {bad} failures")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
