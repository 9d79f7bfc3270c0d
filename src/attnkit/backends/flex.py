"""torch FlexAttention backend (``flex``).

Every feature except dropout maps onto FlexAttention: softcap, bias, ALiBi and the user's ``score_mod``
become one score_mod; causal, window and the user's mask become one mask_mod, turned into a block-sparse
``BlockMask``. ``thd`` batches run as one packed sequence (B=1) whose mask_mod keeps documents apart and
whose mods see positions inside each sequence, so a new set of lengths does not need a new kernel.

On CUDA, ``flex_attention`` and ``create_block_mask`` are compiled once (torch.compile caches one kernel per
shape family and per mod); block masks of pure causal/window calls are cached per shape. On the CPU the
backend runs FlexAttention eagerly (unfused: it materialises scores; correct, not fast).
"""

from __future__ import annotations

import torch

from attnkit._call import AttentionCall
from attnkit.backends import _flex_common as common
from attnkit.backends._roofline import tile_programs
from attnkit.backends.base import Backend, attention_flops

# Compiled FlexAttention TFLOP/s (visible-pair FLOPs; forward, forward+backward) on an H200, bf16, by
# (D <= 64, causal): the means of the S=4096 and S=16384 rows of `attnkit bench kernels --quick`, one run with
# FA4 and our kernels (2026-12-02 20:20 UTC, docs/results/2026-12-02-h200-d/). One D=128 rate for all (470)
# made auto pick flex over FA4 for a causal D=64 forward (376 against 503 TFLOP/s).
_CUDA_RATES = {
    (False, False): (462e12, 413e12),
    (False, True): (384e12, 367e12),
    (True, False): (395e12, 336e12),
    (True, True): (361e12, 303e12),
}
_CPU_RATES = (5e9, 2.5e9)
# Some mods (e.g. a learnable relative-bias table) make inductor's default flex tiles overflow shared
# memory ("out of resource"); such call families are retried, and then run, with these smaller tiles. Where
# only the backward overflowed (a learnable T5 bias at D=128, bf16, H200), only its tiles shrink ("bwd_"
# options), so the forward keeps inductor's tuned tiles.
_SMALL_TILE_OPTIONS = {
    "BLOCK_M": 64,
    "BLOCK_N": 64,
    "BLOCK_M1": 32,
    "BLOCK_N1": 64,
    "BLOCK_M2": 64,
    "BLOCK_N2": 32,
    "num_stages": 1,
}
_SMALL_BWD_TILE_OPTIONS = {
    "BLOCK_M1": 32,
    "BLOCK_N1": 64,
    "BLOCK_M2": 64,
    "BLOCK_N2": 32,
    "bwd_num_stages": 1,
}
_SMALL_TILES: dict = {}  # call family -> the kernel_options it runs with


class FlexBackend(Backend):
    name = "flex"
    description = "torch FlexAttention (compiled on CUDA, eager on CPU), block-sparse masks"

    def _check_available(self):
        fa = common.flex_module()
        if not hasattr(fa, "flex_attention"):
            return False, "torch.nn.attention.flex_attention is missing from this torch"
        return True, None

    def why_not(self, call: AttentionCall) -> list[str]:
        r = []
        dev = call.device.type
        if dev not in ("cuda", "cpu"):
            r.append(f"no FlexAttention for device {dev}")
        if call.dropout_p > 0:
            r.append("FlexAttention has no dropout")
        if dev == "cpu" and call.requires_grad:
            r.append("FlexAttention has no backward on the CPU")
        if dev == "cuda":
            if call.dtype == torch.float64:
                r.append("compiled FlexAttention does not support float64")
            for name, d in (("D", call.D), ("Dv", call.Dv)):
                if d < 16 or d > 256 or d % 8:
                    r.append(
                        f"head dim {name}={d}: compiled FlexAttention needs a multiple of 8 in [16, 256]"
                    )
        if (
            call.deterministic
            and call.requires_grad
            and (call.bias is not None or call.score_mod is not None)
        ):
            r.append("deterministic=True: gradients of captured tensors (bias, score_mod) use atomics")
        return r + common.vmap_refusals(call)

    def compute_seconds(self, call: AttentionCall) -> float:
        if call.device.type == "cuda":
            rates = _CUDA_RATES[(max(call.D, call.Dv) <= 64, call.causal or call.window is not None)]
        else:
            rates = _CPU_RATES
        rate = rates[1 if call.requires_grad else 0]
        density = self._mask_block_density(call)
        if density is not None:  # its measured rate over the visible blocks of this kind of mask, if any
            rate = common.block_rate(self.name, call) or rate
        if call.softcap is not None or call.score_mod is not None or call.bias is not None:
            rate *= 0.45  # a softcap score_mod ran at 214 vs 476 TFLOP/s (docs/anchors.md)
        if call.device.type == "cuda" and call.dtype == torch.float32:
            rate /= 8
        # Block sparsity: causal/window pairs are skipped. A user mask's sparsity is read off its BlockMask
        # (built now and cached for the call that follows), except under torch.compile: then dense.
        flops = attention_flops(call, call.requires_grad, dense=call.device.type != "cuda")
        if density is not None:
            flops = attention_flops(call, call.requires_grad, dense=True) * density
        return flops / rate

    def memory_traffic(self, call: AttentionCall) -> tuple[int | None, float, float]:
        # Its Triton kernels take one program per (batch, head, query tile) and GQA heads packed in decode;
        # priced without a split of the key range: at B=16, 32/8 heads, Sk=8k, Sq=1 flex ran 0.317 ms to
        # SDPA's 0.134 (H200, bf16, issue 15)
        return tile_programs(call, 128, pack_gqa=True), 1.0, 0.0

    def overhead_seconds(self, call: AttentionCall) -> float:
        t = 60e-6 if call.device.type == "cuda" else 1e-3
        if call.mask is not None or call.layout == "thd":
            t += 50e-6  # looking the block mask up
        if call.device.type == "cuda":
            t += common.block_mask_seconds(call)  # (a new mask: its BlockMask is built first)
        return t

    def _mask_block_density(self, call: AttentionCall) -> float | None:
        return common.mask_block_density(call)

    def notes(self, call: AttentionCall) -> list[str]:
        n = []
        if call.device.type == "cpu":
            n.append("CPU: FlexAttention runs eagerly (unfused, materialises scores)")
        else:
            n.append("compiled once per shape family (first call pays compilation)")
        if call.layout == "thd":
            n.append("thd: one packed sequence with a document mask")
        return n

    # -- run ---------------------------------------------------------------------------------------------
    def run(self, call: AttentionCall):
        fa = common.flex_module()
        q, k, v, score_mod, mask_mod, B, Q, K = common.inputs(call)
        block_mask = self._block_mask(call, mask_mod, B, Q, K)
        compiled = call.device.type == "cuda"
        # Inside a torch.compile'd region the outer compilation fuses flex_attention itself.
        fn = common.compiled_flex() if compiled and not torch.compiler.is_compiling() else fa.flex_attention
        kwargs = dict(
            score_mod=score_mod, block_mask=block_mask, scale=call.scale, enable_gqa=call.Hq != call.Hk
        )
        key = (call.D, call.Dv, call.dtype, score_mod is not None, call.requires_grad)
        if compiled and key in _SMALL_TILES:
            kwargs["kernel_options"] = _SMALL_TILES[key]
        # Dense calls compile per shape (inductor's dynamic-shape lowering of some score_mods fails,
        # e.g. softcap: "unbacked_bindings"); thd calls let lengths go dynamic so new batches reuse the
        # kernel, and fall back to a static compile if the dynamic one fails.
        dynamic = call.layout == "thd"
        try:
            out, lse = self._call(fn, q, k, v, call.return_lse, kwargs, dynamic)
        except Exception as e:
            if not compiled:
                raise
            if _tiles_too_big(e) and "kernel_options" not in kwargs:
                out, lse = self._smaller_tiles(fn, q, k, v, call, kwargs, key, e)
            elif not dynamic:
                raise
            else:
                out, lse = self._call(fn, q, k, v, call.return_lse, kwargs, False)
        return common.outputs(call, out, lse)

    def _smaller_tiles(self, fn, q, k, v, call, kwargs, key, e):
        """Inductor's default tiles overflowed shared memory: the backward's tiles alone shrunk where only
        the backward overflowed, else (or if that still overflows) every tile; the family keeps what ran."""
        tries = (_SMALL_BWD_TILE_OPTIONS, _SMALL_TILE_OPTIONS) if _in_backward(e) else (_SMALL_TILE_OPTIONS,)
        for options in tries:
            try:
                got = self._call(fn, q, k, v, call.return_lse, {**kwargs, "kernel_options": options}, False)
            except Exception as again:
                if options is tries[-1] or not _tiles_too_big(again):
                    raise
                continue
            _SMALL_TILES[key] = options
            return got

    # the lowering lives in _flex_common (shared with flex_flash); kept here under the old names
    _call = staticmethod(common.call_flex)
    _dense_mods = staticmethod(common.dense_mods)
    _packed_mods = staticmethod(common.packed_mods)

    def _block_mask(self, call, mask_mod, B, Q, K):
        return common.block_mask(call, mask_mod, B, Q, K)


def _tiles_too_big(e: Exception) -> bool:
    """Inductor's default flex tiles did not fit: a kernel ran out of shared memory, or every autotuning
    choice did (float32 at D=80 with causal: "NoValidChoicesError: No choices to select", H200)."""
    return "out of resource" in str(e) or "No choices to select" in str(e)


def _in_backward(e: Exception) -> bool:
    """The kernel that did not fit is the backward's (inductor's name: ``..._flex_attention_backward...``)."""
    return "flex_attention_backward" in str(e)


BACKEND = FlexBackend()
