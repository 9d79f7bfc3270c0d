"""Compile the decode and combine kernels for sm_90 without a GPU (through scripts/sm90_compile.py) and
print what ptxas says (registers, spills, shared memory, mma kind). No device time.

    python scripts/sm90_compile_decode.py [--stages 2] [--warps 4] [--block-n 64]
"""

import argparse
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(here, "..", "src"))
os.environ.pop("TRITON_INTERPRET", None)

import sm90_compile as S  # noqa: E402

from attnkit.backends.triton.kernels.combine import combine  # noqa: E402
from attnkit.backends.triton.kernels.decode import decode_fwd  # noqa: E402

S.INTS |= {"SQ_NEW", "N2", "P"}
S.PTR_TYPES.update({"Seqlens": "*i32", "Table": "*i32", "Slopes": "*fp32", "PartLse": "*fp32"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--d", type=int, default=128)
    a = ap.parse_args()
    for paged in (False, True):
        for block_m, group in ((16, 4), (64, 4)):
            c = dict(
                GROUP=group, D=a.d, DV=a.d, BLOCK_M=block_m, BLOCK_N=a.block_n, BLOCK_D=a.d, BLOCK_DV=a.d,
                PAGED=paged, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False, HAS_ALIBI=False, PRECISION="tf32",
            )  # fmt: skip
            k = S.compile_kernel(decode_fwd, c, a.warps, a.stages)
            print("decode", "paged" if paged else "contiguous", f"BLOCK_M={block_m}", S.report(k))
    S.PTR_TYPES.update({"Out": "*bf16", "Parts": "*fp32"})
    k = S.compile_kernel(combine, dict(DV=a.d, BLOCK_R=16, BLOCK_DV=a.d), 4, 1)
    print("combine", S.report(k))


if __name__ == "__main__":
    main()
