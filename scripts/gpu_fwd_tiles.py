"""Forward tiles of attnkit's library path against compiled FlexAttention and cuDNN, at one shape, in
alternated, rotated rounds (``attnkit bench kernels``' own step and timer), each variant checked against
cuDNN on the same inputs. Variants go through ``attnkit.attention(..., backend="triton")`` with replays on:
the plain-Triton forward with each tile of ``TILES`` (set as the shipped default, autotuning off), and the
Gluon forward with each of ``GLUON`` (its default cfg with one work item per CTA or persistent, or
(BLOCK_N, NUM_STAGES, OVERLAP, SPLIT[, PERSISTENT])), eligible or not; with ``OLD_GLUON=path``, also a
former ``_gluon_fwd.py``.

    PYTHONPATH=src python3 scripts/gpu_fwd_tiles.py B,H,S,D [c] [all] [rounds=5] [tiles=64x64x4x3,...]

``all``: every cfg of ``GLUON``; ``tiles=``: the plain-Triton tiles to time instead of ``TILES``.
"""

import os
import sys

os.environ["ATTNKIT_TRITON_AUTOTUNE"] = "0"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from attnkit.backends.triton.kernels.hopper import fwd as _gluon_fwd
from attnkit.backends.triton.ops import attention as ops
from attnkit.backends.triton.runtime import tuning as _tuning  # noqa: E402
from attnkit.bench.kernels import _flops, _runners, prepare  # noqa: E402

B, H, S, D = (int(x) for x in sys.argv[1].split(","))
causal = "c" in sys.argv[2:]
rounds = int(next((a.split("=")[1] for a in sys.argv[2:] if a.startswith("rounds=")), 5))
TILES = {
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3), (128, 32, 4, 3),
         (64, 32, 4, 3), (64, 64, 4, 4), (256, 64, 8, 3), (256, 32, 8, 3), (64, 64, 4, 2)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3)],
}[D]  # fmt: skip
if any(a.startswith("tiles=") for a in sys.argv[2:]):  # tiles=64x64x4x3,128x64x8x3
    spec = next(a for a in sys.argv[2:] if a.startswith("tiles="))[6:]
    TILES = [tuple(int(x) for x in t.split("x")) for t in spec.split(",")]
GLUON = ["one", "persistent"] if "all" not in sys.argv[2:] else [
    "one", "persistent", (128, 2, True, True), (64, 2, True, True), (128, 2, True, False)]  # fmt: skip

_tuning.default_config("fwd", D, D)  # loads the shipped table, which the variants overwrite
eligible = _tuning.gluon_forward_eligible
default_gluon = _gluon_fwd.default_cfg


OLD = None  # OLD_GLUON=path: a former _gluon_fwd.py, timed as the variant "gluon old" (A/B in one process)
if os.environ.get("OLD_GLUON"):
    import importlib.util

    spec = importlib.util.spec_from_file_location("old_gluon_fwd", os.environ["OLD_GLUON"])
    OLD = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(OLD)


def setup(tile=None, gluon=None, old=False):
    """Route the next calls to one variant (and forget every recorded replay and picked tile). ``gluon``:
    "default" (the shipped Gluon cfg), "one" / "persistent" (it with one item per CTA / persistent) or a
    cfg tuple."""
    _tuning._SHIPPED["fwd"][str(_tuning.dim_class(D))] = list(tile or TILES[0])
    _tuning.gluon_forward_eligible = (lambda *a: True) if gluon or old else (lambda *a: False)
    if gluon in ("one", "persistent"):  # the default cfg with one item per CTA, or persistent
        _gluon_fwd.default_cfg = lambda *a: default_gluon(*a)[:4] + (gluon == "persistent",)
    elif isinstance(gluon, tuple):
        _gluon_fwd.default_cfg = lambda *a: gluon
    else:
        _gluon_fwd.default_cfg = default_gluon
    ops._GLUON["fwd"] = OLD if old else _gluon_fwd
    _tuning._fast.clear()
    ops._REPLAYS.clear()


peers = _runners(causal, True)
variants = {"flex": (peers["flex"], None), "cudnn": (peers["sdpa_cudnn"], None)}
ak = peers["attnkit:triton"]
for t in TILES:
    variants["triton " + ",".join(map(str, t))] = (ak, lambda t=t: setup(tile=t))
for g in GLUON:
    name = "gluon " + (",".join(str(int(x)) for x in g) if isinstance(g, tuple) else g or "default")
    variants[name] = (ak, lambda g=g or "default": setup(gluon=g))
if OLD is not None:
    variants["gluon old"] = (ak, lambda: setup(old=True))
variants["shipped"] = (ak, lambda: (
    setup(), setattr(_tuning, "gluon_forward_eligible", eligible)))  # fmt: skip

flops = _flops(B, H, S, D, causal, False)
print(
    f"# {torch.cuda.get_device_name()} {B},{H},{S},{D} causal={causal} fwd bf16, {rounds} rounds", flush=True
)
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
steps, errs = {}, {}
for name, (fn, set_) in variants.items():
    if set_:
        set_()
    try:
        errs[name] = ((fn(q, k, v).float() - ref).abs().max() / ref.abs().max()).item()
        steps[name] = prepare(fn, B, H, S, D, "fwd", torch.bfloat16, "cuda", True)
    except Exception as e:  # a tile that does not fit: said, not fatal
        print(f"  {name}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
names = list(steps)
times = {n: [] for n in names}
for r in range(rounds):
    for n in names[r % len(names) :] + names[: r % len(names)]:
        if variants[n][1]:
            variants[n][1]()
        times[n].append(do_bench(steps[n], warmup=25, rep=100, return_mode="median"))
flex = sorted(times["flex"])[(rounds - 1) // 2]
for n in names:
    ts = sorted(times[n])
    ms = ts[(rounds - 1) // 2]
    print(f"  {n:<22} {ms:7.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s  x flex {flex / ms:5.3f}  "
          f"spread {(ts[-1] - ts[0]) / ms:5.1%}  err {errs[n]:.1e}", flush=True)  # fmt: skip
