"""Compile attnkit's Triton kernels for sm_90 on a machine without a GPU, and report what ptxas says.

    python scripts/sm90_compile.py fwd --cfg 128,128,8,3 --d 128 [--flag TMA=1] [--flag HAS_RIGHT=1]

Prints registers, spills, shared memory, and counts of the instructions that matter on Hopper (wgmma,
TMA bulk copies, mma.sync fallbacks). No device time: run it before spending a lease on a variant.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnkit.backends.triton.kernels import bwd as _bwd  # noqa: E402
from attnkit.backends.triton.kernels import fwd as _fwd

FLOATS = {"sm_scale", "softcap", "dropout_p"}
INTS = {"Hq", "Hk", "SQ", "SK"}
PTR_TYPES = {
    "Lse": "*fp32",
    "LseHi": "*fp32",
    "LseLo": "*fp32",
    "Slopes": "*fp32",
    "CuQ": "*i32",
    "CuK": "*i32",
    "Rng": "*i64",
    "Delta": "*fp32",
    "DLse": "*fp32",
    "DQacc": "*fp32",
    "DBias": "*fp32",
}


def compile_kernel(fn, constexprs: dict, num_warps: int, num_stages: int, dtype: str = "bf16"):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name[0].isupper() and name not in INTS:
            sig[name] = PTR_TYPES.get(name, "*" + dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            # as a launch with sizes divisible by 16 (every bench shape) would specialize them
            if name not in getattr(fn, "do_not_specialize", ()) and i not in getattr(
                fn, "do_not_specialize", ()
            ):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def report(k) -> dict:
    ptx = k.asm["ptx"]
    out = {
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma.sync": len(re.findall(r"\bmma\.sync", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "cp.async": len(re.findall(r"cp\.async\.cg|cp\.async\.ca", ptx)),
        "smem": k.metadata.shared,
        "warps": k.metadata.num_warps,  # > num_warps when the loop was warp-specialized
        "setmaxnreg": "setmaxnreg" in ptx,
    }
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        arch = "sm_90a"
        r = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", p, "-o", os.path.join(d, "k.o")],
            capture_output=True,
            text=True,
        )
        info = r.stderr
        m = re.search(r"Used (\d+) registers", info)
        out["regs"] = int(m.group(1)) if m else None
        m = re.search(r"(\d+) bytes spill stores", info)
        out["spill"] = int(m.group(1)) if m else None
    return out


UNIT_STRIDES = ("stride_ls", "stride_ds")

FWD_DEFAULTS = dict(
    GROUP=1,
    VARLEN=False,
    SOFTCAP=False,
    HAS_BIAS=False,
    HAS_ALIBI=False,
    HAS_LEFT=False,
    HAS_RIGHT=False,
    DROPOUT=False,
    REVERSE=False,
    FUSED_DQ=False,
    BIAS_GRAD=False,
    DEFER=True,
    PRECISION="tf32",
    TMA=False,
    WS=False,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["fwd", "dkdv", "dq"])
    ap.add_argument("--cfg", default="128,128,8,3")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--flag", action="append", default=[])
    a = ap.parse_args()
    bm, bn, w, s = map(int, a.cfg.split(","))
    c = dict(FWD_DEFAULTS, D=a.d, DV=a.d, BLOCK_D=a.d, BLOCK_DV=a.d, BLOCK_M=bm, BLOCK_N=bn)
    fn = {"fwd": _fwd.attn_fwd, "dkdv": _bwd.attn_bwd_dkdv, "dq": _bwd.attn_bwd_dq}[a.kernel]
    for f in a.flag:
        k, v = f.split("=")
        c[k] = {"1": True, "0": False}.get(v, int(v) if v.isdigit() else v)
    # a launch specializes integer arguments equal to 1 as constants: the row-stat strides always are
    c.update({n: 1 for n in UNIT_STRIDES if n in fn.arg_names and n not in c})
    c = {k: v for k, v in c.items() if k in fn.arg_names}
    k = compile_kernel(fn, c, w, s)
    print(a.kernel, a.cfg, a.flag, report(k))


if __name__ == "__main__":
    main()
