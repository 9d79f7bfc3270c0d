"""One parameter object per op of the Triton backend: the forward's and the backward's arguments, spelled out
once here.

Everything that used to repeat the argument lists is derived from these dataclasses: the ``torch.library``
custom ops' signatures (:func:`op`), their fake implementations, what autograd saves between the two
(:func:`saved` / :func:`restore`), the replay keys (:meth:`FwdParams.replay_key`), the kernels' feature
constexprs and the tuning key (:meth:`FwdParams.flags`). Adding an argument to the forward is one field of
:class:`FwdParams` (the backward inherits it, autograd saves it, the ops' schemas grow it), plus, if it
switches a kernel feature, one entry of :meth:`FwdParams.flags`.

Shapes (layouts as in ``attnkit.attention``; ``thd`` has no batch dim, lengths from ``cu_seqlens``):
    q (B, Hq, Sq, D) | (B, Sq, Hq, D) | (Tq, Hq, D); k (.., Hk, .., D); v (.., Hk, .., Dv), each with a unit
    stride on the last dim or made so; bias broadcastable to (B, Hq, Sq, Sk); alibi_slopes float32 (Hq,) or
    (B, Hq); cu_seqlens_q / cu_seqlens_k int32 (B + 1,) for ``thd``, else None.
    Backward only: dout like the forward's out (q's shape with Dv); out the forward's output; stats float32
    (2, *lse.shape) (the log2 row statistic as hi + lo); dlse like lse (B, Hq, Sq) | (Hq, Tq), or None;
    rng int64 (2,) the dropout state.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
import typing
from dataclasses import dataclass

import torch

from attnkit.backends.triton.runtime.capability import plain_features

Tensor = torch.Tensor


@dataclass(slots=True)
class FwdParams:
    """The forward op's arguments (``attnkit::triton_fwd``). Windows are ``window_left`` / ``window_right``
    (-1 = unbounded), causal separately; ``softcap`` 0 means none; ``max_seqlen_*`` are Sq, Sk (for
    ``thd``: the longest sequence, or more). ``deterministic`` is not read by the forward: autograd hands it
    to the backward."""

    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None
    alibi_slopes: Tensor | None
    cu_seqlens_q: Tensor | None
    cu_seqlens_k: Tensor | None
    layout: str
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    dropout_p: float
    deterministic: bool
    # a mask carried as data (``attnkit.masks._intervals``): int32 (B', H', K, 4) masked row intervals per
    # key column and their (B', H', ceil(K / 16), 8) summary, or None
    startend: Tensor | None
    iv_summary: Tensor | None
    iv_skip: bool  # the mask can leave empty key tiles inside a row's range: skip them by a branch
    iv_band: bool  # the mask's visible keys are a band along the diagonal (``Intervals.band``)
    # a compiled score_mod (``attnkit.compiler``): its generated function's key ("" = none), the tensors it
    # captured (up to 4, any strides; None past their count) and their int64 (4, 8) strides/sizes table
    score_mod: str
    smod_c0: Tensor | None
    smod_c1: Tensor | None
    smod_c2: Tensor | None
    smod_c3: Tensor | None
    smod_meta: Tensor | None

    def args(self) -> tuple:
        """The op's positional arguments, in field order."""
        if torch.compiler.is_compiling():  # (dynamo does not trace attrgetter)
            return tuple([getattr(self, n) for n in _NAMES[type(self)]])
        return _GET[type(self)](self)

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return _NAMES[cls]

    @classmethod
    def tensor_names(cls) -> tuple[str, ...]:
        """The fields that hold tensors (or None), in order."""
        return _TENSORS[cls]

    def plain(self) -> bool:
        """A plain call: no bias, ALiBi, softcap, window or dropout (causal is fine), and nonempty q, k.
        The one definition the launchers and the Gluon paths use (``backend.py`` asks the same of an
        ``AttentionCall`` through :func:`attnkit.backends.triton.runtime.capability.plain_call`)."""
        return plain_features(
            self.bias, self.alibi_slopes, self.softcap, self.window_left, self.window_right, self.dropout_p
        ) and (self.q.numel() > 0 and self.k.numel() > 0 and self.startend is None and not self.score_mod)

    def data_mask_only(self) -> bool:
        """A mask carried as data (``startend``) and the causal / window flags, nothing else (no bias, ALiBi,
        softcap, dropout or score mod), nonempty q, k: what the Gluon forward runs on tile lists."""
        return plain_features(self.bias, self.alibi_slopes, self.softcap, -1, -1, self.dropout_p) and (
            self.q.numel() > 0 and self.k.numel() > 0 and self.startend is not None and not self.score_mod
        )

    def window(self) -> tuple[bool, bool, int, int]:
        """(HAS_LEFT, HAS_RIGHT, left, right) with causal folded into the right bound."""
        wl, wr = self.window_left, self.window_right
        has_left = wl >= 0
        if self.causal:
            return has_left, True, max(wl, 0), (min(wr, 0) if wr >= 0 else 0)
        return has_left, wr >= 0, max(wl, 0), max(wr, 0)

    def flags(self) -> dict[str, bool]:
        """The feature constexprs every kernel of the op takes; their values (in this order) are also the
        tuning key's feature part."""
        has_left, has_right, _, _ = self.window()
        return {
            "VARLEN": self.layout == "thd",
            "SOFTCAP": self.softcap > 0,
            "HAS_BIAS": self.bias is not None,
            "HAS_ALIBI": self.alibi_slopes is not None,
            "HAS_LEFT": has_left,
            "HAS_RIGHT": has_right,
            "DROPOUT": self.dropout_p > 0,
            "HAS_IV": self.startend is not None,
            "IV_SKIP": self.startend is not None and _iv_skip(self.iv_skip),
            "IV_BODY": self.startend is not None and _iv_body(),
            "HAS_SCORE_MOD": bool(self.score_mod),
        }

    @staticmethod
    def tune_key(flags: dict) -> tuple:
        """The tuning key's feature part: the flags' values, the interval and score-mod flags only where a
        mask is carried or a mod compiled (so that tuned caches of other calls stay valid)."""
        key = tuple([v for n, v in flags.items() if n not in _UNKEYED])
        key = key + (True,) if flags.get("HAS_IV") else key
        return key + ("score_mod",) if flags.get("HAS_SCORE_MOD") else key

    def replay_key(self, kind: str) -> tuple:
        """What a call's launches depend on besides its tensors' addresses, as far as the arguments go:
        each tensor's shape, strides, dtype and address mod 16 (Triton specializes on 16-byte alignment),
        which tensors are one object, and every other argument."""
        tensors = _GET_TENSORS[type(self)](self)
        sig = tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() & 15) for t in
                     tensors])  # fmt: skip
        first: dict = {}  # which tensors are one object (cu_seqlens_q is cu_seqlens_k, q is k): first index
        same = tuple([first.setdefault(id(t), i) for i, t in enumerate(tensors) if t is not None])
        return (kind, sig, same, _GET_SCALARS[type(self)](self))


@dataclass(slots=True)
class BwdParams(FwdParams):
    """The backward op's arguments (``attnkit::triton_bwd``): the forward's, then what the forward gave
    (``out``, ``stats``, ``rng``), the incoming gradients (``dout``, ``dlse``) and whether the bias wants
    its gradient."""

    dout: Tensor
    out: Tensor
    stats: Tensor
    dlse: Tensor | None
    rng: Tensor
    bias_grad: bool
    smod_grad: int  # bit i: the score mod's captured tensor i wants its gradient

    def flags(self) -> dict[str, bool]:
        """The forward's feature constexprs and ``BIAS_GRAD`` (the dK/dV kernel's alone)."""
        f = FwdParams.flags(self)
        grad = self.bias_grad and self.bias is not None
        # (BIAS_GRAD after HAS_BIAS: the tuning key's order since version 4, so tuned caches stay valid)
        out = {}
        for name, value in f.items():
            out[name] = value
            if name == "HAS_BIAS":
                out["BIAS_GRAD"] = grad
        return out

    def forward(self) -> FwdParams:
        return FwdParams(*_GET[FwdParams](self))


_UNKEYED = ("HAS_IV", "IV_SKIP", "IV_BODY", "HAS_SCORE_MOD")  # (tune_key: one flag for these, or none)


def _iv_skip(holes: bool) -> bool:
    """Masks as data: skip the empty key tiles inside a row's narrowed range by a branch around every key
    tile, where the mask can leave such tiles (``holes``: ``masks._intervals._HOLES``, measured there);
    elsewhere no branch, so the software pipeline stays (empty tiles at the ends of a row's range are cut
    off either way). ``ATTNKIT_TRITON_IV_SKIP=1`` / ``=0`` forces it on / off for A/B runs on the GPU."""
    import os

    forced = os.environ.get("ATTNKIT_TRITON_IV_SKIP", "")
    return holes if forced == "" else forced != "0"


def _iv_body() -> bool:
    """Masks as data: ``ATTNKIT_TRITON_IV_BODY=1`` (the default) runs the last run of tiles that the mask
    leaves full for a whole tile as the plain body (no mask, no interval classification or loads:
    ``kernels/common.iv_full_run``); ``0`` classifies every tile of the range. For A/B runs on the GPU."""
    import os

    return os.environ.get("ATTNKIT_TRITON_IV_BODY", "1") not in ("", "0")


def _is_tensor(annotation) -> bool:
    return annotation in (Tensor, Tensor | None)


_NAMES: dict = {}
_TENSORS: dict = {}
_SCALARS: dict = {}
_GET: dict = {}  # class -> a C-speed getter of its fields' values, as a tuple (host time: every call asks)
_GET_TENSORS: dict = {}
_GET_SCALARS: dict = {}
for _cls in (FwdParams, BwdParams):
    _hints = typing.get_type_hints(_cls, {"Tensor": Tensor})
    _NAMES[_cls] = tuple(f.name for f in dataclasses.fields(_cls))
    _TENSORS[_cls] = tuple(n for n in _NAMES[_cls] if _is_tensor(_hints[n]))
    _SCALARS[_cls] = tuple(n for n in _NAMES[_cls] if not _is_tensor(_hints[n]))
    _GET[_cls] = operator.attrgetter(*_NAMES[_cls])
    _GET_TENSORS[_cls] = operator.attrgetter(*_TENSORS[_cls])
    _GET_SCALARS[_cls] = operator.attrgetter(*_SCALARS[_cls])


def op(name: str, cls, impl, fake, n_out: int = 4):
    """The ``torch.library`` custom op ``name`` whose arguments are ``cls``'s fields (schema inferred from
    their annotations), running ``impl(cls(*args))``, with ``fake(cls(*args))`` as its fake implementation;
    it returns ``n_out`` tensors. Returns the op."""
    hints = typing.get_type_hints(cls, {"Tensor": Tensor})
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[n]) for n in
              _NAMES[cls]]  # fmt: skip

    def run(*args, **kwargs):
        return impl(cls(*args, **kwargs))

    def run_fake(*args, **kwargs):
        return fake(cls(*args, **kwargs))

    returns = tuple[(Tensor,) * n_out]
    for fn in (run, run_fake):
        fn.__signature__ = inspect.Signature(params, return_annotation=returns)
        fn.__annotations__ = {**{n: hints[n] for n in _NAMES[cls]}, "return": returns}
    custom = torch.library.custom_op(name, mutates_args=())(run)
    custom.register_fake(run_fake)
    return custom


def saved(p: FwdParams, out: Tensor, stats: Tensor, rng: Tensor) -> tuple[tuple, tuple]:
    """What autograd keeps of a forward: (tensors for ``save_for_backward``, the other arguments)."""
    return _GET_TENSORS[FwdParams](p) + (out, stats, rng), _GET_SCALARS[FwdParams](p)


def restore(tensors: tuple, scalars: tuple, dout, dlse, bias_grad: bool, smod_grad: int = 0) -> BwdParams:
    """The backward's parameters from :func:`saved`'s two parts and the incoming gradients."""
    n = len(_TENSORS[FwdParams])
    values = list(_FWD_SLOTS)
    for i, t in zip(_FWD_TENSOR_POS, tensors[:n]):
        values[i] = t
    for i, x in zip(_FWD_SCALAR_POS, scalars):
        values[i] = x
    out, stats, rng = tensors[n:]
    return BwdParams(*values, dout, out, stats, dlse, rng, bias_grad, smod_grad)


_FWD_SLOTS = (None,) * len(_NAMES[FwdParams])
_FWD_TENSOR_POS = tuple(_NAMES[FwdParams].index(n) for n in _TENSORS[FwdParams])
_FWD_SCALAR_POS = tuple(_NAMES[FwdParams].index(n) for n in _SCALARS[FwdParams])
# (BwdParams' own fields, in order: what restore passes after the forward's)
_OWN = ("dout", "out", "stats", "dlse", "rng", "bias_grad", "smod_grad")
assert _NAMES[BwdParams][len(_NAMES[FwdParams]) :] == _OWN


def num_inputs() -> int:
    """How many inputs the forward op has (autograd returns one gradient, or None, for each)."""
    return len(_NAMES[FwdParams])
