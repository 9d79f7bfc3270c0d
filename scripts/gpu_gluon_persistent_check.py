"""Which Gluon forward variants agree with SDPA (math, float32) on a causal call with Sq > Sk (query tiles
that see no key amid full ones): one work item per CTA against persistent (3 CTAs), for every
(OVERLAP, SPLIT). Prints each variant's largest error per 64-row slice that is off.

    PYTHONPATH=src python3 scripts/gpu_gluon_persistent_check.py
"""

import torch
import torch.nn.functional as F

from attnkit.backends.triton.kernels.hopper import fwd as gf

torch.manual_seed(0)
B, Hq, Hk, Sq, Sk, D = 2, 4, 2, 640, 512, 64
q = torch.randn(B, Hq, Sq, D, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(B, Hk, Sk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
vis = torch.arange(Sk, device="cuda")[None, :] <= torch.arange(Sq, device="cuda")[:, None] + (Sk - Sq)
ref = F.scaled_dot_product_attention(
    q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1), attn_mask=vis
).nan_to_num()
ref = torch.where(vis.any(-1)[:, None], ref, 0.0)
for overlap in (True, False):
    for split in (True, False):
        for persistent in (False, True):
            gf.PERSISTENT_CTAS = 3
            out = gf.gluon_forward(q, k, v, "bhsd", D**-0.5, True, cfg=(128, 2, overlap, split, persistent))[
                0
            ]
            err = (out.float() - ref).abs().view(B, Hq, Sq // 64, 64, D).amax(dim=(3, 4))
            bad = (err > 0.05).nonzero().tolist()
            print(
                f"overlap={overlap} split={split} persistent={persistent}: max err {err.max().item():.3g};"
                f" off slices (b, h, 64-row slice): {bad[:12]}{' ...' if len(bad) > 12 else ''}",
                flush=True,
            )
