"""The ``triton_decode`` backend: short-query ``attention()`` calls on the split-KV decode kernel.

A call with few query rows (Sq <= 16: decode steps, speculative verification) reads K and V once and
does little arithmetic, so its time is the bytes of K and V over the memory bandwidth; the forward
kernel's query tiles would sit mostly empty and its grid would not fill the GPU. This backend views the
keys as a contiguous cache that every row fills (no ``cache_seqlens``: the kernel's ``FULL``) and runs
``ops/decode.py``: GQA heads packed into one tile, the key range split over programs, one combine.
Forward only (no gradient), dense layouts, the flags the kernel has (causal, window, softcap, ALiBi), and
a ``score_mod`` / ``mask`` compiled into the kernel (:func:`kernel_mod`: the mask per element as
``where(mask, score_mod(s), -inf)``; ``attention_with_kvcache`` takes the same path).
"""

from __future__ import annotations

import dataclasses

import torch

from attnkit._call import AttentionCall
from attnkit.backends.base import Backend, attention_flops
from attnkit.backends.triton.runtime import capability as _cap

MAX_SQ = 16
_MAX_HEAD_DIM = 256
_INT32 = 2**31 - 1
# The key range is split to fill the GPU: the memory term is _roofline.py's with a full grid (the issue's
# target, >= 3.9 TB/s; H200, bf16, 2026-12-02: 4.3 TB/s at B=16 Sk=32k, ~2.4 TB/s at B=1 Sk=128k).
# NOT MEASURED: the arithmetic rate of the packed GQA tiles (matters only from ~64 rows a tile); about the
# forward kernel's.
_RATE = 300e12
_HOST_FLOOR = 35e-6  # seconds a call costs whatever its size (see overhead_seconds)


class TritonDecodeBackend(Backend):
    name = "triton_decode"
    description = "attnkit's split-KV decode kernel for short queries (Sq <= 16, forward only)"

    def _check_available(self):
        import triton  # noqa: F401

        if torch.cuda.is_available() or _cap.interpreting():
            return True, None
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on the CPU)"

    def why_not(self, call: AttentionCall) -> list[str]:
        r = []
        if call.layout not in ("bhsd", "bshd"):
            r.append(f"layout {call.layout!r} (bhsd or bshd)")
        if call.Sq > MAX_SQ:
            r.append(f"Sq = {call.Sq} > {MAX_SQ} query rows (the forward kernel serves long queries)")
        if call.requires_grad:
            r.append("no backward (decode kernel): inputs require grad")
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            r.append(f"dtype {call.dtype} not supported (float16, bfloat16, float32)")
        if call.device.type == "cuda":
            if _cap.capability(call.device) < (8, 0):
                r.append("needs a GPU of compute capability >= 8.0")
        elif not _cap.interpreting():
            r.append(f"tensors on {call.device.type}: needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        elif call.dtype == torch.bfloat16:
            r.append("bfloat16 in the Triton interpreter (its bf16 tl.dot is wrong): CUDA only")
        if call.bias is not None:
            r.append("bias is not supported by the decode kernel")
        why = mod_why_not(call)
        if why is not None:
            r.append(why)
        if call.dropout_p > 0:
            r.append("dropout is not supported by the decode kernel")
        if call.alibi_slopes is not None and call.alibi_slopes.requires_grad:
            r.append("no gradient for alibi_slopes")
        if max(call.D, call.Dv) > _MAX_HEAD_DIM:
            r.append(f"head dim {max(call.D, call.Dv)} > {_MAX_HEAD_DIM}")
        if call.Sk == 0:
            r.append("no keys")
        return r

    def run(self, call: AttentionCall):
        from attnkit.backends.triton.ops.decode import decode

        wl, wr = call.window if call.window is not None else (-1, -1)
        # every row holds all Sk keys: no lengths tensor (cache_seqlens=None); bhsd tensors are read through
        # their strides (``bhsd``), so the call's host work is the plan lookup, the outputs and the launches
        out, lse = decode(
            call.q,
            call.k,
            call.v,
            None,
            None,
            call.alibi_slopes,
            0,
            call.scale,
            call.causal,
            wl,
            wr,
            call.softcap or 0.0,
            0,
            call.layout == "bhsd",
            *mod_args(kernel_mod(call.score_mod, call.mask), call.device),
        )
        return out, (lse if call.return_lse else None)

    def compute_seconds(self, call: AttentionCall) -> float:
        if call.device.type != "cuda":
            return 1e6 + call.batch * call.Hq * call.Sq * call.Sk * (call.D + call.Dv) / 1e6
        return attention_flops(call) / (_RATE / (12.0 if call.dtype == torch.float32 else 1.0))

    def overhead_seconds(self, call: AttentionCall) -> float:
        # The host time of a call through attention() beyond the kernels' (the SDPA backends count 20 us):
        # H200 run J, `attnkit bench decode --host`, B=1 L=8k, once attention() kept repeated plain calls'
        # checks (api._PLAIN): 67.8 us a call here against 54.5 through auto (cuDNN), 28.5 raw SDPA; the
        # same order in call 2 (79.2 / 64.8 / 27.1). Its kernels read K+V in ~10 us there. Added, not a
        # floor (``host_seconds``), as the SDPA backends' 20 us are: the two compete on decode rows where
        # both kernels read the same bytes (cuDNN measured 1-2% faster at B=16)
        return _HOST_FLOOR

    def notes(self, call: AttentionCall) -> list[str]:
        return [f"GQA heads packed: {call.Sq * call.group} rows a tile; key range split to fill the GPU"]


def kernel_mod(score_mod, mask):
    """The one ScoreMod the decode kernel inlines for a validated (score_mod, mask) pair, or None: the mask
    (no interval lowering in decode) folded in as ``where(mask, score_mod(s), -inf)`` (the triton
    backend's ``_masked_mod``, memoized on the mask)."""
    if mask is None:
        return score_mod
    from attnkit.backends.triton.backend import _masked_mod

    return _masked_mod(mask, score_mod)


def mod_why_not(call: AttentionCall) -> str | None:
    """Why the call's score_mod / mask cannot be compiled into the decode kernel (None: it can, or none)."""
    if call.score_mod is None and call.mask is None:
        return None
    from attnkit.backends.triton.backend import _score_mod_check

    mod = kernel_mod(call.score_mod, call.mask)
    why = _score_mod_check(dataclasses.replace(call, score_mod=mod, mask=None))[0]
    return None if why is None else f"{'mask' if call.mask is not None else 'score_mod'} {mod.name}: {why}"


def mod_args(mod, device) -> tuple:
    """The decode op's score-mod arguments (its compiled key, captured tensors in slots, their strides/sizes
    table) for ``mod`` (:func:`kernel_mod`'s), compiled through the compiler's memo (by structure: a decode
    loop traces once), the tensors this call's; empty without a mod."""
    if mod is None:
        return ()
    from attnkit import compiler

    comp = compiler.compile_score_mod(mod)
    slots = list(comp.tensors) + [None] * (compiler.MAX_TENSORS - len(comp.tensors))
    return (comp.key, *slots, compiler.meta(comp.tensors, device))


DECODE_BACKEND = TritonDecodeBackend()
