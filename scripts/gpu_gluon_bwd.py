"""Correctness and speed of the Gluon dK/dV backward (``_gluon_bwd.py``) on an H100/H200.

    PYTHONPATH=src python3 scripts/gpu_gluon_bwd.py      # writes $OUT/gluon_bwd.jsonl (OUT default .)

1. Correctness, one subprocess per cfg (BLOCK_M, NUM_STAGES) in parallel with a timeout (a hang from an
   mbarrier phase bug, or a fault, cannot take the other cfgs with it): bf16 and fp16, bhsd / bshd / bshd
   slices of a packed tensor, MHA / GQA, causal or not, Sq and Sk not tile multiples, Sq > Sk (rows that see
   no key), dLSE != 0. hi comes from attnkit's forward, delta = rowsum(dO * O) - dLSE in float32. dK, dV
   against float64 autograd, with torch SDPA math in the same dtype as the yardstick: OK if the error is
   <= 2x the yardstick's + 1e-3 (the test suite's rule).
2. Timing (bf16, bhsd, do_bench median): the dK/dV kernel alone per cfg, and attnkit's whole backward with
   the Gluon dK/dV on and off (``ATTNKIT_TRITON_GLUON_BWD``), next to cuDNN SDPA's backward. TFLOP/s: dK/dV
   alone at 2x forward FLOPs (its four matmuls), whole backwards at 2.5x; causal counts visible pairs.

Environment: OUT, GLUON_CFGS ("64,2 32,3": restrict the cfgs), GLUON_CHECK_TIMEOUT, GLUON_TIME_TIMEOUT,
GLUON_SHAPES ("4,16,4096,128;32,16,512,128": the timed shapes), ATTNKIT_TRITON_AUTOTUNE (default 0).
"""

import json
import math
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import subprocess  # noqa: E402

from gpu_gluon_fwd import emit, is_fatal, make_inputs, read_jsonl, wait_all  # noqa: E402

ALL_CFGS = [(64, 2), (64, 3), (32, 2), (32, 3), (32, 4), (128, 2)]
# (B, Hq, Hk, Sq, Sk, D, causal)
CHECK_SHAPES = [
    (2, 4, 4, 256, 256, 128, False),
    (2, 4, 4, 256, 256, 128, True),
    (1, 4, 2, 200, 384, 64, False),
    (1, 4, 2, 200, 384, 64, True),
    (1, 2, 2, 384, 128, 128, True),
    (1, 2, 2, 384, 200, 128, False),
    (2, 3, 3, 128, 512, 64, True),
    (1, 6, 2, 300, 250, 128, True),
]
LAYOUTS = ["bhsd", "bshd", "bshd_packed"]
DTYPES = ["bf16", "fp16"]
TIME_SHAPES = [
    (4, 16, 4096, 128),
    (1, 16, 16384, 128),
    (32, 16, 512, 128),
    (4, 32, 4096, 64),
    (32, 32, 512, 64),
]


def spawn(args, log):
    """This script as a child process (``--child args``), output to ``log``."""
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("ATTNKIT_TRITON_AUTOTUNE", "0")
    env["PYTHONUNBUFFERED"] = "1"
    f = open(log, "w")  # noqa: SIM115 (closed by wait_all)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    return subprocess.Popen(cmd, stdout=f, stderr=f, env=env), f


def parse_cfg(text):
    return tuple(int(x) for x in text.split(","))


def cfg_name(cfg):
    return f"m{cfg[0]}s{cfg[1]}"


def grads_reference(qh, kh, vh, do_h, dlse, scale, causal):
    """float64 autograd of (out, lse) with loss <out, dO> + <lse, dLSE>; rows with no key: out 0, lse -inf."""
    import torch

    Hq, Sq, Sk = qh.shape[1], qh.shape[2], kh.shape[2]
    G = Hq // kh.shape[1]
    q, k, v = (t.detach().double().requires_grad_() for t in (qh, kh, vh))
    s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    vis = (j <= i + (Sk - Sq)) if causal else torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    has = vis.any(-1)
    lse = torch.logsumexp(s.masked_fill(~has[:, None], 0.0), -1)  # finite everywhere; dead rows unused
    p = torch.exp(s - lse[..., None]).masked_fill(~has[:, None], 0.0)
    out = p @ v.repeat_interleave(G, 1)
    loss = (out * do_h.double()).sum() + (lse.masked_fill(~has, 0.0) * dlse.double()).sum()
    loss.backward()
    return k.grad, v.grad, vis


def yardstick(qh, kh, vh, do_h, scale, vis):
    """dK, dV of torch SDPA math in the inputs' dtype (no dLSE term: the yardstick of rounding only)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = qh.shape[1] // kh.shape[1]
    q, k, v = (t.detach().clone().requires_grad_() for t in (qh, kh, vh))
    with sdpa_kernel(SDPBackend.MATH):
        o = F.scaled_dot_product_attention(
            q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=vis, scale=scale
        )
    o.backward(do_h)
    return k.grad, v.grad


def run_checks(cfg, path):
    import torch

    from attnkit.backends.triton.kernels.hopper import bwd as gb
    from attnkit.backends.triton.ops import attention as ops

    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16}
    seed = 100
    for shape in CHECK_SHAPES:
        B, Hq, Hk, Sq, Sk, D, causal = shape
        for dtype in DTYPES:
            for layout in LAYOUTS:
                seed += 1
                rec = dict(kind="check", cfg=cfg_name(cfg), dtype=dtype, layout=layout, shape=list(shape[:6]))
                rec["causal"] = causal
                try:
                    (q, k, v), (qh, kh, vh), lay = make_inputs(shape, torch_dt[dtype], layout, seed)
                    scale = 1.0 / math.sqrt(D)
                    out, lse, rng, stats = ops._triton_fwd(
                        q, k, v, None, None, None, None, lay, Sq, Sk, scale, causal, -1, -1, 0.0, 0.0
                    )
                    g = torch.Generator(device="cuda").manual_seed(seed)
                    do = torch.randn(out.shape, device="cuda", generator=g).to(out.dtype)
                    dlse = torch.randn(lse.shape, device="cuda", generator=g) * 0.5  # (B, Hq, Sq)
                    oh = out if lay == "bhsd" else out.transpose(1, 2)
                    do_h = do if lay == "bhsd" else do.transpose(1, 2)
                    delta = (oh.float() * do_h.float()).sum(-1) - dlse  # (B, Hq, Sq)
                    dk = torch.full_like(k, float("nan"), memory_format=torch.contiguous_format)
                    dv = torch.full_like(v, float("nan"), memory_format=torch.contiguous_format)
                    why = gb.supported(q, k, v, do, dk, dv, lay, causal, cfg=cfg, scale=scale)
                    if why is not None:
                        rec.update(ok=None, skipped=why)
                        emit(path, rec)
                        continue
                    gb.gluon_backward_dkdv(
                        q,
                        k,
                        v,
                        do,
                        stats[0].contiguous(),
                        delta.contiguous(),
                        dk,
                        dv,
                        lay,
                        scale,
                        causal,
                        cfg,
                    )
                    torch.cuda.synchronize()
                    dkh = dk if lay == "bhsd" else dk.transpose(1, 2)
                    dvh = dv if lay == "bhsd" else dv.transpose(1, 2)
                    ref_dk, ref_dv, vis = grads_reference(qh, kh, vh, do_h, dlse, scale, causal)
                    y_dk, y_dv = yardstick(qh, kh, vh, do_h, scale, vis)
                    # the yardstick has no dLSE term: compare it with the reference without one
                    ref0_dk, ref0_dv, _ = grads_reference(
                        qh, kh, vh, do_h, torch.zeros_like(dlse), scale, causal
                    )
                    os.environ["ATTNKIT_TRITON_GLUON_BWD"] = "0"  # the Triton dK/dV on the same inputs
                    _, tdk, tdv, _ = ops._triton_bwd(
                        do, q, k, v, out, stats, dlse, None, None, None, None, rng, lay, Sq, Sk, scale,
                        causal, -1, -1, 0.0, 0.0, False,
                    )  # fmt: skip
                    os.environ["ATTNKIT_TRITON_GLUON_BWD"] = "1"
                    tdk = tdk if lay == "bhsd" else tdk.transpose(1, 2)
                    tdv = tdv if lay == "bhsd" else tdv.transpose(1, 2)
                    rec["triton_dk_err"] = (tdk.double() - ref_dk).abs().max().item()
                    rec["triton_dv_err"] = (tdv.double() - ref_dv).abs().max().item()
                    rec["nan"] = bool(dk.isnan().any().item() or dv.isnan().any().item())
                    rec["dk_err"] = (dkh.double() - ref_dk).abs().max().item()
                    rec["dv_err"] = (dvh.double() - ref_dv).abs().max().item()
                    rec["y_dk"] = (y_dk.double() - ref0_dk).abs().max().item()
                    rec["y_dv"] = (y_dv.double() - ref0_dv).abs().max().item()
                    rec["ok"] = bool(
                        not rec["nan"]
                        and rec["dk_err"] <= 2 * rec["y_dk"] + 1e-3
                        and rec["dv_err"] <= 2 * rec["y_dv"] + 1e-3
                    )
                except Exception as e:
                    rec.update(ok=False, error=f"{type(e).__name__}: {e}"[-1500:])
                    print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
                    emit(path, rec)
                    if is_fatal(e):
                        sys.exit(3)
                    continue
                emit(path, rec)


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_shape(B, H, S, D, causal, cfgs, path):
    """One (shape, causal) row: dK/dV alone per cfg, attnkit's whole backward with and without it, cuDNN's."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnkit.backends.triton.kernels.hopper import bwd as gb
    from attnkit.backends.triton.ops import attention as ops

    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    fwd_flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    rec = dict(kind="time", shape=[B, H, S, D], causal=causal)
    out, lse, rng, stats = ops._triton_fwd(
        q, k, v, None, None, None, None, "bhsd", S, S, scale, causal, -1, -1, 0.0, 0.0
    )
    delta = (out.float() * do.float()).sum(-1)
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def timed(name, fn, flops):
        try:
            ms = bench(fn)
            rec[name] = dict(ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 1))
        except Exception as e:
            rec[name] = dict(error=f"{type(e).__name__}: {e}"[-600:])
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
            if is_fatal(e):
                emit(path, rec)
                sys.exit(3)

    for cfg in cfgs:
        if gb.supported(q, k, v, do, dk, dv, "bhsd", causal, cfg=cfg, scale=scale) is None:

            def dkdv(cfg=cfg):
                gb.gluon_backward_dkdv(q, k, v, do, stats[0], delta, dk, dv, "bhsd", scale, causal, cfg)

            timed("dkdv_" + cfg_name(cfg), dkdv, 2 * fwd_flops)

    bargs = (None, None, None, None, rng, "bhsd", S, S, scale, causal, -1, -1, 0.0, 0.0, False)

    def whole():
        return ops._triton_bwd(do, q, k, v, out, stats, None, *bargs)

    for flag in ("1", "0"):
        os.environ["ATTNKIT_TRITON_GLUON_BWD"] = flag
        timed("bwd_gluon" if flag == "1" else "bwd_triton", whole, 2.5 * fwd_flops)
    os.environ["ATTNKIT_TRITON_GLUON_BWD"] = "1"
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale)
    timed("bwd_cudnn", lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), 2.5 * fwd_flops)
    emit(path, rec)
    print(json.dumps(rec), flush=True)


def run_timing(cfgs, path):
    import torch

    shapes = TIME_SHAPES
    if os.environ.get("GLUON_SHAPES"):
        shapes = [tuple(int(x) for x in s.split(",")) for s in os.environ["GLUON_SHAPES"].split(";")]
    for B, H, S, D in shapes:
        for causal in (False, True):
            time_shape(B, H, S, D, causal, cfgs, path)
            torch.cuda.empty_cache()


def child_main(argv):
    mode, path = argv[0], argv[1]
    if mode == "check":
        run_checks(parse_cfg(argv[2]), path)
    else:
        run_timing([parse_cfg(c) for c in argv[2:]], path)


def main():
    t0 = time.time()
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "gluon_bwd.jsonl")
    work = tempfile.mkdtemp(prefix="gluon_bwd_")
    cfgs = ALL_CFGS
    if os.environ.get("GLUON_CFGS"):
        cfgs = [parse_cfg(c) for c in os.environ["GLUON_CFGS"].split()]
    import torch
    import triton

    rows = [
        dict(
            kind="env",
            torch=torch.__version__,
            triton=triton.__version__,
            device=torch.cuda.get_device_name(),
        )
    ]
    print(rows[0], flush=True)
    procs = {}
    for cfg in cfgs:
        name = cfg_name(cfg)
        procs[name] = spawn(
            ["check", os.path.join(work, f"check_{name}.jsonl"), ",".join(map(str, cfg))],
            os.path.join(work, f"check_{name}.log"),
        )
    status = wait_all(procs, float(os.environ.get("GLUON_CHECK_TIMEOUT", 150)))
    good = []
    print(f"\n== correctness ({time.time() - t0:.0f} s) ==")
    for cfg in cfgs:
        name = cfg_name(cfg)
        recs = read_jsonl(os.path.join(work, f"check_{name}.jsonl"))
        rows.extend(recs)
        bad = [r for r in recs if r.get("ok") is False]
        ran = [r for r in recs if r.get("ok") is not None]
        keys = (
            "cfg",
            "dtype",
            "layout",
            "shape",
            "causal",
            "dk_err",
            "y_dk",
            "dv_err",
            "y_dv",
            "nan",
            "error",
        )
        for r in bad[:6]:
            print("  FAIL", {x: r.get(x) for x in keys})
        worst = max((r["dk_err"] / (2 * r["y_dk"] + 1e-3) for r in ran if "dk_err" in r), default=None)
        worst_v = max((r["dv_err"] / (2 * r["y_dv"] + 1e-3) for r in ran if "dv_err" in r), default=None)
        ok = status[name] == 0 and not bad and len(ran) > 0
        n_skip = len(recs) - len(ran)
        print(
            f"{name}: exit {status[name]}, {len(ran) - len(bad)}/{len(ran)} ok ({n_skip} skipped),", end=" "
        )
        print(f"worst err/budget dK {worst} dV {worst_v}")
        rows.append(dict(kind="check_summary", cfg=name, status=str(status[name]), ok=ok, ran=len(ran)))
        if ok or (status[name] == 0 and not any(r.get("nan") or r.get("error") for r in recs)):
            good.append(cfg)  # timed unless it crashed or produced NaN (a tolerance miss is reported above)
        else:
            with open(os.path.join(work, f"check_{name}.log")) as f:
                print(f.read()[-2500:])
    print(f"\n== timing ({time.time() - t0:.0f} s): cfgs {good} ==", flush=True)
    tpath = os.path.join(work, "time.jsonl")
    procs = {
        "time": spawn(["time", tpath, *[",".join(map(str, c)) for c in good]], os.path.join(work, "time.log"))
    }
    status = wait_all(procs, float(os.environ.get("GLUON_TIME_TIMEOUT", 300)))
    recs = read_jsonl(tpath)
    rows.extend(recs)
    if status["time"] != 0:
        with open(os.path.join(work, "time.log")) as f:
            print("timing exit", status["time"], f.read()[-3000:])
    for r in recs:
        cols = {k: v.get("tflops", v.get("error", "")[:60]) for k, v in r.items() if isinstance(v, dict)}
        print(r["shape"], "causal" if r["causal"] else "nc", cols)
    with open(final, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"done in {time.time() - t0:.0f} s -> {final}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
