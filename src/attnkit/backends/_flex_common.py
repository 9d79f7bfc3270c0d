"""FlexAttention lowering shared by the ``flex`` and ``flex_flash`` backends (which never import each other).

``dense_mods`` / ``packed_mods`` turn a call's softcap, bias, ALiBi and score_mod into one FlexAttention
``score_mod``, and causal, window and mask into one ``mask_mod``; ``block_mask`` builds (and caches) the
``BlockMask``; ``inputs`` / ``outputs`` convert between attnkit's layouts and FlexAttention's (B, H, S, D)
(``thd`` runs as one packed sequence, B=1, whose mask keeps documents apart); ``call_flex`` runs it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections import OrderedDict

import torch

from attnkit import _compile
from attnkit._call import AttentionCall
from attnkit._captures import captured_tensors
from attnkit._semantics import modify_scores, visibility
from attnkit.backends.base import to_bhsd

_BLOCK_CACHE: OrderedDict = OrderedDict()
_BLOCK_CACHE_SIZE = 32
# a user ScoreMod / Mask -> why FlexAttention cannot vmap it, or None
_VMAP_REFUSALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def flex_module():
    from torch.nn.attention import flex_attention as fa

    return fa


@functools.cache
def compiled_flex():
    return torch.compile(flex_module().flex_attention)


def recompile_headroom(dynamic: bool = True):
    """Each distinct set of mods (and, for static compiles, each shape) is its own compiled kernel; past
    dynamo's default limit of 8 variants torch would silently run flex_attention eagerly (unfused).
    Allow more variants for our calls, and turn automatic dynamic shapes on or off."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: max(getattr(cfg, name), 256), "automatic_dynamic_shapes": dynamic})


def eager_backward(on: bool):
    """AOTAutograd lowers (compiles) the backward with the forward inside the block when ``on``."""
    import torch._functorch.config as cfg

    if not on or not hasattr(cfg, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return cfg.patch(force_non_lazy_backward_lowering=True)


def vmap_refusals(call: AttentionCall) -> list[str]:
    """Why FlexAttention cannot run the call's user-written ``score_mod`` / ``mask_mod`` callables: it applies
    them under ``torch.vmap`` over (b, h, q_idx, kv_idx), one score at a time, where a data-dependent Python
    branch or a value read (``if score.max() > 0``, ``.item()``) fails; without this check the call itself
    would raise. Each callable is tried once (remembered while it lives), on one score on the call's
    device; library mods and masks need no try."""
    if torch.compiler.is_compiling():
        return []
    reasons = []
    for what, obj in _user_callables(call):
        if obj not in _VMAP_REFUSALS:
            _VMAP_REFUSALS[obj] = _vmap_refusal(what, obj.source, call.device)
        if _VMAP_REFUSALS[obj] is not None:
            reasons.append(_VMAP_REFUSALS[obj])
    return reasons


def _user_callables(call: AttentionCall):
    """(argument name, ScoreMod/Mask) for each wrapped user callable in the call's score_mod and mask."""
    todo = [("score_mod", call.score_mod), ("mask", call.mask)]
    while todo:
        what, m = todo.pop()
        if m is None:
            continue
        if m.kind in ("score_mod", "mask_mod") and callable(m.source) and m.source is not m:
            yield what, m
        todo.extend((what, p) for p in m.parts)


def _vmap_refusal(what: str, fn, device) -> str | None:
    from attnkit.compiler.trace import source_line

    lead = 1 if what == "score_mod" else 0  # (the score comes first)
    f = fn
    for pos in (3, 2, 1, 0):  # kv_idx innermost, b outermost, as FlexAttention nests them
        dims = [0] * lead + [None] * 4
        dims[lead + pos] = 0
        f = torch.vmap(f, in_dims=tuple(dims))
    idx = torch.zeros(1, dtype=torch.int32, device=device)
    args = [torch.zeros(1, 1, 1, 1, device=device)] * lead + [idx] * 4
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f(*args)
    except Exception as e:  # noqa: BLE001 (any failure under vmap is the reason)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return (
            f"FlexAttention runs {what} one score at a time under torch.vmap, where it fails "
            f"({type(e).__name__}: {first}) at {source_line(fn, e.__traceback__)}"
        )
    return None


def call_flex(fn, q, k, v, return_lse: bool, kwargs: dict, dynamic: bool = True):
    """fn(q, k, v, **kwargs) -> (out, lse or None); q (B, Hq, Sq, D), k (B, Hk, Sk, D), v (B, Hk, Sk, Dv).
    With gradients on, the backward kernel is compiled now rather than at the first ``backward()``, so that
    a backward whose tiles do not fit fails inside this call, where the backends retry with smaller tiles
    (H200, bf16 D=128, a learnable T5 bias: "No valid triton configs. ... out of resource" at backward)."""
    fa = flex_module()
    # (compile_count(): the torch.compile graphs these calls compile are attnkit's)
    backward = eager_backward(torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
    with warnings.catch_warnings(), recompile_headroom(dynamic), _compile.counting_dynamo(), backward:
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        if not return_lse:
            return fn(q, k, v, **kwargs), None
        if hasattr(fa, "AuxRequest"):
            out, aux = fn(q, k, v, return_aux=fa.AuxRequest(lse=True), **kwargs)
            return out, aux.lse
        return fn(q, k, v, return_lse=True, **kwargs)


def inputs(call: AttentionCall):
    """(q, k, v, score_mod, mask_mod, B, Q, K): q/k/v as (B, H, S, D) views (thd: (1, H, T, D)); detached
    when no gradient is wanted (under no_grad, inputs that require grad made FlexAttention on the CPU raise
    "does not support backward on CPU")."""
    qkv = (call.q, call.k, call.v)
    if not call.requires_grad:
        qkv = tuple(t.detach() for t in qkv)
    if call.layout == "thd":
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv)  # (1, H, T, D)
        score_mod, mask_mod = packed_mods(call)
        return q, k, v, score_mod, mask_mod, 1, q.shape[2], k.shape[2]
    q, k, v = (to_bhsd(t, call.layout) for t in qkv)
    score_mod, mask_mod = dense_mods(call)
    return q, k, v, score_mod, mask_mod, call.batch, call.Sq, call.Sk


def outputs(call: AttentionCall, out: torch.Tensor, lse):
    """FlexAttention's out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) back in the call's layout (lse float32)."""
    if call.layout == "thd":
        out = out[0].transpose(0, 1)
        lse = None if lse is None else lse[0]
    elif call.layout == "bshd":
        out = out.transpose(1, 2)
    return out, (None if lse is None else lse.float())


def mask_block_density(call: AttentionCall) -> float | None:
    """Fraction of (query block, key block) pairs a user mask leaves visible, read off the call's cached
    BlockMask; None if not known (no mask, thd, compile, or no BlockMask built for it yet: an estimate does
    not build one, which takes milliseconds, see :func:`block_mask_seconds`)."""
    if (
        call.mask is None
        or call.layout == "thd"
        or call.device.type != "cuda"
        or torch.compiler.is_compiling()
    ):
        return None
    key = _block_key(call, call.batch, call.Sq, call.Sk)
    if key is None or key not in _BLOCK_CACHE:
        return None
    if key in _DENSITY:
        return _DENSITY[key]
    bm = _BLOCK_CACHE[key][1]
    visible = bm.kv_num_blocks.sum() + (0 if bm.full_kv_num_blocks is None else bm.full_kv_num_blocks.sum())
    total = bm.kv_num_blocks.numel() * -(-call.Sk // bm.BLOCK_SIZE[1])
    if len(_DENSITY) > _BLOCK_CACHE_SIZE:
        _DENSITY.clear()
    _DENSITY[key] = float(visible) / max(total, 1)  # (one host read per BlockMask, not per call)
    return _DENSITY[key]


_DENSITY: dict = {}

# What the flex kernels ran over a mask's visible blocks (dense FLOPs x block density per second, forward and
# forward+backward) by the mask's data kind (``Mask.kind_of_data``). H200, bf16, B=2 H=16 S=8k D=128, run E
# (2026-12-02 23:24 UTC, docs/results/2026-12-02-h200-e/masks.csv): flex (Triton) documents 0.503 / 1.733 ms
# at block density 0.139, prefix-LM 1.485 / 5.359 at 0.537, shared prefix 0.843 / 3.120 at 0.297,
# global+window 0.663 / 2.220 at 0.161; FLASH 0.553 / 1.875, 0.991 / 3.761, 0.864 / 2.311, 0.466 / 1.729.
# One rate per backend did not fit: FLASH ran prefix-LM at 2.2x its document rate.
BLOCK_RATES = {
    "flex": {
        "document": (305e12, 310e12),
        "prefix_lm": (398e12, 386e12),
        "shared_prefix": (387e12, 366e12),
        "global_sliding": (267e12, 278e12),
    },
    "flex_flash": {
        "document": (277e12, 286e12),
        "prefix_lm": (596e12, 550e12),
        "shared_prefix": (378e12, 494e12),
        "global_sliding": (379e12, 358e12),
    },
}


def block_rate(backend: str, call: AttentionCall) -> float | None:
    """``BLOCK_RATES``' rate of the call's mask for ``backend`` (None: not measured for its kind, dtype or
    device, or with score mods besides the mask)."""
    mods = (call.softcap, call.score_mod, call.bias, call.alibi_slopes)
    if call.mask is None or call.device.type != "cuda" or any(m is not None for m in mods):
        return None
    if call.dtype not in (torch.bfloat16, torch.float16):
        return None
    rates = BLOCK_RATES[backend].get(call.mask.kind_of_data())
    return None if rates is None else rates[1 if call.requires_grad else 0]


def _block_key(call: AttentionCall, B: int, Q: int, K: int):
    """The BlockMask cache's key for a call (None: never cached). Block structure is cached per shape for
    causal/window, and per mask object for user masks: the key holds the mask's identity and the in-place
    version of every tensor it captures, so editing doc ids in place, or passing a new mask, builds a new
    BlockMask. thd masks depend on cu_seqlens."""
    if call.layout == "thd" or torch.compiler.is_compiling():
        return None
    if call.mask is None:
        return (call.device, Q, K, call.causal, call.window)
    src = getattr(call.mask, "source", call.mask)
    versions = tuple((id(t), t._version) for t in captured_tensors(src))
    return (call.device, B, call.Hq, Q, K, call.causal, call.window, id(src), versions)


def block_mask_seconds(call: AttentionCall) -> float:
    """What building this call's BlockMask costs where none is cached for it (a new mask, a new packing, any
    thd call), else 0. Measured on the H200 (2026-12-02 run C, ``attnkit bench masks``: a causal document
    mask, B=1 H=1): ``create_block_mask`` 8.2 ms at 8k tokens, 11.1 ms at 32k, eager and compiled alike, out
    of memory at 128k; fit: 8 ms + 1 s per 3.5e11 mask elements (B and H count where the mask is per b, h,
    as attnkit builds user masks)."""
    if call.mask is None and call.layout != "thd":
        return 0.0
    Q, K = (call.q.shape[0], call.k.shape[0]) if call.layout == "thd" else (call.Sq, call.Sk)
    B = 1 if call.layout == "thd" else call.batch
    key = _block_key(call, B, Q, K)
    if key is not None and key in _BLOCK_CACHE:
        return 0.0
    return 8e-3 + B * call.Hq * Q * K / 3.5e11


def block_mask(call: AttentionCall, mask_mod, B: int, Q: int, K: int):
    """The BlockMask of ``mask_mod`` over (B, Hq, Q, K), cached (see inside); None without a mask."""
    if mask_mod is None:
        return None
    fa = flex_module()
    if call.block_mask is not None and not call.causal and call.window is None and call.layout != "thd":
        bm = call.block_mask  # the caller's own BlockMask, when it fits this call, keeps its sparsity
        if tuple(bm.seq_lengths) == (Q, K) and bm.shape[0] in (1, B) and bm.shape[1] in (1, call.Hq):
            return bm
    key = _block_key(call, B, Q, K)
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


def dense_mods(call: AttentionCall):
    """(score_mod, mask_mod) for a bhsd/bshd call: softcap, bias, ALiBi and the user's mod as one score_mod;
    causal, window and the user's mask as one mask_mod (None where there is nothing to do)."""
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


def packed_mods(call: AttentionCall):
    """Mods over one packed sequence: map packed rows to (sequence, position inside it)."""
    dev = call.device
    cq, ck = call.cu_seqlens_q.long(), call.cu_seqlens_k.long()
    lq_t, lk_t = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    # Sequence of every packed row, found on the device (no host sync: traceable, graph-capturable).
    q_doc = torch.searchsorted(cq[1:], torch.arange(call.q.shape[0], device=dev), right=True)
    k_doc = torch.searchsorted(ck[1:], torch.arange(call.k.shape[0], device=dev), right=True)
    q_pos = torch.arange(call.q.shape[0], device=dev) - cq[q_doc]
    k_pos = torch.arange(call.k.shape[0], device=dev) - ck[k_doc]
    # Each query row's own bottom-right offset, so that the mods capture only per-row tensors (sizes Tq, Tk):
    # a per-sequence tensor (size = number of sequences) in the closure made every new number of sequences
    # a new guard failure, i.e. a recompile of flex_attention and of create_block_mask (H200, 2026-12-02).
    q_off = (lk_t - lq_t)[q_doc]
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
            off=q_off[q_idx],
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
            off=q_off[q_idx],
        )
        return same if vis is None else same & vis

    return (score_mod if has_score else None), mask_mod
