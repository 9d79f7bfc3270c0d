"""Hunt a device fault in the Triton backward: run fwd+bwd once per (path, tile config), each in its own
process (a fault poisons the CUDA context), synchronizing after the call, and report which ones fault.

GPU only:  PYTHONPATH=src python3 scripts/triton_fault_hunt.py [B,H,S,D] [--causal]
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import sys, torch, attnkit
from attnkit.backends.triton.runtime import tuning as _tuning
B, H, S, D = {shape}
kind, cfg, det = {kind!r}, {cfg!r}, {det!r}
if cfg is not None:
    _tuning.FORCE[kind] = tuple(cfg)
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
           for _ in range(3))
out = attnkit.attention(q, k, v, causal={causal}, backend="triton", deterministic=det)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
ref = attnkit.attention(*(t.detach().float().requires_grad_() for t in (q, k, v)), causal={causal},
                        backend="sdpa_math")
print("maxdiff", (out.float() - ref).abs().max().item())
"""


def main() -> int:
    shape = tuple(int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "32,32,512,64").split(","))
    causal = "--causal" in sys.argv
    from attnkit.backends.triton.runtime import tuning as _tuning

    dim = _tuning.dim_class(shape[3])
    runs = [("default", None, False), ("default", None, True)]
    for kind, det in (("bwd", False), ("dkdv", True), ("dq", True)):
        runs += [(kind, cfg, det) for cfg in _tuning._CANDIDATES[kind].get(dim, [])]
    bad = 0
    for kind, cfg, det in runs:
        code = CHILD.format(shape=shape, kind=kind, cfg=cfg, det=det, causal=causal)
        env = {"ATTNKIT_TRITON_AUTOTUNE": "0", "CUDA_LAUNCH_BLOCKING": "1"}
        import os

        p = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        tail = (p.stdout.strip().splitlines() or [""])[-1]
        err = next((ln for ln in p.stderr.splitlines()[::-1] if "Error" in ln), "")
        ok = p.returncode == 0
        bad += not ok
        print(
            f"{'ok   ' if ok else 'FAULT'} det={det!s:<5} {kind:<7} {cfg!s:<16} {tail} {err[:120]}",
            flush=True,
        )
    print(f"fault hunt {shape} causal={causal}: {bad} failing runs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
