"""Correctness and speed of the Gluon warp-specialized forward (``_gluon_fwd.py``) on an H100/H200.

    PYTHONPATH=src python3 scripts/gpu_gluon_fwd.py          # writes $OUT/gluon_fwd.jsonl (OUT default .)

1. Correctness, one subprocess per cfg (BLOCK_N, NUM_STAGES, OVERLAP, SPLIT) and one for the default
   (``cfg=None``), all in parallel with a timeout, so a hang (mbarrier phase bug) or an illegal memory
   access in one cfg cannot take the others with it: bf16 and fp16, bhsd / bshd (and bshd slices of a
   packed qkv tensor), MHA / GQA, causal (bottom-right) or not, Sq not a tile multiple, Sq > Sk (rows
   that see no key). Against a float64 PyTorch reference:
   max |out error| (and torch SDPA math in the same dtype as the yardstick: OK if <= 2x it + 1e-3), lse
   error, hi + lo error (log2 units, float64 sum), and exactness of rows with no visible key.
2. Timing (bf16, bhsd, do_bench median) for the cfgs that passed every check, next to attnkit's Triton
   forward, cuDNN SDPA and compiled FlexAttention (its own subprocess: its compiles are slow).

Environment: OUT (output folder), GLUON_CHECK_TIMEOUT / GLUON_TIME_TIMEOUT / GLUON_FLEX_TIMEOUT (seconds),
GLUON_CFGS ("128,2,1,0 64,3,0,0": restrict the cfgs), ATTNKIT_TRITON_AUTOTUNE (default 0 here: the shipped
H200-tuned tiles for the Triton baseline, no autotuning inside the time budget).
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

# (BLOCK_N, NUM_STAGES, OVERLAP, SPLIT): SPLIT = the two consumer warpgroups as two partitions
ALL_CFGS = [(bn, st, ov, False) for bn in (128, 64) for st in (2, 3) for ov in (True, False)]
ALL_CFGS += [(bn, st, True, True) for bn in (128, 64) for st in (2, 3)]
# (B, Hq, Hk, Sq, Sk, D, causal)
CHECK_SHAPES = [
    (2, 4, 4, 256, 256, 128, False),
    (2, 4, 4, 256, 256, 128, True),
    (1, 4, 2, 200, 384, 64, False),
    (1, 4, 2, 200, 384, 64, True),
    (1, 2, 2, 384, 128, 128, True),
    (1, 2, 2, 384, 128, 128, False),
    (2, 3, 3, 128, 512, 64, True),
    (1, 3, 1, 300, 256, 128, True),
]
LAYOUTS = ["bhsd", "bshd", "bshd_packed"]  # packed: q, k, v are slices of one (B, S, 3, H, D) tensor
DTYPES = ["bf16", "fp16"]
# (B, H, S, D); each timed causal and not
TIME_SHAPES = [(4, 16, 4096, 128), (1, 16, 16384, 128), (4, 32, 4096, 64), (32, 16, 512, 128)]


def cfg_name(cfg) -> str:
    if cfg is None:
        return "default"
    return f"n{cfg[0]}s{cfg[1]}{'o' if cfg[2] else 'x'}{'w' if len(cfg) > 3 and cfg[3] else ''}"


def cfg_arg(cfg) -> str:
    if cfg is None:
        return "default"
    return ",".join(str(int(x)) for x in cfg)


def parse_cfg(text: str):
    if text == "default":
        return None
    c = [int(x) for x in text.split(",")]
    return c[0], c[1], bool(c[2]), bool(c[3]) if len(c) > 3 else False


def emit(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def is_fatal(exc: BaseException) -> bool:
    """A CUDA error poisons the context: stop this subprocess instead of reporting garbage."""
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("CUDA error", "AcceleratorError", "illegal memory", "unspecified launch"))


# ------------------------------------------------------------------------------------------- checks


def make_inputs(shape, dtype, layout, seed):
    import torch

    B, Hq, Hk, Sq, Sk, D, _ = shape
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, device="cuda", dtype=torch.float32, generator=g).to(dtype)

    if layout == "bhsd":
        q, k, v = rnd(B, Hq, Sq, D), rnd(B, Hk, Sk, D), rnd(B, Hk, Sk, D)
        return (q, k, v), (q, k, v), "bhsd"
    if layout == "bshd":
        q, k, v = rnd(B, Sq, Hq, D), rnd(B, Sk, Hk, D), rnd(B, Sk, Hk, D)
    else:  # bshd_packed: needs Sq == Sk and Hq == Hk; otherwise q alone is a slice of a padded tensor
        if Sq == Sk and Hq == Hk:
            qkv = rnd(B, Sq, 3, Hq, D)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = rnd(B, Sq, Hq + 2, D)[:, :, 1 : Hq + 1]
            k, v = rnd(B, Sk, Hk, D), rnd(B, Sk, Hk, D)
    bhsd = tuple(t.transpose(1, 2) for t in (q, k, v))
    return (q, k, v), bhsd, "bshd"


def reference(qh, kh, vh, scale, causal):
    """float64 (out, lse, visible) in bhsd; rows with no visible key: out 0, lse -inf."""
    import torch

    Hq, Sq, Sk = qh.shape[1], qh.shape[2], kh.shape[2]
    G = Hq // kh.shape[1]
    q, k, v = qh.double(), kh.double().repeat_interleave(G, 1), vh.double().repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    vis = (j <= i + (Sk - Sq)) if causal else torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
    return p @ v, lse, vis


def sdpa_math(qh, kh, vh, scale, vis):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        G = qh.shape[1] // kh.shape[1]
        k, v = kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1)
        return F.scaled_dot_product_attention(qh, k, v, attn_mask=vis, scale=scale)


def run_checks(cfg, path):
    import torch

    from attnkit.backends.triton.kernels.hopper import fwd as gf

    ln2 = math.log(2.0)
    torch_dt = {"bf16": torch.bfloat16, "fp16": torch.float16}
    seed = 0
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
                    why = gf.supported(q, k, v, lay, causal, cfg=cfg, scale=scale)
                    if why is not None:
                        rec.update(ok=None, skipped=why)
                        emit(path, rec)
                        continue
                    out, lse, stats = gf.gluon_forward(q, k, v, lay, scale, causal, cfg=cfg)
                    torch.cuda.synchronize()
                    oh = out if lay == "bhsd" else out.transpose(1, 2)
                    ref_o, ref_lse, vis = reference(qh, kh, vh, scale, causal)
                    has = vis.any(-1)  # (Sq,) rows with a visible key
                    yard = sdpa_math(qh, kh, vh, scale, vis).double()
                    err_o = (oh.double() - ref_o).abs()
                    rec["nan"] = bool(torch.isnan(oh).any().item())
                    rec["out_err"] = err_o[:, :, has].max().item() if has.any() else 0.0
                    rec["sdpa_err"] = (yard - ref_o).abs()[:, :, has].max().item() if has.any() else 0.0
                    hi, lo = stats[0].double(), stats[1].double()
                    if has.any():
                        rec["lse_err"] = (lse.double() - ref_lse)[:, :, has].abs().max().item()
                        rec["stat_err"] = (hi + lo - ref_lse / ln2)[:, :, has].abs().max().item()
                        lse_mag = ref_lse[:, :, has].abs().max().item()
                    else:
                        rec["lse_err"] = rec["stat_err"] = lse_mag = 0.0
                    n_dead = int((~has).sum().item())
                    rec["dead_rows"] = n_dead
                    if n_dead:
                        dead = ~has
                        rec["dead_exact"] = bool(
                            (oh[:, :, dead] == 0).all().item()
                            and (lse[:, :, dead] == float("-inf")).all().item()
                            and (stats[0][:, :, dead] == float("inf")).all().item()
                            and (stats[1][:, :, dead] == 0).all().item()
                        )
                    tol_lse = 1e-3 * max(1.0, lse_mag)
                    rec["ok"] = bool(
                        not rec["nan"]
                        and rec["out_err"] <= 2 * rec["sdpa_err"] + 1e-3
                        and rec["lse_err"] <= tol_lse
                        and rec["stat_err"] <= tol_lse / ln2
                        and rec.get("dead_exact", True)
                    )
                except Exception as e:
                    rec.update(
                        ok=False, error=f"{type(e).__name__}: {e}"[-2000:], tb=traceback.format_exc()[-3000:]
                    )
                    emit(path, rec)
                    print(rec["tb"], file=sys.stderr, flush=True)
                    if is_fatal(e):
                        sys.exit(3)
                    continue
                emit(path, rec)


# ------------------------------------------------------------------------------------------- timing


def bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_row(q, k, v, causal, cfgs, flex, path):
    """One (shape, causal) row: every cfg of the Gluon kernel and the baselines, or FlexAttention alone."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnkit.backends.triton.kernels.hopper import fwd as gf
    from attnkit.backends.triton.ops import attention as ops

    B, H, S, D = q.shape
    scale = 1.0 / math.sqrt(D)
    flops = 4.0 * B * H * S * S * D * (0.5 if causal else 1.0)
    rec = dict(kind="flex" if flex else "time", shape=[B, H, H, S, S, D], causal=causal)

    def timed(name, fn):
        try:
            ms = bench(fn)
            rec[name] = dict(ms=ms, tflops=flops / ms * 1e-9)
        except Exception as e:
            rec[name] = dict(error=f"{type(e).__name__}: {e}"[-600:])
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
            if is_fatal(e):
                emit(path, rec)
                sys.exit(3)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        bm = None
        if causal:
            bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cuda")
        timed("flex", lambda: flex(q, k, v, block_mask=bm, scale=scale))
        emit(path, rec)
        return
    ref = cudnn()
    for cfg in cfgs:
        if S % cfg[0]:
            continue
        name = "gluon_" + cfg_name(cfg)

        def run(cfg=cfg):
            return gf.gluon_forward(q, k, v, "bhsd", scale, causal, cfg=cfg)

        try:
            out = run()[0]
            torch.cuda.synchronize()
            rec[name + "_vs_cudnn"] = (out.float() - ref.float()).abs().max().item()
        except Exception as e:
            rec[name] = dict(error=f"{type(e).__name__}: {e}"[-600:])
            print(traceback.format_exc()[-3000:], file=sys.stderr, flush=True)
            if is_fatal(e):
                emit(path, rec)
                sys.exit(3)
            continue
        timed(name, run)
    # window (-1, -1): none. (-1, 0) would be a right window of 0: causal even with causal=False
    timed(
        "triton", lambda: ops._triton_fwd(q, k, v, *[None] * 4, "bhsd", S, S, scale, causal, -1, -1, 0.0, 0.0)
    )
    timed("cudnn", cudnn)
    emit(path, rec)


def run_timing(cfgs, path, flex_only=False):
    import torch

    flex = None
    if flex_only:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
    for B, H, S, D in TIME_SHAPES:
        for causal in (False, True):
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            time_row(q, k, v, causal, cfgs, flex, path)
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- driver


def child_main(argv):
    mode, path = argv[0], argv[1]
    if mode == "check":
        run_checks(parse_cfg(argv[2]), path)
    elif mode == "time":
        run_timing([parse_cfg(c) for c in argv[2:]], path)
    elif mode == "flex":
        run_timing([], path, flex_only=True)


def spawn(args, log):
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("ATTNKIT_TRITON_AUTOTUNE", "0")
    env["PYTHONUNBUFFERED"] = "1"
    f = open(log, "w")  # noqa: SIM115 (closed by wait_all)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *args]
    return subprocess.Popen(cmd, stdout=f, stderr=f, env=env), f


def wait_all(procs, timeout):
    """{name: exit code or 'timeout'}; kills (by pid) what is still running at the deadline."""
    deadline = time.time() + timeout
    status = {}
    for name, (p, f) in procs.items():
        try:
            status[name] = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            status[name] = "timeout"
        f.close()
    return status


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt(x, spec=".1e"):
    return "-" if x is None else format(x, spec)


def main():
    t0 = time.time()
    out_dir = os.environ.get("OUT", ".")
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "gluon_fwd.jsonl")
    work = tempfile.mkdtemp(prefix="gluon_fwd_")
    cfgs = ALL_CFGS + [None]  # None: gluon_forward's default_cfg (checked, not timed again)
    if os.environ.get("GLUON_CFGS"):
        cfgs = [parse_cfg(c) for c in os.environ["GLUON_CFGS"].split()]
    rows = []
    try:
        import torch
        import triton

        env = dict(kind="env", torch=torch.__version__, triton=triton.__version__)
        env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        rows.append(env)
        print(env, flush=True)
    except Exception as e:
        rows.append(dict(kind="env", error=str(e)))

    # 1. correctness: every cfg in its own process, in parallel
    procs = {}
    for cfg in cfgs:
        name = cfg_name(cfg)
        args = ["check", os.path.join(work, f"check_{name}.jsonl"), cfg_arg(cfg)]
        procs[name] = spawn(args, os.path.join(work, f"check_{name}.log"))
    status = wait_all(procs, float(os.environ.get("GLUON_CHECK_TIMEOUT", 110)))
    passed = []
    print(f"\n== correctness ({time.time() - t0:.0f} s) ==")
    hdr = (
        f"{'cfg':8} {'dtype':5} {'layout':11} {'B,Hq,Hk,Sq,Sk,D':22} {'causal':6} {'out_err':>8} {'sdpa':>8}"
    )
    print(hdr + f" {'lse_err':>8} {'stat_err':>8} {'dead':>5} ok")
    for cfg in cfgs:
        name = cfg_name(cfg)
        recs = read_jsonl(os.path.join(work, f"check_{name}.jsonl"))
        rows.extend(recs)
        for r in recs:
            if r.get("skipped"):
                continue
            dead = f"{r.get('dead_rows', 0)}{'' if r.get('dead_exact', True) else '!'}"
            shape = ",".join(map(str, r["shape"]))
            verdict = "OK" if r["ok"] else "FAIL " + r.get("error", "")[:150]
            errs = " ".join(f"{fmt(r.get(x)):>8}" for x in ("out_err", "sdpa_err", "lse_err", "stat_err"))
            print(
                f"{name:8} {r['dtype']:5} {r['layout']:11} {shape:22} {int(r['causal']):6} {errs}",
                f"{dead:>5} {verdict}",
            )
        checked = [r for r in recs if r.get("ok") is not None]
        n_ok = sum(bool(r["ok"]) for r in checked)
        n_expected = len(CHECK_SHAPES) * len(DTYPES) * len(LAYOUTS)
        complete = len(recs) == n_expected
        good = status[name] == 0 and complete and n_ok == len(checked) and n_ok > 0
        summary = dict(
            kind="check_summary", cfg=name, exit=status[name], cases=len(recs), ok=n_ok, passed=good
        )
        rows.append(summary)
        verdict = "PASS" if good else "FAIL"
        print(
            f"-- {name}: exit {status[name]}, {n_ok}/{len(checked)} ok,",
            f"{len(recs)}/{n_expected} cases: {verdict}",
        )
        if not good:
            with open(os.path.join(work, f"check_{name}.log")) as f:
                log = f.read()
            if log.strip():
                print(f"   log tail of {name}:\n" + log[-2500:])
            rows.append(dict(kind="check_log", cfg=name, log=log[-6000:]))
        elif cfg is not None:
            passed.append(cfg)

    # 2. timing: the passing cfgs with the baselines, then compiled FlexAttention in its own process
    args = ["time", os.path.join(work, "time.jsonl"), *[cfg_arg(c) for c in passed]]
    procs = {"time": spawn(args, os.path.join(work, "time.log"))}
    status = wait_all(procs, float(os.environ.get("GLUON_TIME_TIMEOUT", 80)))
    procs = {"flex": spawn(["flex", os.path.join(work, "flex.jsonl")], os.path.join(work, "flex.log"))}
    status.update(wait_all(procs, float(os.environ.get("GLUON_FLEX_TIMEOUT", 75))))
    times = read_jsonl(os.path.join(work, "time.jsonl"))
    flexes = {
        (tuple(r["shape"]), r["causal"]): r.get("flex", {})
        for r in read_jsonl(os.path.join(work, "flex.jsonl"))
    }
    rows.extend(times)
    rows.extend(dict(kind="flex", shape=list(s), causal=c, flex=v) for (s, c), v in flexes.items())
    rows.append(dict(kind="time_status", **{k: v for k, v in status.items()}))
    for name in ("time", "flex"):
        if status[name] != 0:
            with open(os.path.join(work, f"{name}.log")) as f:
                log = f.read()
            print(f"\n{name} subprocess exit {status[name]}; log tail:\n{log[-2500:]}")
            rows.append(dict(kind=f"{name}_log", log=log[-6000:]))

    print(f"\n== TFLOP/s, bf16 bhsd, do_bench median ({time.time() - t0:.0f} s) ==")
    names = ["gluon_" + cfg_name(c) for c in passed]
    cols = names + ["triton", "cudnn", "flex"]
    print(
        f"{'B,H,S,D':18} {'causal':6} "
        + " ".join(f"{c.replace('gluon_', 'g_'):>9}" for c in cols)
        + "  best gluon"
    )
    for r in times:
        r["flex"] = flexes.get((tuple(r["shape"]), r["causal"]), {})
        vals = []
        for c in cols:
            x = r.get(c)
            vals.append(
                f"{x['tflops']:9.0f}"
                if isinstance(x, dict) and "tflops" in x
                else f"{'err' if x else '-':>9}"
            )
        got = [(r[n]["tflops"], n) for n in names if isinstance(r.get(n), dict) and "tflops" in r[n]]
        best = max(got, default=None)
        B, H, _, S, _, D = r["shape"]
        best_s = f"{best[1][6:]} {best[0]:.0f}" if best else "-"
        print(f"{f'{B},{H},{S},{D}':18} {int(r['causal']):6} " + " ".join(vals) + f"  {best_s}")
        errs = [f"{n[6:]}={r[n + '_vs_cudnn']:.1e}" for n in names if n + "_vs_cudnn" in r]
        if errs:
            print(f"{'':25} max |gluon - cudnn|: " + " ".join(errs))
    with open(final, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\nwrote {final} ({len(rows)} rows) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
