"""The ``triton`` backend: attnkit's own FlashAttention-style kernels, forward and backward.

One kernel family (``kernels/fwd.py``, ``kernels/bwd.py``; shared score pipeline and tile schedule in
``kernels/common.py``) serves causal (bottom-right), windows, softcap, ALiBi, additive bias with its
gradient, GQA/MQA, D != Dv, head dims up to 256, fp16/bf16/fp32, bhsd/bshd/thd, return_lse, dropout and
deterministic backward, and library masks that lower to two masked row intervals per key column
(``attnkit.masks._intervals``: document, prefix_lm, chunked, global_sliding, shared_prefix, flashmask and
their ``&`` with causal / sliding windows), carried to the kernels as int32 tensors (no recompiles for new
values or lengths), and ``score_mod`` callables compiled into the kernels by :mod:`attnkit.compiler`
(forward, backward, and the gradients of captured tensors that require grad). Host launchers and the
``torch.library`` ops live in ``ops/``; block sizes in ``runtime/tuning.py``; what the kernels can do in
``runtime/capability.py`` (read here and by the launchers alike).

On a machine without CUDA the backend is available only under the Triton interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported), and its cost keeps ``auto`` away from it.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import torch

from attnkit._call import AttentionCall
from attnkit.backends import _roofline
from attnkit.backends.base import Backend, attention_flops, dense_pairs
from attnkit.backends.triton.params import FwdParams
from attnkit.backends.triton.runtime import capability as _cap
from attnkit.errors import UnsupportedError
from attnkit.masks import _intervals, _tiles

_INT32 = 2**31 - 1
# A compiled score_mod's time over the plain Triton kernels' (no Gluon: mods run on the Triton kernels), per
# mode. Measured on the H200 (bf16, B=2 H=16 S=8k D=128, causal, docs/results/2026-12-02-h200-c/
# masks_triton_mods.csv): a tanh softcap mod 1.82 ms forward against 1.21 for causal flags (1.50), 7.90 ms
# forward+backward against the rates' 4.97 (1.59); an ALiBi mod 1.19 and 1.20. The dearer of the two is
# used. Mods that gather from captured tables (T5, relative bias) did not run in that session.
SCORE_MOD_COST = {"fwd": 1.5, "fwd_bwd": 1.6}


def _rates() -> dict:
    """Measured TFLOP/s of these kernels (bf16, H200; see docs/triton_notes.md), by mode and head dim."""
    try:
        return json.loads(resources.files("attnkit").joinpath("data/triton_rates.json").read_text())
    except (FileNotFoundError, OSError, ValueError):
        return {}


_RATES = None

# Masks carried as data: TFLOP/s of visible pairs by the mask's data kind, forward (by whether the Gluon
# listed forward runs it) and forward+backward (by whether the Gluon listed forward and the Gluon listed dK/dV
# run it). Measured on the H200 (bf16, B=2 H=16 S=8k D=128), each entry from one run's rows; visible pairs a
# head: documents 7.8M, prefix-LM 35.7M, shared prefix 19.4M, global+window 8.9M. Other kinds (chunked,
# FlashMask, compositions of several) take the lowest of their table.
#   run E, 2026-12-02 (docs/results/2026-12-02-h200-e/masks.csv), the listed Triton kernels: documents 0.562 /
#     1.999 ms, prefix-LM 1.476 / 5.777, shared prefix 0.855 / 3.373, global+window 0.555 / 2.341 (flex 255 /
#     259, 393 / 382, 377 / 357, 219 / 229 TFLOP/s);
#   run G, 2026-12-03 (docs/results/2026-12-03-h200-g/), the Gluon forward, the Triton dK/dV: 0.456 / 1.907,
#     1.046 / 5.459, 0.601 / 3.111 (flex FLASH 0.495 / 1.901, 0.979 / 3.700, 0.592 / 2.334);
#   run H, 2026-12-03 (docs/results/2026-12-03-h200-h/), the Gluon dK/dV: after the Triton forward
#     ("triton GLUON_LISTED=0"; global+window's "triton", a band) 1.921, 5.108, 2.872, 2.195 ms; after the
#     Gluon forward 1.797, 4.829, 2.764 (flex 1.739, 5.318, 3.073; flex FLASH 1.581, 3.762, 2.289).
_MASKED_FWD_RATES = {
    False: {"document": 228e12, "prefix_lm": 396e12, "shared_prefix": 372e12, "global_sliding": 261e12},  # E
    True: {"document": 281e12, "prefix_lm": 558e12, "shared_prefix": 529e12},  # G
}
_MASKED_FWD_BWD_RATES = {
    (False, False): {"document": 224e12, "prefix_lm": 354e12, "shared_prefix": 330e12,
                     "global_sliding": 217e12},  # E
    (False, True): {"document": 233e12, "prefix_lm": 400e12, "shared_prefix": 387e12,
                    "global_sliding": 231e12},  # H
    (True, False): {"document": 235e12, "prefix_lm": 375e12, "shared_prefix": 358e12},  # G
    (True, True): {"document": 250e12, "prefix_lm": 423e12, "shared_prefix": 403e12},  # H
}  # fmt: skip


def _masked_rate(mask, grad: bool, gluon_fwd: bool = False, gluon_bwd: bool = False) -> float:
    """The rate of a mask carried as data on the kernels the call takes (the Gluon listed forward, the Gluon
    listed dK/dV): its one data kind besides causal, else the lowest of the table."""
    table = _MASKED_FWD_BWD_RATES[(gluon_fwd, gluon_bwd)] if grad else _MASKED_FWD_RATES[gluon_fwd]
    rate = table.get(mask.kind_of_data())
    return min(table.values()) if rate is None else rate


def _rate(mode: str, head_dim: int, causal: bool) -> float:
    global _RATES
    if _RATES is None:
        _RATES = _rates()
    table = _RATES.get(mode + ("_causal" if causal else ""), {}) or _RATES.get(mode, {})
    table = {d: r for d, r in table.items() if d.isdigit()}
    if not table:
        return {"fwd_bwd": 180.0}.get(mode, 300.0)
    dims = sorted(int(d) for d in table)
    best = min(dims, key=lambda d: (abs(d - head_dim), d))
    return float(table[str(best)])


class TritonBackend(Backend):
    name = "triton"
    description = "attnkit's own Triton kernels (FlashAttention-2 style, fwd + bwd, every dense flag)"

    def _check_available(self):
        import triton  # noqa: F401  (raises ImportError where Triton is missing: the base class reports it)

        if torch.cuda.is_available() or _cap.interpreting():
            return True, None
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on the CPU)"

    def why_not(self, call: AttentionCall) -> list[str]:
        r = []
        table = _cap.TRITON
        if call.dtype not in table.dtypes:
            r.append(f"dtype {call.dtype} not supported (float16, bfloat16, float32)")
        if call.device.type == "cuda":
            if _cap.capability(call.device) < table.min_capability:
                r.append("needs a GPU of compute capability >= {}.{}".format(*table.min_capability))
        elif not _cap.interpreting():
            r.append(f"tensors on {call.device.type}: needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        view = _mask_as_mod(call)  # a mask that does not lower to intervals: evaluated in the kernels
        if view.score_mod is not None:
            why = _score_mod_why_not(view)
            if why is not None:
                if call.mask is not None and view.mask is None:
                    lowering = _intervals.why_not(call.mask, call)
                    why = f"mask {call.mask.name}: {lowering}; as a score mod: {why}"
                r.append(f"{why} (use backend='flex' or 'reference')")
        if max(call.D, call.Dv) > table.max_head_dim:
            r.append(f"head dim {max(call.D, call.Dv)} > {table.max_head_dim}")
        if call.alibi_slopes is not None and call.alibi_slopes.requires_grad:
            r.append("no gradient for alibi_slopes (pass a tensor that does not require grad)")
        if any(t.numel() > _INT32 for t in (call.q, call.k, call.v)):
            r.append("a q/k/v tensor with >= 2**31 elements (kernels use 32-bit offsets)")
        if call.bias is not None:
            dense = call.batch * call.Hq * call.Sq * call.Sk
            if call.bias.requires_grad and dense > _INT32:
                r.append("bias gradient of >= 2**31 elements (kernels use 32-bit offsets)")
            if not call.bias.is_floating_point() or call.bias.dtype == torch.float64:
                r.append(f"bias dtype {call.bias.dtype} (float16, bfloat16 or float32)")
        return r

    def run(self, call: AttentionCall):
        from attnkit.backends.triton.ops import attention as ops

        call = _mask_as_mod(call)
        causal, window, iv = self._mask_flags(call)
        wl, wr = window if window is not None else (-1, -1)
        p = FwdParams(
            call.q,
            call.k,
            call.v,
            call.bias,
            call.alibi_slopes,
            call.cu_seqlens_q,
            call.cu_seqlens_k,
            call.layout,
            int(call.Sq),
            int(call.Sk),
            float(call.scale),
            bool(causal),
            int(wl),
            int(wr),
            float(call.softcap or 0.0),
            float(call.dropout_p),
            bool(call.deterministic),
            iv.startend if iv is not None else None,
            iv.summary if iv is not None else None,
            bool(iv is not None and iv.holes),
            bool(iv is not None and iv.band),
            *_score_mod_args(call),
        )
        out, lse, _, _ = ops.attention(p)
        return out, (lse if call.return_lse else None)

    @staticmethod
    def _mask_flags(call: AttentionCall):
        """(causal, window, Intervals or None): the call's flags with a lowered mask's merged in (the
        lowering is kept on the call: cost() and run() of one call share it)."""
        if call.mask is None:
            return call.causal, call.window, None
        iv = call.__dict__.get("_intervals")
        if iv is None or iv[0] is not call.mask:
            iv = (call.mask, _intervals.lower(call.mask, call))
            if not torch.compiler.is_compiling():
                call.__dict__["_intervals"] = iv
        iv = iv[1]
        if iv is None:  # a choice reused for a mask of the same structure whose data does not lower
            why = _intervals.why_not(call.mask, call)
            raise UnsupportedError("triton", [f"mask {call.mask.name}: {why}"])
        window = call.window
        if iv.window is not None:
            window = iv.window if window is None else _intervals._merge_windows(window, iv.window)
            window = None if window == (-1, -1) else window
        return call.causal or iv.causal, window, iv

    def _masked_pairs(self, call: AttentionCall) -> float | None:
        """Visible pairs of a call with a lowered mask (one read of a device scalar, where host reads are
        allowed: not under torch.compile or CUDA-graph capture); None without a mask or where unknown (the
        flag-based bound then applies, an upper bound). For a mask evaluated in the kernels (the view of
        :func:`_mask_as_mod`), the pairs of the tiles it leaves non-empty, sampled (``masks._tiles``: the
        kernels skip the empty ones)."""
        tiled = call.__dict__.get("_tile_mask")
        if tiled is not None and call.mask is None:
            frac = _tiles.occupancy(tiled, call)
            return None if frac is None else frac * dense_pairs(call)
        if call.mask is None or not _intervals._host_values_allowed(call.q):
            return None
        causal, window, iv = self._mask_flags(call)
        n = _intervals.visible_pairs(iv, call, causal, window)
        return None if n is None else float(n)

    def _flops_pairs(self, call: AttentionCall) -> tuple[float, float, float]:
        """(FLOPs, visible pairs, rate in FLOP/s) of a CUDA call on these kernels."""
        mode = "fwd_bwd" if call.requires_grad else "fwd"
        has_mask = call.mask is not None or "_tile_mask" in call.__dict__
        causal = call.causal or call.window is not None or has_mask  # (masked: the causal rates)
        if mode == "fwd" and self._gluon(call):  # the Hopper kernel; short sequences run below its peak
            mode = "fwd_gluon_short" if call.Sk <= 1024 else "fwd_gluon"
        elif mode == "fwd_bwd" and self._gluon_bwd(call):  # the Hopper dK/dV kernel
            mode = "fwd_bwd_gluon_short" if call.Sk <= 1024 else "fwd_bwd_gluon"
        rate = _rate(mode, max(call.D, call.Dv), causal) * 1e12
        if call.dtype == torch.float32:
            rate /= 12.0  # exact fp32 dots (no tf32) run on the CUDA cores
        masked = self._masked_pairs(call)
        if masked is not None and call.mask is None:  # a mask evaluated per tile: its non-empty tiles' pairs
            pairs = masked
            flops = attention_flops(call, call.requires_grad) * masked / max(dense_pairs(call), 1.0)
        elif masked is not None:  # a mask carried as data: the pairs it leaves visible (empty tiles skipped)
            pairs = masked
            flops = pairs * call.Hq * 2.0 * (call.D + call.Dv) * (3.5 if call.requires_grad else 1.0)
            gluon = self._gluon_listed(call)
            rate = min(rate, _masked_rate(call.mask, call.requires_grad, gluon, self._gluon_listed_bwd(call)))
        elif call.layout == "thd" and call.seqlens_q is None:  # lengths unknown (compile, capture)
            pairs = float(call.batch * call.Sq * call.Sk)
            flops = pairs * call.Hq * 2.0 * (call.D + call.Dv) * (3.5 if call.requires_grad else 1.0)
        else:
            pairs = dense_pairs(call)
            flops = attention_flops(call, call.requires_grad)
        return flops, pairs, rate

    def compute_seconds(self, call: AttentionCall) -> float:
        call = _mask_as_mod(call)
        if call.device.type != "cuda":
            # the interpreter: correct but very slow; auto must never prefer it
            return 1e6 + call.batch * call.Hq * call.Sq * call.Sk * (call.D + call.Dv) / 1e6
        flops, _, rate = self._flops_pairs(call)
        t = flops / rate * (1.3 if call.dropout_p > 0 else 1.0)
        if call.score_mod is not None:
            t *= SCORE_MOD_COST["fwd_bwd" if call.requires_grad else "fwd"]
        return t

    def memory_traffic(self, call: AttentionCall) -> tuple[int | None, float, float]:
        # One program per (batch, query head, query tile), each reading its KV head's K/V: a GQA call reads
        # them group times (decode at B=16, 32/8 heads read K+V at 1.24 TB/s; H200, issue 15)
        return _roofline.tile_programs(call, 128), float(call.group), 0.0

    def overhead_seconds(self, call: AttentionCall) -> float:
        call = _mask_as_mod(call)
        if call.device.type != "cuda":
            return 0.0
        t = 0.0
        if call.bias is not None:  # the bias tile is read once per visible pair (twice more in backward)
            _, pairs, _ = self._flops_pairs(call)
            nbytes = pairs * call.Hq * call.bias.element_size()
            t += nbytes * (3 if call.requires_grad else 1) / 3.0e12
            if call.requires_grad and call.bias.requires_grad:
                t += pairs * call.Hq * 4 * 2 / 3.0e12  # dense fp32 dbias written and reduced
        launches = 4 if call.requires_grad else 1
        return t + 8e-6 * launches

    def host_seconds(self, call: AttentionCall) -> float:
        # attention()'s Python, the plan and the launches: H200 run J's probe, B=1 decode shapes with 1k-128k
        # keys, 144-180 us a call on a host where raw SDPA took 27-55 (about 3x; raw SDPA takes ~25 on a
        # quiet host); run K picked this backend for B=1, 1k keys, Sq=4 on an estimate of 0.025 ms without it
        return 75e-6 if call.device.type == "cuda" else 0.0

    @staticmethod
    def _gluon(call: AttentionCall) -> bool:
        return _cap.gluon_forward_for_call(call)

    def _gluon_listed(self, call: AttentionCall) -> bool:
        """Whether the forward of this call with a mask carried as data runs on the Gluon listed kernel."""
        if not _cap.data_mask_call(call):
            return False
        _, window, iv = self._mask_flags(call)
        band = (window is not None and window[0] >= 0) or (iv is not None and iv.band)
        return _cap.gluon_listed_eligible(
            _cap.capability(call.device), call.layout, call.D, call.Dv, call.dtype, call.Sk, call.scale, band
        )

    @staticmethod
    def _gluon_listed_bwd(call: AttentionCall) -> bool:
        """Whether the dK/dV of this call with a mask carried as data runs on the Gluon listed kernel."""
        return _cap.data_mask_call(call) and _cap.gluon_listed_backward_eligible(
            _cap.capability(call.device), call.layout, call.D, call.Dv, call.dtype, call.scale
        )

    @staticmethod
    def _gluon_bwd(call: AttentionCall) -> bool:
        return _cap.gluon_backward_for_call(call)

    def notes(self, call: AttentionCall) -> list[str]:
        n = ["backward: dK/dV kernel and a separate dQ pass beside it (no atomics: deterministic)"]
        view = _mask_as_mod(call)
        if call.score_mod is not None and view.score_mod is None:
            n.append(f"score_mod {call.score_mod.name}: the kernels' own softcap / ALiBi (no compiled mod)")
        if call.mask is not None and view.mask is None:
            n.append(
                f"mask {call.mask.name} evaluated inside the kernels, as a compiled score mod (it has no "
                "interval lowering): per-tile states computed on the device (empty tiles skipped, full tiles "
                "unmasked), partial tiles evaluated per element"
            )
            call = view
        if call.mask is not None:
            n.append(
                f"mask {call.mask.name} carried as data: two masked row intervals per key column "
                "(empty tiles skipped, full tiles unmasked; no recompiles for new values or lengths)"
            )
        if call.score_mod is not None:
            n.append(
                f"score_mod {call.score_mod.name} compiled into the kernels (attnkit.compiler); captured "
                "tensors' gradients by atomic adds in the dK/dV kernel"
            )
        if call.device.type != "cuda":
            n.append("running in the Triton interpreter: for tests, very slow")
        else:
            if self._gluon(call):
                n.append("forward: the Hopper Gluon kernel (TMA producer warp, two consumer warpgroups)")
            if call.requires_grad and self._gluon_bwd(call):
                n.append(
                    "backward: dK/dV in the Hopper Gluon kernel (TMA producer warp, two consumer warpgroups)"
                )
        return n


BACKEND = TritonBackend()


def _mask_as_mod(call: AttentionCall) -> AttentionCall:
    """The call as the kernels run it: ``call`` itself; or the library's ``mods.softcap`` / ``mods.alibi``
    as the kernels' own softcap / ALiBi flags where that is the same function (:func:`_mods_as_flags`); or,
    when its mask does not lower to column intervals (a ``mask_mod`` callable, ``|``, ``~``,
    ``neighborhood_2d``, unsorted document ids, ...), the same call with the mask folded into the score mod:
    ``where(mask(b, h, q, kv, off), score_mod(s, ...), -inf)``, which the score-mod compiler lowers into the
    kernels (docs/api.md's order: the mask after the score mod), with the mask's condition apart for
    per-tile states (``ops/tiles.py``: empty tiles skipped, full ones unmasked). Kept on the call."""
    hit = call.__dict__.get("_mask_view")
    if hit is not None and hit[0] is call.mask and hit[1] is call.score_mod:
        return hit[2]
    view = _mods_as_flags(call)
    if call.mask is not None and _intervals.why_not(call.mask, call) is not None:
        view = dataclasses.replace(view, score_mod=_masked_mod(call.mask, view.score_mod), mask=None)
        view.__dict__["_tile_mask"] = call.mask  # (the cost model's: how many tiles it leaves non-empty)
    if view is not call and not torch.compiler.is_compiling():
        call.__dict__["_mask_view"] = (call.mask, call.score_mod, view)
    return view


def _mods_as_flags(call: AttentionCall) -> AttentionCall:
    """``mods.softcap(cap)``, ``mods.alibi(slopes)`` and ``compose(softcap, alibi)`` as the call's softcap /
    ``alibi_slopes`` (no compiled mod: the kernels' own code for them), where that is the same function of
    the scores (docs/api.md's pipeline: softcap, then bias and ALiBi, then the score mod): a softcap mod only
    without a softcap flag, bias or ALiBi; an ALiBi mod only without ALiBi slopes, with float32 slopes on
    the call's device that want no gradient. Anything else: ``call`` itself."""
    m = call.score_mod
    if m is None:
        return call
    parts = list(m.parts) if m.kind == "compose" else [m]
    if [p.kind for p in parts] not in (["softcap"], ["alibi"], ["softcap", "alibi"]):
        return call
    changes: dict = {"score_mod": None}
    for p in parts:
        if p.kind == "softcap":
            if call.softcap or call.bias is not None or call.alibi_slopes is not None:
                return call
            changes["softcap"] = float(p.params["cap"])
        else:
            slopes = p.params["slopes"]
            ok = slopes.dtype == torch.float32 and slopes.device == call.device
            if not ok or call.alibi_slopes is not None or (slopes.requires_grad and torch.is_grad_enabled()):
                return call
            changes["alibi_slopes"] = slopes
    return dataclasses.replace(call, **changes)


def _masked_mod(mask, score_mod):
    """The ScoreMod ``where(mask, score_mod(s), -inf)`` (memoized on the mask, per score mod: one structure,
    so the compiler's cache hits for every call with this mask)."""
    from attnkit.mods import ScoreMod

    memo = mask.__dict__.setdefault("_as_mod", {})
    key = id(score_mod)
    hit = memo.get(key)
    if hit is not None and hit[0] is score_mod:
        return hit[1]
    keep, inner = mask._fn, (score_mod._fn if score_mod is not None else None)

    def fn(s, b, h, q, kv, off):
        s2 = s if inner is None else inner(s, b, h, q, kv, off)
        return torch.where(keep(b, h, q, kv, off), s2, float("-inf"))

    name = mask.name if score_mod is None else f"{score_mod.name}, then {mask.name}"
    parts = (score_mod,) if score_mod is not None else ()
    mod = ScoreMod(fn, f"where({name})", kind="masked", params={"mask": mask}, parts=parts)
    if len(memo) >= 8:
        memo.clear()
    memo[key] = (score_mod, mod)
    return mod


def _score_mod_why_not(call: AttentionCall) -> str | None:
    """Why the call's score_mod cannot run compiled into the kernels (None: it can)."""
    return _score_mod_check(call)[0]


def _score_mod_check(call: AttentionCall):
    """(why not, or None; the compiled mod or None). Refused: an op or construct the compiler cannot lower
    (with the user's source line), captured tensors that require grad with ``deterministic=True`` (their
    gradients are atomic adds) or without a derivative the compiler finds, on another device, too large."""
    from attnkit import compiler

    if torch.compiler.is_compiling():  # (tracing the mod with make_fx inside dynamo's trace: not done yet)
        return "score_mod under torch.compile is not compiled into the Triton kernels yet", None
    try:
        comp = compiler.compile_score_mod(call.score_mod)
    except compiler.Unlowerable as e:
        return str(e), None
    except Exception as e:  # noqa: BLE001 (a compiler bug must not break auto's choice: refuse, say why)
        return f"score_mod compiler failed ({type(e).__name__}: {e}); please report it", None
    for i, t in enumerate(comp.tensors):
        if t.requires_grad and torch.is_grad_enabled():
            if i not in comp.grad_slots:
                return "score_mod reads a tensor that requires grad where it has no derivative", None
            if call.deterministic:
                why = "score_mod reads a tensor that requires grad: its gradient is accumulated by atomic"
                return why + " adds, not deterministic (deterministic=True)", None
        if t.device != call.device:
            return f"score_mod reads a tensor on {t.device} (the call is on {call.device})", None
        if t.numel() > _INT32:
            return "score_mod reads a tensor with >= 2**31 elements", None
    return None, comp


def _score_mod_args(call: AttentionCall) -> tuple:
    """FwdParams' score-mod fields: (key, c0, c1, c2, c3, meta) of the compiled mod, or empty ones."""
    if call.score_mod is None:
        return ("", None, None, None, None, None)
    from attnkit import compiler

    why, comp = _score_mod_check(call)  # (memoized: why_not compiled it)
    if why is not None:  # a choice reused for a mod of the same structure that does not compile
        raise UnsupportedError("triton", [why])
    # tensors that want their gradient are read contiguous (a differentiable copy where they are not): their
    # float32 gradient buffers are contiguous, with the same strides
    tensors = tuple(t.contiguous() if i in comp.grad_slots else t for i, t in enumerate(comp.tensors))
    slots = list(tensors) + [None] * (compiler.MAX_TENSORS - len(tensors))
    return (comp.key, *slots, compiler.meta(tensors, call.device))
