"""Compile the Gluon warp-specialized kernels for sm_90a on a machine without a GPU: the forward
(``_gluon_fwd.py``) or, with ``--kernel bwd``, the dK/dV backward (``_gluon_bwd.py``, cfg BLOCK_M,NUM_STAGES).

    python scripts/sm90_compile_gluon.py [--kernel fwd|bwd] [--d 64 128] [--causal 0 1] [--cfg 128,2,1 ...]
                                         [--dtype bf16] [--layout bhsd] [--dump DIR]

For every (D, causal, cfg) it prints what ptxas says (registers, spill bytes, shared memory, warnings such
as wgmma serialization), the setmaxnreg budgets of the partitions, the highest register the SASS touches
(the consumer's real peak: the kernel-wide ptxas count is only the entry budget), local-memory traffic,
and counts of the instructions that matter (wgmma, TMA, mbarrier ops, CTA barriers, shared loads/stores
that betray a layout conversion). No device time: run it before spending a lease.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

from attnkit.backends.triton.kernels.hopper import bwd as gb  # noqa: E402
from attnkit.backends.triton.kernels.hopper import fwd as gf  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def desc_signature(dtype: torch.dtype, rows: int, cols: int, block_rows: int, d: int) -> str:
    """The signature string a launch would give a gluon TensorDescriptor (built on a CPU tensor)."""
    t = torch.empty(rows, cols, dtype=dtype)
    layout = triton.experimental.gluon.language.NVMMASharedLayout.get_default_for(
        [block_rows, d], gf.DTYPES[dtype]
    )
    desc = gf.TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, d], layout)
    return native_specialize_impl(BaseBackend, desc, False, True, True)[0]


def compile_fwd(d: int, causal: bool, cfg, dtype: str = "bf16", layout: str = "bhsd"):
    block_n, stages, overlap, split, persistent = (tuple(cfg) + (False, False))[:5]
    tdt = TORCH_DTYPES[dtype]
    cols = d if layout == "bhsd" else 4 * d
    sig = {
        "q_desc": desc_signature(tdt, 1024, cols, gf.BLOCK_M, d),
        "k_desc": desc_signature(tdt, 1024, cols, block_n, d),
        "v_desc": desc_signature(tdt, 1024, cols, block_n, d),
        "Out": "*" + dtype,
        "Lse": "*fp32",
        "Stats": "*fp32",
        "c": "fp32",
    }
    constexprs = {
        "BSHD": layout == "bshd",
        "CAUSAL": causal,
        "BLOCK_M": gf.BLOCK_M,
        "BLOCK_N": block_n,
        "HEAD_D": d,
        "NUM_STAGES": stages,
        "OVERLAP": overlap,
        "SPLIT": split,
        "PERSISTENT": persistent,
    }
    src = _source(gf._attn_fwd_ws, sig, constexprs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4 if split else gf.NUM_WARPS, "maxnreg": gf.MAXNREG},
    )


def _source(fn, sig: dict, constexprs: dict):
    """A GluonASTSource with the attributes a launch would give: 16-divisible pointers and strides."""
    plain = set(fn.do_not_specialize)  # head counts and lengths: never specialized, as at launch
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name not in sig:
            sig[name] = "i32"
            if name not in plain and i not in plain:  # strides: multiples of 16 in every bench shape
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif sig[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return GluonASTSource(fn, sig, constexprs, attrs)


def compile_bwd(d: int, causal: bool, cfg, dtype: str = "bf16", layout: str = "bhsd"):
    block_m, stages = cfg
    tdt = TORCH_DTYPES[dtype]
    cols = d if layout == "bhsd" else 4 * d
    sig = {
        "q_desc": desc_signature(tdt, 1024, cols, block_m, d),
        "do_desc": desc_signature(tdt, 1024, cols, block_m, d),
        "k_desc": desc_signature(tdt, 1024, cols, gb.BLOCK_N, d),
        "v_desc": desc_signature(tdt, 1024, cols, gb.BLOCK_N, d),
        "DK": "*" + dtype,
        "DV": "*" + dtype,
        "Hi": "*fp32",
        "Delta": "*fp32",
        "c": "fp32",
        "scale": "fp32",
    }
    constexprs = {
        "BSHD": layout == "bshd",
        "CAUSAL": causal,
        "BLOCK_M": block_m,
        "HEAD_D": d,
        "NUM_STAGES": stages,
    }
    src = _source(gb._attn_bwd_dkdv_ws, sig, constexprs)
    options = {"num_warps": 4, "maxnreg": gb.MAXNREG}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def report(k, dump: str | None = None, tag: str = "") -> dict:
    ptx = k.asm["ptx"]
    out = {
        "smem": k.metadata.shared,
        "warps": k.metadata.num_warps,
        "setmaxnreg": sorted(
            set(int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))
        ),
        "wgmma": count(r"wgmma\.mma_async", ptx),
        "wgmma.wait": count(r"wgmma\.wait_group", ptx),
        "tma": count(r"cp\.async\.bulk\.tensor", ptx),
        "mbar.wait": count(r"mbarrier\.try_wait", ptx),
        "mbar.arrive": count(r"mbarrier\.arrive\.shared", ptx),
        "mbar.expect_tx": count(r"mbarrier\.arrive\.expect_tx", ptx),
        "bar.sync": count(r"\bbar\.sync|\bbarrier\.sync", ptx),
        "ld.shared": count(r"\bld\.shared", ptx),
        "st.shared": count(r"\bst\.shared", ptx),
        "stmatrix": count(r"stmatrix", ptx),
        "ex2": count(r"ex2\.approx", ptx),
        "fma.f32": count(r"fma\.rn\.f32", ptx),
    }
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        cubin = os.path.join(d, "k.cubin")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run(
            [os.path.join(BIN, "ptxas"), "-v", "--gpu-name=sm_90a", p, "-o", cubin],
            capture_output=True,
            text=True,
        )
        info = r.stderr
        m = re.search(r"Used (\d+) registers", info)
        out["regs"] = int(m.group(1)) if m else None
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        out["spill"] = (int(m.group(1)), int(m.group(2))) if m else None
        m = re.search(r"(\d+) bytes stack frame", info)
        out["stack"] = int(m.group(1)) if m else None
        out["ptxas_warnings"] = [ln.strip() for ln in info.splitlines() if "warning" in ln.lower()]
        if r.returncode != 0:
            out["ptxas_error"] = info[-2000:]
            return out
        sass = subprocess.run(
            [os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True
        ).stdout
        regs = [int(x) for x in re.findall(r"\bR(\d+)\b", sass)]
        out["sass_max_reg"] = max(regs) + 1 if regs else None
        out["HGMMA"] = count(r"\bHGMMA\b", sass)
        out["STL/LDL"] = (count(r"\bSTL\b", sass), count(r"\bLDL\b", sass))
        out["BAR.SYNC"] = count(r"\bBAR\.SYNC", sass)
        if dump:
            os.makedirs(dump, exist_ok=True)
            for ext, text in (("ptx", ptx), ("ttgir", k.asm["ttgir"]), ("sass", sass)):
                with open(os.path.join(dump, f"{tag}.{ext}"), "w") as f:
                    f.write(text)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="fwd", choices=["fwd", "bwd"])
    ap.add_argument("--d", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--cfg", nargs="+", default=None, help="BLOCK_N,NUM_STAGES,OVERLAP[,SPLIT[,PERSISTENT]] ..."
    )
    ap.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--layout", default="bhsd", choices=["bhsd", "bshd"])
    ap.add_argument("--dump", default=None, help="write ptx / ttgir / sass per config here")
    a = ap.parse_args()
    if a.kernel == "bwd":
        return main_bwd(a)
    if a.cfg:
        cfgs = [[int(x) for x in c.split(",")] for c in a.cfg]
        cfgs = [(c[0], c[1], *(bool(x) for x in c[2:5])) for c in cfgs]
    else:
        cfgs = [(bn, st, ov, False) for bn in (128, 64) for st in (2, 3) for ov in (True, False)]
        cfgs += [(bn, st, True, True) for bn in (128, 64) for st in (2, 3)]
    failures = 0
    for d in a.d:
        for causal in a.causal:
            for cfg in cfgs:
                if gf._smem_bytes(d, cfg[0], cfg[1]) > 227 * 1024:
                    print(f"D={d} causal={causal} cfg={cfg}: skipped (shared memory)")
                    continue
                tag = f"d{d}_c{causal}_n{cfg[0]}_s{cfg[1]}_o{int(cfg[2])}_w{int(cfg[3])}_{a.dtype}_{a.layout}"
                try:
                    k = compile_fwd(d, bool(causal), cfg, a.dtype, a.layout)
                    r = report(k, a.dump, tag)
                except Exception as e:  # report and go on with the other configs
                    failures += 1
                    msg = str(e).strip().splitlines()
                    print(f"D={d} causal={causal} cfg={cfg}: COMPILE ERROR {type(e).__name__}: {msg[:12]}")
                    continue
                warn = r.pop("ptxas_warnings")
                print(f"D={d} causal={causal} cfg={cfg}: {r}")
                for w in warn:
                    print("    ptxas:", w)
    sys.exit(1 if failures else 0)


def main_bwd(a):
    cfgs = [tuple(int(x) for x in c.split(",")) for c in a.cfg] if a.cfg else [(64, 2), (64, 3), (128, 2)]
    failures = 0
    for d in a.d:
        for causal in a.causal:
            for cfg in cfgs:
                if gb._smem_bytes(d, *cfg) > 227 * 1024:
                    print(f"bwd D={d} causal={causal} cfg={cfg}: skipped (shared memory)")
                    continue
                tag = f"bwd_d{d}_c{causal}_m{cfg[0]}_s{cfg[1]}_{a.dtype}_{a.layout}"
                try:
                    r = report(compile_bwd(d, bool(causal), cfg, a.dtype, a.layout), a.dump, tag)
                except Exception as e:  # report and go on with the other configs
                    failures += 1
                    msg = str(e).strip().splitlines()
                    name = type(e).__name__
                    print(f"bwd D={d} causal={causal} cfg={cfg}: COMPILE ERROR {name}: {msg[:12]}")
                    continue
                warn = r.pop("ptxas_warnings")
                print(f"bwd D={d} causal={causal} cfg={cfg}: {r}")
                for w in warn:
                    print("    ptxas:", w)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
