"""Validation: turn the arguments of ``attnkit.attention`` into one normalized :class:`AttentionCall`.

Every malformed call raises :class:`AttentionInputError` naming the argument, what was expected and what
came. Backends receive only normalized calls and never re-validate.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from attnkit._captures import captured_tensors
from attnkit._probe import check_arity, check_programmable
from attnkit.errors import AttentionInputError
from attnkit.masks import Mask, from_mask_mod
from attnkit.masks._mask import _merge_windows
from attnkit.mods import ScoreMod, from_score_mod

LAYOUTS = ("bhsd", "bshd", "thd")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttentionCall:
    """A validated attention problem. Sizes are those of the whole call; for ``thd`` ``batch`` is the
    number of sequences N and ``Sq``/``Sk`` are the longest sequence lengths."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: str
    batch: int
    Hq: int
    Hk: int
    Sq: int
    Sk: int
    D: int
    Dv: int
    scale: float
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float | None = None
    alibi_slopes: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    score_mod: ScoreMod | None = None
    mask: Mask | None = None
    block_mask: Any = None  # the torch BlockMask the caller gave, if any
    dropout_p: float = 0.0
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    seqlens_q: list[int] | None = None  # host copies for thd, when they could be read without a sync hazard
    seqlens_k: list[int] | None = None
    return_lse: bool = False
    deterministic: bool = False
    requires_grad: bool = False

    def with_tensors(self, q, k, v) -> AttentionCall:
        """This call for other q, k, v of the same signature (shapes, strides, dtypes, devices, grad flags):
        a shallow copy, without re-running ``__init__`` (host time of a repeated plain call)."""
        new = object.__new__(AttentionCall)
        new.__dict__.update(self.__dict__)
        new.q, new.k, new.v = q, k, v
        return new

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for MHA, Hq for MQA)."""
        return self.Hq // self.Hk

    @property
    def empty(self) -> bool:
        """True when there is nothing to compute (no query rows, or no keys for any query)."""
        return self.q.numel() == 0 or self.k.shape[0] == 0 or (self.layout != "thd" and self.Sk == 0)

    def features(self) -> list[str]:
        """Human-readable list of the features this call uses (for explain reports)."""
        f = [self.layout]
        if self.Hq != self.Hk:
            f.append("MQA" if self.Hk == 1 else f"GQA {self.group}:1")
        if self.Dv != self.D:
            f.append(f"D={self.D} Dv={self.Dv}")
        if self.causal:
            f.append(
                "causal" + ("" if self.Sq == self.Sk or self.layout == "thd" else " (bottom-right, Sq!=Sk)")
            )
        if self.window is not None:
            f.append(f"window={self.window}")
        for name in ("softcap", "alibi_slopes", "bias", "score_mod", "mask"):
            if getattr(self, name) is not None:
                f.append(name if name != "mask" else f"mask={self.mask.name}")
        if self.bias is not None and self.bias.requires_grad:
            f.append("bias grad")
        if self.dropout_p > 0:
            f.append(f"dropout={self.dropout_p}")
        if self.return_lse:
            f.append("return_lse")
        if self.deterministic:
            f.append("deterministic")
        if self.requires_grad:
            f.append("grad")
        return f

    def lengths(self):
        """(q_len, kv_len) to bind masks/mods: ints for dense layouts, per-sequence tensors for thd."""
        if self.layout != "thd":
            return self.Sq, self.Sk
        lq = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]
        lk = self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]
        return lq.long(), lk.long()

    def bound_mask_mod(self, q_len=None, kv_len=None):
        """The user mask as ``mask_mod(b, h, q_idx, kv_idx)`` bound to the given (or the call's) lengths."""
        if self.mask is None:
            return None
        if q_len is None:
            q_len, kv_len = self.lengths()
        return self.mask.bind(q_len, kv_len)

    def bound_score_mod(self, q_len=None, kv_len=None):
        if self.score_mod is None:
            return None
        if q_len is None:
            q_len, kv_len = self.lengths()
        return self.score_mod.bind(q_len, kv_len)


def _fail(arg, expected, got, hint=None):
    raise AttentionInputError(arg, expected, got, hint)


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return f"{type(t).__name__} {t!r}"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    """A real Python or NumPy number (not a bool, not a tensor: reading a tensor's value may sync)."""
    return type(x) in (float, int) or (isinstance(x, numbers.Real) and not isinstance(x, bool))


def _host_values_allowed(t: torch.Tensor) -> bool:
    """Reading values on the host is unsafe in CUDA-graph capture and breaks torch.compile graphs."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_broadcastable(arg: str, t: torch.Tensor, target: tuple[int, ...], names: str):
    if t.dim() > len(target):
        _fail(arg, f"a tensor broadcastable to {names} = {target}", _describe(t))
    for have, want in zip(reversed(t.shape), reversed(target)):
        if have not in (1, want):
            _fail(arg, f"a tensor broadcastable to {names} = {target}", _describe(t))


def _check_cu_seqlens(arg: str, cu: Any, total: int, device: torch.device) -> list[int] | None:
    if not isinstance(cu, torch.Tensor):
        _fail(arg, "an int32 tensor of shape (N+1,)", _describe(cu))
    if cu.dtype != torch.int32:
        _fail(arg, "dtype torch.int32", _describe(cu), f"pass {arg}.to(torch.int32)")
    if cu.dim() != 1 or cu.shape[0] < 2:
        _fail(arg, "a 1-D tensor of N+1 >= 2 offsets", _describe(cu))
    if cu.device != device:
        _fail(arg, f"a tensor on the device of q ({device})", _describe(cu))
    if not _host_values_allowed(cu):
        return None
    vals = cu.tolist()
    if vals[0] != 0:
        _fail(arg, "offsets starting at 0", f"first offset {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        _fail(arg, "non-decreasing offsets", f"{vals[:16]}{' ...' if len(vals) > 16 else ''}")
    if vals[-1] != total:
        _fail(arg, f"a last offset equal to the number of packed rows ({total})", f"last offset {vals[-1]}")
    return [b - a for a, b in zip(vals, vals[1:])]


def _check_tensors(q, k, v, layout: str, rank: int):
    """Raise for the first of q, k, v with the wrong rank or dtype, or a device or dtype other than q's."""
    shape_txt = {"bhsd": "(B, H, S, D)", "bshd": "(B, S, H, D)", "thd": "(T, H, D)"}[layout]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            _fail(name, f"a {rank}-D tensor {shape_txt} for layout={layout!r}", _describe(t))
        if t.dtype not in DTYPES:
            _fail(name, "dtype float16, bfloat16, float32 or float64", _describe(t))
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            _fail(name, f"a tensor on the device of q ({q.device})", _describe(t))
        if t.dtype != q.dtype:
            _fail(name, f"dtype {q.dtype} (the dtype of q)", _describe(t), "cast q, k and v to one dtype")


def _captures_grad(obj) -> bool:
    """Whether ``obj`` is, or captures, a tensor that requires grad (see :func:`captured_tensors`)."""
    return any(t.requires_grad for t in captured_tensors(obj))


# Each validator below tests the well-formed case in one expression and only then looks for the culprit:
# attention() pays this on every call, and short sequences wait on the host.


def _validate_tensors(q, k, v, layout: str) -> tuple:
    """q, k, v against the layout and each other. Returns (B, Hq, Hk, Sq, Sk, D, Dv), where for ``thd``
    B is None and Sq, Sk are the packed row counts Tq, Tk."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                _fail(name, "a torch.Tensor", _describe(t))
    if layout not in LAYOUTS:
        _fail("layout", f"one of {LAYOUTS}", repr(layout))
    rank = 3 if layout == "thd" else 4
    device, dtype = q.device, q.dtype
    if not (
        q.dim() == rank
        and k.dim() == rank
        and v.dim() == rank
        and dtype in DTYPES
        and k.dtype == dtype
        and v.dtype == dtype
        and k.device == device
        and v.device == device
    ):
        _check_tensors(q, k, v, layout, rank)

    if layout == "bhsd":
        (B, Hq, Sq, D), (Bk, Hk, Sk, Dk), (Bv, Hv, Sv, Dv) = q.shape, k.shape, v.shape
    elif layout == "bshd":
        (B, Sq, Hq, D), (Bk, Sk, Hk, Dk), (Bv, Sv, Hv, Dv) = q.shape, k.shape, v.shape
    else:
        (Sq, Hq, D), (Sk, Hk, Dk), (Sv, Hv, Dv) = q.shape, k.shape, v.shape
        B = Bk = Bv = None
    if layout != "thd":
        if Bk != B:
            _fail("k", f"batch size {B} (the batch of q)", _describe(k))
        if Bv != B:
            _fail("v", f"batch size {B} (the batch of q)", _describe(v))
    if Sv != Sk:
        _fail("v", f"{Sk} key rows (as many as k)", _describe(v))
    if Hv != Hk:
        _fail("v", f"{Hk} heads (the heads of k)", _describe(v))
    if Dk != D:
        _fail("k", f"head dim {D} (the head dim of q)", _describe(k))
    if D == 0 or Dv == 0:
        _fail("q" if D == 0 else "v", "a head dim > 0", _describe(q if D == 0 else v))
    if Hq == 0 or Hk == 0 or Hq % Hk != 0:
        _fail(
            "k",
            f"a number of heads dividing the {Hq} query heads (GQA/MQA)",
            _describe(k),
            "query head h reads key/value head h // (Hq // Hk)",
        )
    return B, Hq, Hk, Sq, Sk, D, Dv


def _validate_packed(layout, B, Tq, Tk, device, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The packed-sequence arguments. Returns (B, Sq, Sk, seqlens_q, seqlens_k): for ``thd`` B is the
    number of sequences N and Sq, Sk the longest lengths; elsewhere B, Tq, Tk pass through."""
    if layout != "thd":
        if not (
            cu_seqlens_q is None and cu_seqlens_k is None and max_seqlen_q is None and max_seqlen_k is None
        ):
            for arg, val in (
                ("cu_seqlens_q", cu_seqlens_q),
                ("cu_seqlens_k", cu_seqlens_k),
                ("max_seqlen_q", max_seqlen_q),
                ("max_seqlen_k", max_seqlen_k),
            ):
                if val is not None:
                    _fail(arg, "None unless layout='thd'", _describe(val))
        return B, Tq, Tk, None, None
    if cu_seqlens_q is None:
        _fail("cu_seqlens_q", "an int32 tensor (N+1,) for layout='thd'", "None")
    if cu_seqlens_k is None:
        _fail(
            "cu_seqlens_k",
            "an int32 tensor (N+1,) for layout='thd'",
            "None",
            "for self-attention pass the same tensor as cu_seqlens_q",
        )
    seqlens_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, Tq, device)
    seqlens_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, Tk, device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        _fail(
            "cu_seqlens_k",
            f"the same number of sequences as cu_seqlens_q ({cu_seqlens_q.shape[0] - 1})",
            _describe(cu_seqlens_k),
        )
    for arg, given, lens in (
        ("max_seqlen_q", max_seqlen_q, seqlens_q),
        ("max_seqlen_k", max_seqlen_k, seqlens_k),
    ):
        if given is not None and (not _is_int(given) or given < 0):
            _fail(arg, "None or an int >= 0", repr(given))
        if given is not None and lens is not None and given < max(lens):
            _fail(arg, f"at least the longest sequence ({max(lens)})", repr(given))
    if seqlens_q is not None:
        Sq = max(seqlens_q) if max_seqlen_q is None else max_seqlen_q
        Sk = max(seqlens_k) if max_seqlen_k is None else max_seqlen_k
    else:  # under compile / graph capture: trust the caller's bounds, else the whole packed length
        Sq = max_seqlen_q if max_seqlen_q is not None else Tq
        Sk = max_seqlen_k if max_seqlen_k is not None else Tk
    return cu_seqlens_q.shape[0] - 1, Sq, Sk, seqlens_q, seqlens_k


def _validate_flags(causal, return_lse, deterministic, window, softcap, scale, dropout_p, D) -> tuple:
    """The flags and numbers. Returns (window, softcap, scale, dropout_p) normalized: window a tuple or
    None, numbers as Python floats (``scale`` defaulting to 1/sqrt(D)).

    Numbers may be Python or NumPy reals; tensors are refused (their value would be read on the host, a
    device sync on every call): pass ``float(t)``."""
    if not (isinstance(causal, bool) and isinstance(return_lse, bool) and isinstance(deterministic, bool)):
        for arg, val in (("causal", causal), ("return_lse", return_lse), ("deterministic", deterministic)):
            if not isinstance(val, bool):
                _fail(arg, "a bool", repr(val))
    if window is not None:
        if (
            not isinstance(window, (tuple, list))
            or len(window) != 2
            or not all(_is_int(w) and w >= -1 for w in window)
        ):
            _fail("window", "None or (left, right) with ints >= -1 (-1 = unbounded)", repr(window))
        window = (int(window[0]), int(window[1]))
        if window == (-1, -1):
            window = None
    if softcap is not None and (not _is_number(softcap) or not math.isfinite(softcap) or softcap <= 0):
        _fail("softcap", "None or a finite float > 0", _describe(softcap), _NUMBER_HINT)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not _is_number(scale) or not math.isfinite(scale):
        _fail("scale", "None or a finite float (a Python or NumPy number)", _describe(scale), _NUMBER_HINT)
    if not _is_number(dropout_p) or not 0.0 <= dropout_p < 1.0:
        _fail("dropout_p", "a float in [0, 1)", _describe(dropout_p), _NUMBER_HINT)
    return window, None if softcap is None else float(softcap), float(scale), float(dropout_p)


_NUMBER_HINT = "a tensor is not accepted (reading its value would sync the device): pass float(x)"


def _validate_additive(alibi_slopes, bias, layout, B, Hq, Sq, Sk, device):
    """ALiBi slopes ((Hq,) or (B, Hq) float32) and the additive bias (broadcastable to (B, Hq, Sq, Sk))."""
    batch_name = "N" if layout == "thd" else "B"
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            _fail(
                "alibi_slopes", f"a float32 tensor ({Hq},) or ({batch_name}, {Hq})", _describe(alibi_slopes)
            )
        if alibi_slopes.shape not in ((Hq,), (B, Hq)):
            _fail("alibi_slopes", f"shape ({Hq},) or ({B}, {Hq})", _describe(alibi_slopes))
        if alibi_slopes.device != device:
            _fail("alibi_slopes", f"a tensor on the device of q ({device})", _describe(alibi_slopes))
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            _fail("bias", "a floating-point tensor (use mask= for boolean masks)", _describe(bias))
        if bias.device != device:
            _fail("bias", f"a tensor on the device of q ({device})", _describe(bias))
        _check_broadcastable("bias", bias, (B, Hq, Sq, Sk), f"({batch_name}, Hq, Sq, Sk)")


def _validate_programmable(score_mod, mask, causal, window, device) -> tuple:
    """score_mod and mask: types and arity (FlexAttention's 5 and 4 arguments), wrapped as ScoreMod and
    Mask; masks expressible by the flags become flags. Returns (score_mod, mask, block_mask, causal,
    window). Checks against the call's sizes follow in :func:`attnkit._probe.check_programmable`."""
    block_mask = None
    if score_mod is not None:
        if not callable(score_mod):
            _fail(
                "score_mod", "None or a callable(score, b, h, q_idx, kv_idx) -> score", _describe(score_mod)
            )
        if not isinstance(score_mod, ScoreMod):
            check_arity("score_mod", score_mod, 5, "(score, b, h, q_idx, kv_idx) -> score")
        score_mod = from_score_mod(score_mod)
    if mask is not None:
        if type(mask).__name__ == "BlockMask" and hasattr(mask, "mask_mod"):
            block_mask = mask
            mask = from_mask_mod(mask.mask_mod, "BlockMask.mask_mod")
        elif not callable(mask):
            _fail(
                "mask",
                "None, an attnkit.masks.Mask, a mask_mod callable or a torch BlockMask",
                _describe(mask),
            )
        if not isinstance(mask, Mask):
            check_arity("mask", mask, 4, "(b, h, q_idx, kv_idx) -> bool")
            mask = from_mask_mod(mask)
        if mask.native is not None:  # expressible through the flags: let every backend see it that way
            causal = causal or mask.native.get("causal", False)
            w = mask.native.get("window")
            if w is not None:
                window = w if window is None else _merge_windows(window, w)
                window = None if window == (-1, -1) else window
            mask = None

    for arg, obj in (("mask", mask), ("score_mod", score_mod)):
        if obj is None:
            continue
        for t in captured_tensors(getattr(obj, "source", obj)):
            if t.device != device and t.dim() > 0:
                _fail(
                    arg,
                    f"a callable whose captured tensors live on the device of q ({device})",
                    f"one capturing a tensor of shape {tuple(t.shape)} on {t.device}",
                    f"create it on {device} (e.g. doc_ids.to(q.device))",
                )
    return score_mod, mask, block_mask, causal, window


def _requires_grad(q, k, v, bias, score_mod, mask, alibi_slopes) -> bool:
    """Whether the call needs a backward: an input, the bias, or a tensor a mod or mask captures."""
    grad_enabled = torch.is_grad_enabled()
    requires_grad = grad_enabled and (
        q.requires_grad or k.requires_grad or v.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not requires_grad and grad_enabled:
        # A learnable tensor captured by score_mod (or by a mask) needs a backend with a backward too.
        requires_grad = _captures_grad(score_mod) or _captures_grad(mask) or _captures_grad(alibi_slopes)
    return requires_grad


def normalize(
    q,
    k,
    v,
    *,
    layout="bhsd",
    causal=False,
    window=None,
    softcap=None,
    alibi_slopes=None,
    bias=None,
    score_mod=None,
    mask=None,
    scale=None,
    dropout_p=0.0,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    return_lse=False,
    deterministic=False,
) -> AttentionCall:
    """Validate every argument of ``attnkit.attention`` (same names and defaults) and return the call."""
    B, Hq, Hk, Tq, Tk, D, Dv = _validate_tensors(q, k, v, layout)
    B, Sq, Sk, seqlens_q, seqlens_k = _validate_packed(
        layout, B, Tq, Tk, q.device, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
    )
    window, softcap, scale, dropout_p = _validate_flags(
        causal, return_lse, deterministic, window, softcap, scale, dropout_p, D
    )
    _validate_additive(alibi_slopes, bias, layout, B, Hq, Sq, Sk, q.device)
    score_mod, mask, block_mask, causal, window = _validate_programmable(
        score_mod, mask, causal, window, q.device
    )
    call = AttentionCall(
        q=q,
        k=k,
        v=v,
        layout=layout,
        batch=B,
        Hq=Hq,
        Hk=Hk,
        Sq=Sq,
        Sk=Sk,
        D=D,
        Dv=Dv,
        scale=scale,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        bias=bias,
        score_mod=score_mod,
        mask=mask,
        block_mask=block_mask,
        dropout_p=dropout_p,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        seqlens_q=seqlens_q,
        seqlens_k=seqlens_k,
        return_lse=return_lse,
        deterministic=deterministic,
        requires_grad=_requires_grad(q, k, v, bias, score_mod, mask, alibi_slopes),
    )
    if mask is not None or score_mod is not None:
        check_programmable(call)
    return call
