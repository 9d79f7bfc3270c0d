"""Block sizes, warps and stages: defaults per head dim, an optional autotuner, and its persistent cache.

A configuration is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. ``kind`` is ``"fwd"``, the backward's
``"dkdv"`` (BLOCK_M is the inner query tile, BLOCK_N the program's key tile) and ``"dq"``. Order of
precedence:

1. ``FORCE`` (tests set it to get several tiles per dimension at tiny sizes);
2. the Triton interpreter: 16 x 16 tiles;
3. the autotuner's result for this key (memory, then ``$ATTNKIT_CACHE_DIR/triton_autotune.json``), only
   when ``ATTNKIT_TRITON_AUTOTUNE=1`` and no CUDA graph is being captured (a repeated question is answered
   from one dict lookup, also inside a capture). It is opt-in: on the H200 a first call that autotunes
   compiled ~14 candidate tiles (9-11 s for a bf16 fwd+bwd at D=128, S=1024, and again for every new
   length bucket), where the shipped defaults cost three compiles;
4. the shipped defaults (``attnkit/data/triton_configs.json``, autotuned on an H200), else the built-in table.
"""

from __future__ import annotations

import json
import os
import threading
from importlib import resources

import torch

from attnkit.backends.triton.runtime.capability import interpreting

Config = tuple[int, int, int, int]

FORCE: dict[str, Config] = {}

# Built-in fallbacks (Hopper-class GPUs): keyed by kind, then the padded head dim.
_BUILTIN: dict[str, dict[int, Config]] = {
    "fwd": {
        16: (128, 64, 4, 3),
        32: (128, 64, 4, 3),
        64: (128, 64, 4, 3),
        128: (128, 128, 8, 3),
        256: (64, 64, 4, 2),
    },
    "dkdv": {
        16: (64, 128, 8, 3),
        32: (64, 128, 8, 3),
        64: (64, 128, 8, 3),
        128: (64, 128, 8, 2),
        256: (32, 64, 4, 2),
    },
    "dq": {
        16: (128, 64, 8, 3),
        32: (128, 64, 8, 3),
        64: (128, 64, 8, 3),
        128: (128, 64, 8, 2),
        256: (64, 32, 4, 2),
    },
}

# Candidates the autotuner tries, per kind and padded head dim (the shipped default is always tried too).
_CANDIDATES: dict[str, dict[int, list[Config]]] = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 3)],
        256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    },
    "dkdv": {
        64: [(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 2)],
        128: [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
        256: [(32, 64, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
    },
    "dq": {
        # (128, 32, 4, 3) faulted (illegal address) on an H200 at B=32 H=32 S=512 D=64 causal, deterministic
        # path (scripts/triton_fault_hunt.py, 2026-11-21); cause not found yet: no dq tile with
        # BLOCK_M > 2 * BLOCK_N is used until it is.
        64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2)],
        128: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
        256: [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 4, 2)],
    },
}

_lock = threading.Lock()
_memory: dict[str, Config] = {}
_disk_loaded = False


def dim_class(d: int) -> int:
    p = 16
    while p < d:
        p *= 2
    return p


def _shipped() -> dict:
    try:
        text = resources.files("attnkit").joinpath("data/triton_configs.json").read_text()
        return json.loads(text)
    except (FileNotFoundError, OSError, ValueError):
        return {}


_SHIPPED = None


def _usable(kind: str, cfg: Config) -> bool:
    """Tiles known to fault are never used, also when an older autotune cache on disk names them."""
    return not (kind == "dq" and cfg[0] > 2 * cfg[1])


def one_loop_dkdv(has_left: bool, has_right: bool) -> bool:
    """Whether dK/dV visits its tiles in one masked loop instead of the schedule's masked head, unmasked
    body and masked tail (the dQ pass always takes the three). One loop keeps the software pipeline full
    across the diagonal; the body then pays the mask. Measured on the H200 (version 4): causal +10-14%
    (4k and 512, head dims 64 and 128), non-causal -6% (the body loses its unmasked loads); windows were not
    measured and keep the three loops. ``ATTNKIT_TRITON_BWD_LOOP=one|three`` overrides."""
    mode = os.environ.get("ATTNKIT_TRITON_BWD_LOOP", "auto")
    if mode in ("one", "three"):
        return mode == "one"
    return has_right and not has_left


CONCURRENT_MIN_WORK = 2**29  # B * Hq * Sq * Sk below which the backward is host-bound on an H200 machine


def concurrent_backward(work: int = CONCURRENT_MIN_WORK) -> bool:
    """Whether the dQ pass runs on a side stream, overlapping dK/dV (its programs fill the SMs that the
    dK/dV grid's last wave leaves idle). Measured on the H200 (version 4): +1-6% at long sequences, largest
    on causal calls, nothing at S = 512; the two stream waits cost ~40-90 us of host time per backward
    (``git show bf37e7a:scripts/gpu_host_breakdown.py``), which is what short sequences wait on. So only
    where ``work`` (B * Hq * Sq * Sk) is at least ``CONCURRENT_MIN_WORK`` (S = 4096 with 32 heads; the B=32,
    S=512 shapes are below).
    ``ATTNKIT_TRITON_BWD_STREAMS=0`` turns it off, ``=1`` on at every size."""
    mode = os.environ.get("ATTNKIT_TRITON_BWD_STREAMS", "auto")
    if mode in ("0", "1"):
        return mode == "1"
    return work >= CONCURRENT_MIN_WORK


def default_config(kind: str, D: int, Dv: int) -> Config:
    global _SHIPPED
    if _SHIPPED is None:
        _SHIPPED = _shipped()
    dc = dim_class(max(D, Dv))
    got = _SHIPPED.get(kind, {}).get(str(dc))
    if got:
        return tuple(got)
    table = _BUILTIN[kind]
    return table.get(dc, table[256] if dc > 256 else table[16])


def _cache_path() -> str:
    base = os.environ.get("ATTNKIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attnkit")
    return os.path.join(base, "triton_autotune.json")


def _read_disk() -> dict[str, Config]:
    try:
        with open(_cache_path()) as f:
            return {k: tuple(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def _load_disk():
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    _memory.update(_read_disk())


def _save_disk():
    """Write the tuned configurations, merged with what other processes wrote since this one loaded (every
    process adds its own keys: none of theirs is lost), atomically (a rename)."""
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        merged = {**_read_disk(), **_memory}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(merged, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _bucket(n: int) -> int:
    """Sequence lengths tune per power-of-two bucket (so ragged batches do not retune)."""
    p = 128
    while p < n and p < 32768:
        p *= 2
    return p


_FAULTS = ("illegal memory access", "illegal instruction", "misaligned address", "unspecified launch failure")


def _is_device_fault(e: Exception) -> bool:
    """A sticky CUDA fault (illegal address, ...), as opposed to a refusal (shared memory, registers)."""
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    return any(f in str(e) for f in _FAULTS)


def pick(
    kind: str,
    D: int,
    Dv: int,
    dtype: torch.dtype,
    flags: tuple,
    Sq: int,
    Sk: int,
    device,
    launch,
    hint: frozenset = frozenset(),
) -> Config:
    """The configuration for one launch; ``launch(cfg)`` runs the kernel with ``cfg`` (used to autotune).
    ``hint``: :func:`hints` of the launch's flags (they are in ``flags`` too, so the caches stay right;
    ``"gather"`` only sets the untuned default: with the autotuner on, its cache keeps one entry for mods
    with and without gathers, as it does for every mod and mask).
    ``flags``: the op's feature constexprs (``FwdParams.flags()`` values); Sq and Sk count per power-of-two
    bucket (:func:`_bucket`), so new lengths in a tuned bucket reuse its result, in this process and, from
    the disk cache, in the next."""
    if kind in FORCE:
        return FORCE[kind]
    if interpreting() or device.type != "cuda":
        return (16, 16, 4, 1)
    # every launch asks: answer a repeated question from one dict lookup (host time is what short
    # sequences wait on); the environment is part of the question, so A/B runs and tests still switch
    fast = (
        kind,
        D,
        Dv,
        dtype,
        flags,
        _bucket(Sq),
        _bucket(Sk),
        device.index,
        os.environ.get("ATTNKIT_TRITON_AUTOTUNE"),
    )
    got = _fast.get(fast)
    if got is not None and not torch.compiler.is_compiling():
        return got
    cfg = _pick(kind, D, Dv, dtype, flags, Sq, Sk, device, launch, hint)
    if not (torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()):
        _fast[fast] = cfg
    return cfg


_fast: dict = {}
_SHRUNK: dict = {}  # (kind, key, cfg) -> the smaller tiles that launched where cfg ran out of resources


def _out_of_resources(e: Exception) -> bool:
    """Triton's refusal to compile a tile shape for this GPU (shared memory, registers)."""
    return type(e).__name__ == "OutOfResources" or "out of resource" in str(e)


def shrunk(kind: str, cfg: Config, key) -> Config:
    """The tiles :func:`launch_fitting` found to launch in place of ``cfg`` for ``key`` (else ``cfg``)."""
    return _SHRUNK.get((kind, key, cfg), cfg)


def launch_fitting(kind: str, cfg: Config, key, launch, D: int, Dv: int, dtype: torch.dtype):
    """``launch(cfg)``; where the compiled kernel needs more shared memory than this GPU has (a compiled
    score mod that gathers from a captured table needs more than :func:`_smem_estimate` counts: seen on
    the H200, 480 KB at (128, 128)), the largest smaller tiles that launch, remembered for ``(kind, key,
    cfg)`` so later calls go straight to them. ``key``: what the kernel's resources depend on besides the
    tiles (the tuning key and the score mod's module)."""
    use = _SHRUNK.get((kind, key, cfg), cfg)
    try:
        return launch(use)
    except Exception as e:  # noqa: BLE001 (only a refusal of the tile shape is retried)
        if not _out_of_resources(e):
            raise
        first = e
    elem = torch.empty((), dtype=dtype).element_size()
    have = _smem_estimate(kind, use, D, Dv, elem)
    pool = dict.fromkeys(_CANDIDATES[kind].get(dim_class(max(D, Dv)), []) + _SMALL)
    smaller = [c for c in pool if _usable(kind, c) and _smem_estimate(kind, c, D, Dv, elem) < have]
    for c2 in sorted(smaller, key=lambda c: (-c[0] * c[1], -c[3])):
        try:
            out = launch(c2)
        except Exception as e:  # noqa: BLE001
            if not _out_of_resources(e):
                raise
            continue
        _SHRUNK[(kind, key, cfg)] = c2
        return out
    raise first
TUNED = [0]  # autotuning runs in this process (ops' replays must not record their trial launches)


def _smem_estimate(kind: str, cfg: Config, D: int, Dv: int, elem: int) -> int:
    """Bytes of shared memory a tile shape needs, an upper estimate: the tiles loaded once plus the tiles
    of the software pipeline, ``num_stages`` deep (Triton's own count is at most this)."""
    BM, BN, _, stages = cfg
    d, dv = dim_class(D), dim_class(Dv)
    if kind == "fwd":  # Q once; K and V per stage
        return (BM * d + stages * BN * (d + dv)) * elem
    if kind == "dq":  # Q and dO once; K and V per stage
        return (BM * (d + dv) + stages * BN * (d + dv)) * elem
    return (BN * (d + dv) + stages * BM * (d + dv)) * elem  # dkdv: K and V once; Q and dO per stage


_SMEM: dict = {}


def _smem_limit(device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM:
        props = torch.cuda.get_device_properties(idx)
        _SMEM[idx] = getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024
    return _SMEM[idx]


_SMALL: list[Config] = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)]


def hints(flags: dict, gathers: bool = False) -> frozenset:
    """What the defaults need to know of a launch's feature constexprs (``FwdParams.flags()``): ``"iv"`` for
    masks carried as data (their bounds take shared memory too), ``"causal"`` for a right-bounded call;
    ``"gather"`` for a score mod that reads captured tensors (``gathers``)."""
    out = {"gather"} if gathers else set()
    if flags.get("HAS_IV"):
        out.add("iv")
    if flags.get("HAS_RIGHT") and not flags.get("HAS_LEFT"):
        out.add("causal")
    return frozenset(out)


# Measured on the H200 (bf16, 2026-12-02, docs/results/README.md), where the per-head-dim default was wrong:
# - a masked forward at D=128 (B=2 H=16 S=8k, causal document mask): the default (128, 128, 8, 3) needs
#   234,496 bytes of shared memory with the mask's bounds (the limit is 232,448); (64, 64, 4, 2) ran 0.510 ms,
#   (128, 64, 8, 2) 0.511, (128, 64, 4, 2) 0.886;
# - dQ of a causal call at D=128 and Sq <= 512 (B=32 H=16): the autotuner picked (64, 32, 4, 3), and the
#   whole forward+backward ran 0.694 ms against 1.097 with the default (128, 64, 8, 3).
# - a forward with a score mod reading a captured table (a learnable T5 bias, B=2 H=16 S=8k D=128 causal,
#   2026-12-02 20:20 UTC, docs/results/2026-12-02-h200-d/t5.txt): the default (128, 128, 8, 3) ran out of
#   shared memory and its retry (64, 64, 4, 3) ran 18.3 ms; (64, 32, 4, 2) 8.7, (128, 64, 8, 2) 12.1,
#   (32, 32, 4, 2) 14.5.
_MASKED_FWD = {128: (64, 64, 4, 2), 256: (64, 64, 4, 2)}
_GATHER_FWD = {128: (64, 32, 4, 2), 256: (64, 32, 4, 2)}
_SHORT_CAUSAL_DQ = {128: (64, 32, 4, 3)}


def fitting_default(
    kind: str, D: int, Dv: int, dtype: torch.dtype, device, hint: frozenset = frozenset(), Sq: int = 0
) -> Config:
    """The shipped default if its tiles fit this GPU's shared memory at this dtype, else the first that does
    of the autotuner's candidates and a few small tiles. The defaults are tuned for 16-bit inputs on an H200:
    float32 inputs (twice the bytes) or GPUs with less shared memory would otherwise fail to launch
    wherever the autotuner does not run (the default; ``ATTNKIT_TRITON_AUTOTUNE=1`` turns it on; never
    inside CUDA-graph capture or compile)."""
    default = default_config(kind, D, Dv)
    dc = dim_class(max(D, Dv))
    if kind == "fwd" and "gather" in hint and dc in _GATHER_FWD:
        default = _GATHER_FWD[dc]
    elif kind == "fwd" and "iv" in hint and dc in _MASKED_FWD:
        default = _MASKED_FWD[dc]
    elif kind == "dq" and "causal" in hint and "iv" not in hint and 0 < _bucket(Sq) <= 512:
        default = _SHORT_CAUSAL_DQ.get(dc, default)
    elem = torch.empty((), dtype=dtype).element_size()
    limit = _smem_limit(device)
    cands = [default] + _CANDIDATES[kind].get(dc, []) + _SMALL
    for cfg in cands:
        # a mask's bounds: 4 int32 per key row and stage, plus a margin (unmeasured for dK/dV and dQ)
        extra = (16 * cfg[1] * cfg[3] + 4096) if "iv" in hint else 0
        if _usable(kind, cfg) and _smem_estimate(kind, cfg, D, Dv, elem) + extra <= limit:
            return cfg
    return cands[-1]


def _pick(kind, D, Dv, dtype, flags, Sq, Sk, device, launch, hint=frozenset()) -> Config:
    default = fitting_default(kind, D, Dv, dtype, device, hint, Sq)
    if os.environ.get("ATTNKIT_TRITON_AUTOTUNE", "0") != "1":
        return default
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return default
    name = torch.cuda.get_device_name(device)
    key = f"{name}|{kind}|D{D}|Dv{Dv}|{str(dtype).split('.')[-1]}|{flags}|{_bucket(Sq)}x{_bucket(Sk)}"
    with _lock:
        _load_disk()
        if key in _memory and _usable(kind, _memory[key]):
            return _memory[key]
    cands = [default] + [c for c in _CANDIDATES[kind].get(dim_class(max(D, Dv)), []) if c != default]
    from triton.testing import do_bench

    TUNED[0] += 1
    best, best_ms = default, float("inf")
    for cfg in cands:
        try:
            ms = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as e:  # out of shared memory / registers for this tile shape: skip it
            if _is_device_fault(e):  # a fault poisons the CUDA context: say which launch, never hide it
                raise RuntimeError(f"attnkit triton autotune: {kind} config {cfg} faulted ({key})") from e
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    with _lock:
        _memory[key] = best
        _save_disk()
    return best
