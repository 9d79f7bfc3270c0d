"""FlexAttention on FlashAttention-4's kernels (``flex_flash``): ``kernel_options={"BACKEND": "FLASH"}``.

The same lowering as the ``flex`` backend (``backends/_flex_common.py``: softcap, bias, ALiBi and score_mod
as one score_mod; causal, window and masks as one block-sparse mask_mod; thd as one packed sequence), run
by inductor's CuTe DSL template (``torch/_inductor/kernel/flex/flex_flash_attention.py``), which calls
``flash_attn.cute``. What that path takes, read from the installed torch and flash-attn-4 4.0.0b36:

- ``flash_attn.cute`` importable and an SM90 / SM100 GPU; float16 / bfloat16; FA4's head dims.
- No gradients of captured tensors ("Input buffers require gradients (not supported by flash attention)"):
  a bias, ALiBi slopes or score_mod tensor that requires grad is refused.
- No backward through the lse ("FLASH backend backward does not support differentiating through
  logsumexp"): return_lse together with gradients is refused.
- No dropout; no deterministic backward on SM90 with a block mask (torch raises): deterministic with
  gradients is refused.
- A caller's BlockMask must have full blocks ("block mask but without full blocks is not supported").
- The lse: FA4 writes it in natural log, but torch's ``flex_attention`` wrapper multiplied every backend's
  lse by ln 2 (the Triton kernels keep base 2) until pytorch PR #181824 (issue #181645, 2026-04) gave its
  ``_finalize_outputs`` a ``stats_are_log2`` flag that is False for FLASH: torch 2.11 on the H200 returned
  lse * ln 2 (lse error 2.1 against the oracle, 2026-12-02). :func:`lse_factor` reads which wrapper is
  installed and the backend divides the ln 2 back out; where it cannot tell, return_lse is refused.
Compiled per shape (``dynamic=False``: FLASH cannot inline symbolic scalars captured by the mods).
"""

from __future__ import annotations

import inspect
import math
import types

import torch

from attnkit._call import AttentionCall
from attnkit._captures import captured_tensors
from attnkit.backends import _cute
from attnkit.backends import _flex_common as common
from attnkit.backends._roofline import tile_programs
from attnkit.backends.base import Backend, attention_flops

_KERNEL_OPTIONS = {"BACKEND": "FLASH"}
# FA4's kernels underneath: never faster than FA4 called directly (flash_attn4's measured rates), slower by
# the score_mod / bias factor (docs/anchors.md: tanh softcap 30 ran 357 TFLOP/s fwd, 256 fwd+bwd).
_MOD_FACTOR = (0.6, 0.55)
_LAUNCH_S = 60e-6
# A call FA4 serves itself (no mask, score_mod, bias or ALiBi) is better served by FA4 directly: on the H200
# (2026-12-02, bench kernels) `auto` ran B=32 H=32 S=512 D=64 fwd in 0.625 ms against FA4's 0.211 when
# this backend's estimate (then a flat 600 TFLOP/s) ranked it first: flex's wrapper costs ~0.4 ms there.
_PLAIN_S = 0.4e-3
# Masked calls (block-sparse FLASH) ran below FA4's dense rate over the visible blocks: a causal document
# mask (8 documents, B=2 H=16 S=8192 D=128) took 0.936 ms forward and 1.580 forward+backward on the H200
# (2026-12-02, docs/results/2026-12-02-h200/masks.txt) where FA4's rates give 0.36 and 1.04: (fwd, fwd+bwd).
_MASK_FACTOR = (0.385, 0.66)
# Call families whose FLASH compile failed (inductor raises for mods its CuTe DSL template cannot take):
# family key -> the error, refused from then on so that ``auto`` goes elsewhere.
_FAILED: dict = {}


def _grad_captures(call: AttentionCall) -> list[str]:
    """Names of the call's captured tensors (bias, ALiBi, score_mod, mask) that require grad."""
    names = []
    for name in ("bias", "alibi_slopes"):
        t = getattr(call, name)
        if t is not None and t.requires_grad:
            names.append(name)
    for name in ("score_mod", "mask"):
        obj = getattr(call, name)
        if obj is not None and any(t.requires_grad for t in captured_tensors(getattr(obj, "source", obj))):
            names.append(name)
    return names


def feature_reasons(call: AttentionCall) -> list[str]:
    """What the FLASH template refuses in any call, whatever the device (device, dtype, head dims: _cute)."""
    r = []
    if call.requires_grad:
        grads = _grad_captures(call)
        if grads:
            r.append(f"FLASH takes no gradients of captured tensors ({', '.join(grads)} requires grad)")
        if call.return_lse:
            r.append("FLASH's backward does not differentiate through the lse (return_lse with grad)")
        if call.deterministic:
            r.append("deterministic=True: FLASH's deterministic backward needs SM100 and extra metadata")
    if call.return_lse and lse_factor() is None:
        r.append(
            "return_lse: cannot tell whether this torch's flex_attention rescales FLASH's lse by ln 2 "
            "(pytorch issue 181645)"
        )
    bm = call.block_mask
    if bm is not None and bm.full_kv_num_blocks is None:
        r.append("FLASH needs a BlockMask with full blocks (create_block_mask makes them)")
    return r


def lse_factor_of(flex_attention) -> float | None:
    """What turns the lse that ``flex_attention`` (torch's wrapper function) returns with BACKEND="FLASH"
    into the natural-log lse: 1.0 where its ``_finalize_outputs`` (nested in it, or in its module) takes
    ``stats_are_log2`` (the fixed wrapper leaves FLASH's lse alone), 1 / ln 2 where it takes no such flag
    (the wrapper multiplies FA4's natural-log lse by ln 2), None where there is none to read (unknown)."""
    fn = inspect.unwrap(flex_attention)
    codes = [getattr(fn, "__code__", None)]
    module_level = getattr(inspect.getmodule(fn), "_finalize_outputs", None)
    found = [getattr(module_level, "__code__", None)]
    while codes:  # every code object nested in the wrapper
        code = codes.pop()
        for c in getattr(code, "co_consts", ()):
            if isinstance(c, types.CodeType):
                (found if c.co_name == "_finalize_outputs" else codes).append(c)
    for c in found[::-1]:  # a nested one first (it is the one the wrapper calls)
        if isinstance(c, types.CodeType):
            names = c.co_varnames[: c.co_argcount + c.co_kwonlyargcount]
            return 1.0 if "stats_are_log2" in names else 1.0 / math.log(2.0)
    return None


_LSE_FACTOR: list = []  # filled once, eagerly, by the availability check (traced calls only read it)


def lse_factor() -> float | None:
    """:func:`lse_factor_of` the installed torch's ``flex_attention`` (read once)."""
    if not _LSE_FACTOR:
        try:
            _LSE_FACTOR.append(lse_factor_of(common.flex_module().flex_attention))
        except Exception:  # an unreadable wrapper: the lse convention is unknown
            _LSE_FACTOR.append(None)
    return _LSE_FACTOR[0]


def _family(call: AttentionCall):
    """What decides whether FLASH can compile a call: the mods and masks (by identity), shapes, grad mode."""
    srcs = tuple(id(getattr(o, "source", o)) for o in (call.score_mod, call.mask) if o is not None)
    flags = (call.softcap is not None, call.bias is not None, call.alibi_slopes is not None)
    return (srcs, flags, call.layout, call.D, call.Dv, call.Hq, call.Hk, call.dtype, call.requires_grad)


class FlexFlashBackend(Backend):
    name = "flex_flash"
    description = 'torch FlexAttention with kernel_options={"BACKEND": "FLASH"} (FA4 kernels)'

    def _check_available(self):
        lse_factor()  # read now, outside any traced call
        ok, why = _cute.availability()
        if not ok:
            return ok, why
        fa = common.flex_module()
        if "BACKEND" not in getattr(getattr(fa, "FlexKernelOptions", None), "__annotations__", {}):
            return False, f"this torch ({torch.__version__}) has no FlexAttention BACKEND kernel option"
        return True, None

    def why_not(self, call: AttentionCall) -> list[str]:
        r = _cute.common_reasons(call)
        if call.device.type != "cuda":
            return r
        r += feature_reasons(call) + common.vmap_refusals(call)
        failed = _FAILED.get(_family(call))
        return r + ([f"an earlier FLASH compile of this call family failed: {failed}"] if failed else [])

    def compute_seconds(self, call: AttentionCall) -> float:
        grad = 1 if call.requires_grad else 0
        mods = 1.0
        if call.score_mod is not None or call.bias is not None:
            mods /= _MOD_FACTOR[grad]
        if call.alibi_slopes is not None:
            mods /= _MOD_FACTOR[grad]
        density = common.mask_block_density(call)
        measured = common.block_rate(self.name, call) if density is not None else None
        if measured is not None:  # its measured rate over the visible blocks of this kind of mask (no mods)
            return attention_flops(call, call.requires_grad, dense=True) * density / measured
        t = _cute.compute_seconds(call) * mods  # (softcap included)
        if density is not None:
            dense = attention_flops(call, call.requires_grad, dense=True)
            t *= density * dense / max(attention_flops(call, call.requires_grad), 1.0)
        if call.mask is not None or call.block_mask is not None:
            t /= _MASK_FACTOR[grad]
        return t

    def memory_traffic(self, call: AttentionCall) -> tuple[int | None, float, float]:
        # FA4's CuTe kernels underneath: no split of the key range (as flash_attn4; not measured apart)
        return tile_programs(call, 128, pack_gqa=True), 1.0, 0.0

    def overhead_seconds(self, call: AttentionCall) -> float:
        t = _LAUNCH_S
        if call.mask is not None or call.layout == "thd":
            t += 50e-6  # looking the block mask up
        if call.device.type == "cuda":
            t += common.block_mask_seconds(call)  # (a new mask: its BlockMask is built first)
        extras = ("mask", "block_mask", "score_mod", "bias", "alibi_slopes")
        plain = all(getattr(call, n) is None for n in extras)
        return t + (_PLAIN_S if plain else 0.0)

    def notes(self, call: AttentionCall) -> list[str]:
        n = ["rates from docs/anchors.md (2026-12-02, one H200 run), not yet re-measured by attnkit"]
        n.append("compiled once per shape (first call pays compilation)")
        if call.layout == "thd":
            n.append("thd: one packed sequence with a document mask")
        return n

    def run(self, call: AttentionCall):
        fa = common.flex_module()
        q, k, v, score_mod, mask_mod, B, Q, K = common.inputs(call)
        block_mask = common.block_mask(call, mask_mod, B, Q, K)
        fn = fa.flex_attention if torch.compiler.is_compiling() else common.compiled_flex()
        kwargs = dict(
            score_mod=score_mod,
            block_mask=block_mask,
            scale=call.scale,
            enable_gqa=call.Hq != call.Hk,
            kernel_options=dict(_KERNEL_OPTIONS),
        )
        try:
            out, lse = common.call_flex(fn, q, k, v, call.return_lse, kwargs, dynamic=False)
        except Exception as e:
            if not torch.compiler.is_compiling():
                from attnkit import dispatch

                first = str(e).splitlines()[0][:200] if str(e) else ""
                _FAILED[_family(call)] = f"{type(e).__name__}: {first}"
                dispatch._CHOICES.clear()  # cached choices of this family must be made again
            raise
        out, lse = common.outputs(call, out, lse)
        factor = lse_factor()
        if lse is not None and factor != 1.0:
            lse = lse * factor  # the wrapper's extra ln 2 divided out (see the module docstring)
        return out, lse


BACKEND = FlexFlashBackend()
