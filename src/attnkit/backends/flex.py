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

import functools
import warnings
from collections import OrderedDict

import torch

from attnkit import _compile
from attnkit._call import AttentionCall
from attnkit._captures import captured_tensors
from attnkit._semantics import modify_scores, visibility
from attnkit.backends.base import Backend, attention_flops, to_bhsd

_BLOCK_CACHE: OrderedDict = OrderedDict()
_BLOCK_CACHE_SIZE = 32
# Measured TFLOP/s (forward, forward+backward) of compiled FlexAttention on an H200, bf16 (ANCHORS.md).
_CUDA_RATES = (470e12, 410e12)
_CPU_RATES = (5e9, 2.5e9)
# Some mods (e.g. a learnable relative-bias table) make inductor's default flex tiles overflow shared
# memory ("out of resource"); such call families are retried, and then run, with these smaller tiles.
_SMALL_TILE_OPTIONS = {
    "BLOCK_M": 64,
    "BLOCK_N": 64,
    "BLOCK_M1": 32,
    "BLOCK_N1": 64,
    "BLOCK_M2": 64,
    "BLOCK_N2": 32,
    "num_stages": 1,
}
_SMALL_TILES: set = set()


@functools.cache
def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


@functools.cache
def _compiled_flex():
    return torch.compile(_flex().flex_attention)


def _recompile_headroom(dynamic: bool = True):
    """Each distinct set of mods (and, for static compiles, each shape) is its own compiled kernel; past
    dynamo's default limit of 8 variants torch would silently run flex_attention eagerly (unfused).
    Allow more variants for our calls, and turn automatic dynamic shapes on or off."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), 256), "automatic_dynamic_shapes": dynamic})


class FlexBackend(Backend):
    name = "flex"
    description = "torch FlexAttention (compiled on CUDA, eager on CPU), block-sparse masks"

    def _check_available(self):
        fa = _flex()
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
        return r

    def cost(self, call: AttentionCall) -> float:
        rates = _CUDA_RATES if call.device.type == "cuda" else _CPU_RATES
        rate = rates[1 if call.requires_grad else 0]
        if call.softcap is not None or call.score_mod is not None or call.bias is not None:
            rate *= 0.45  # a softcap score_mod ran at 214 vs 476 TFLOP/s (ANCHORS.md)
        if call.device.type == "cuda" and call.dtype == torch.float32:
            rate /= 8
        # Block sparsity: causal/window pairs are skipped. A user mask's sparsity is read off its BlockMask
        # (built now and cached for the call that follows), except under torch.compile: then dense.
        flops = attention_flops(call, call.requires_grad, dense=call.device.type != "cuda")
        density = self._mask_block_density(call)
        if density is not None:
            flops = attention_flops(call, call.requires_grad, dense=True) * density
        t = flops / rate + (60e-6 if call.device.type == "cuda" else 1e-3)
        if call.mask is not None or call.layout == "thd":
            t += 50e-6  # building a block mask
        return t

    def _mask_block_density(self, call: AttentionCall) -> float | None:
        """Fraction of (query block, key block) pairs a user mask leaves visible, or None if not known."""
        if (
            call.mask is None
            or call.layout == "thd"
            or call.device.type != "cuda"
            or torch.compiler.is_compiling()
        ):
            return None
        _, mask_mod = self._dense_mods(call)
        bm = self._block_mask(call, mask_mod, call.batch, call.Sq, call.Sk)
        visible = bm.kv_num_blocks.sum() + (
            0 if bm.full_kv_num_blocks is None else bm.full_kv_num_blocks.sum()
        )
        total = bm.kv_num_blocks.numel() * -(-call.Sk // bm.BLOCK_SIZE[1])
        return float(visible) / max(total, 1)

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
        fa = _flex()
        if call.layout == "thd":
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (call.q, call.k, call.v))  # (1, H, T, D)
            score_mod, mask_mod = self._packed_mods(call)
            B, Q, K = 1, q.shape[2], k.shape[2]
        else:
            q, k, v = (to_bhsd(t, call.layout) for t in (call.q, call.k, call.v))
            score_mod, mask_mod = self._dense_mods(call)
            B, Q, K = call.batch, call.Sq, call.Sk
        block_mask = self._block_mask(call, mask_mod, B, Q, K)
        compiled = call.device.type == "cuda"
        # Inside a torch.compile'd region the outer compilation fuses flex_attention itself.
        fn = _compiled_flex() if compiled and not torch.compiler.is_compiling() else fa.flex_attention
        kwargs = dict(
            score_mod=score_mod, block_mask=block_mask, scale=call.scale, enable_gqa=call.Hq != call.Hk
        )
        key = (call.D, call.Dv, call.dtype, score_mod is not None, call.requires_grad)
        if compiled and key in _SMALL_TILES:
            kwargs["kernel_options"] = _SMALL_TILE_OPTIONS
        # Dense calls compile per shape (inductor's dynamic-shape lowering of some score_mods fails,
        # e.g. softcap: "unbacked_bindings"); thd calls let lengths go dynamic so new batches reuse the
        # kernel, and fall back to a static compile if the dynamic one fails.
        dynamic = call.layout == "thd"
        try:
            out, lse = self._call(fn, q, k, v, call.return_lse, kwargs, dynamic)
        except Exception as e:
            if not compiled:
                raise
            if "out of resource" in str(e) and "kernel_options" not in kwargs:
                _SMALL_TILES.add(key)  # inductor's default tiles overflow shared memory: smaller tiles
                kwargs["kernel_options"] = _SMALL_TILE_OPTIONS
            elif not dynamic:
                raise
            out, lse = self._call(fn, q, k, v, call.return_lse, kwargs, False)
        if call.layout == "thd":
            out = out[0].transpose(0, 1)
            lse = None if lse is None else lse[0]
        elif call.layout == "bshd":
            out = out.transpose(1, 2)
        return out, (None if lse is None else lse.float())

    @staticmethod
    def _call(fn, q, k, v, return_lse, kwargs, dynamic=True):
        fa = _flex()
        # (compile_count(): the torch.compile graphs these calls compile are attnkit's)
        with warnings.catch_warnings(), _recompile_headroom(dynamic), _compile.counting_dynamo():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            if not return_lse:
                return fn(q, k, v, **kwargs), None
            if hasattr(fa, "AuxRequest"):
                out, aux = fn(q, k, v, return_aux=fa.AuxRequest(lse=True), **kwargs)
                return out, aux.lse
            return fn(q, k, v, return_lse=True, **kwargs)

    def _block_mask(self, call, mask_mod, B, Q, K):
        if mask_mod is None:
            return None
        fa = _flex()
        if call.block_mask is not None and not call.causal and call.window is None and call.layout != "thd":
            bm = call.block_mask  # the caller's own BlockMask, when it fits this call, keeps its sparsity
            if tuple(bm.seq_lengths) == (Q, K) and bm.shape[0] in (1, B) and bm.shape[1] in (1, call.Hq):
                return bm
        # Block structure is cached per shape for causal/window, and per mask object for user masks: the
        # key holds the mask's identity and the in-place version of every tensor it captures, so editing
        # doc ids in place, or passing a new mask, builds a new BlockMask. thd masks depend on cu_seqlens.
        if call.layout == "thd" or torch.compiler.is_compiling():
            key = None
        elif call.mask is None:
            key = (call.device, Q, K, call.causal, call.window)
        else:
            src = getattr(call.mask, "source", call.mask)
            versions = tuple((id(t), t._version) for t in captured_tensors(src))
            key = (call.device, B, call.Hq, Q, K, call.causal, call.window, id(src), versions)
        if key is not None and key in _BLOCK_CACHE:
            _BLOCK_CACHE.move_to_end(key)
            return _BLOCK_CACHE[key][1]
        compiled = call.device.type == "cuda"
        depends_on_bh = call.mask is not None or call.layout == "thd"
        Bm, Hm = (B, call.Hq) if depends_on_bh else (None, None)  # causal/window never depend on b or h
        with _compile.counting_dynamo():
            bm = fa.create_block_mask(mask_mod, Bm, Hm, Q, K, device=call.device, _compile=compiled)
        if key is not None:
            # the value keeps the mask object alive, so its id cannot be reused while the entry lives
            _BLOCK_CACHE[key] = (call.mask and getattr(call.mask, "source", call.mask), bm)
            if len(_BLOCK_CACHE) > _BLOCK_CACHE_SIZE:
                _BLOCK_CACHE.popitem(last=False)
        return bm

    @staticmethod
    def _dense_mods(call: AttentionCall):
        off = call.Sk - call.Sq
        user_score = call.bound_score_mod(call.Sq, call.Sk)
        user_mask = call.bound_mask_mod(call.Sq, call.Sk)
        bias = None
        if call.bias is not None:
            b4 = call.bias.reshape((1,) * (4 - call.bias.dim()) + tuple(call.bias.shape))
            bias = b4.expand(call.batch, call.Hq, call.Sq, call.Sk)
        slopes = call.alibi_slopes
        softcap, causal, window = call.softcap, call.causal, call.window  # plain values: dynamo guards
        has_score = softcap is not None or bias is not None or slopes is not None or user_score is not None

        def score_mod(score, b, h, q_idx, kv_idx):
            return modify_scores(
                score,
                softcap=softcap,
                bias=None if bias is None else bias[b, h, q_idx, kv_idx],
                slopes=None if slopes is None else (slopes[h] if slopes.dim() == 1 else slopes[b, h]),
                score_mod=user_score,
                b=b,
                h=h,
                q=q_idx,
                kv=kv_idx,
                off=off,
            )

        has_mask = causal or window is not None or user_mask is not None

        def mask_mod(b, h, q_idx, kv_idx):
            return visibility(
                causal=causal,
                window=window,
                mask_mod=user_mask,
                b=b,
                h=h,
                q=q_idx,
                kv=kv_idx,
                off=off,
            )

        return (score_mod if has_score else None), (mask_mod if has_mask else None)

    @staticmethod
    def _packed_mods(call: AttentionCall):
        """Mods over one packed sequence: map packed rows to (sequence, position inside it)."""
        dev = call.device
        cq, ck = call.cu_seqlens_q.long(), call.cu_seqlens_k.long()
        lq_t, lk_t = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
        # Sequence of every packed row, found on the device (no host sync: traceable, graph-capturable).
        q_doc = torch.searchsorted(cq[1:], torch.arange(call.q.shape[0], device=dev), right=True)
        k_doc = torch.searchsorted(ck[1:], torch.arange(call.k.shape[0], device=dev), right=True)
        q_pos = torch.arange(call.q.shape[0], device=dev) - cq[q_doc]
        k_pos = torch.arange(call.k.shape[0], device=dev) - ck[k_doc]
        offs = lk_t - lq_t
        user_score = call.bound_score_mod(lq_t, lk_t)
        user_mask = call.bound_mask_mod(lq_t, lk_t)
        bias = None
        if call.bias is not None:
            b4 = call.bias.reshape((1,) * (4 - call.bias.dim()) + tuple(call.bias.shape))
            bias = b4.expand(call.batch, call.Hq, call.Sq, call.Sk)
        slopes = call.alibi_slopes
        softcap, causal, window = call.softcap, call.causal, call.window  # plain values: dynamo guards
        has_score = softcap is not None or bias is not None or slopes is not None or user_score is not None

        def score_mod(score, b, h, q_idx, kv_idx):
            n, qp, kp = q_doc[q_idx], q_pos[q_idx], k_pos[kv_idx]
            return modify_scores(
                score,
                softcap=softcap,
                bias=None if bias is None else bias[n, h, qp, kp],
                slopes=None if slopes is None else (slopes[h] if slopes.dim() == 1 else slopes[n, h]),
                score_mod=user_score,
                b=n,
                h=h,
                q=qp,
                kv=kp,
                off=offs[n],
            )

        def mask_mod(b, h, q_idx, kv_idx):
            n = q_doc[q_idx]
            same = n == k_doc[kv_idx]
            vis = visibility(
                causal=causal,
                window=window,
                mask_mod=user_mask,
                b=n,
                h=h,
                q=q_pos[q_idx],
                kv=k_pos[kv_idx],
                off=offs[n],
            )
            return same if vis is None else same & vis

        return (score_mod if has_score else None), mask_mod


BACKEND = FlexBackend()
