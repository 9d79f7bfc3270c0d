"""Score modifiers with the FlexAttention signature ``score_mod(score, b, h, q_idx, kv_idx) -> score``.

Factories return :class:`ScoreMod` objects. Position-dependent mods are bottom-right aligned like the
rest of attnkit (query row ``i`` stands at key position ``i + Sk - Sq``); calling a mod directly assumes
Sq == Sk, and ``attention`` binds the real lengths.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnkit._offsets import lengths_offset, offset_for
from attnkit._probe import check_arity
from attnkit.errors import AttentionInputError


class ScoreMod:
    """A named score modifier.

    Args:
        fn: ``fn(score, b, h, q_idx, kv_idx, off) -> score`` over broadcastable index tensors;
            ``off = Sk - Sq``.
        name: a short description (``repr``, ``attnkit.explain``).
        kind: the factory's name (``"alibi"``, ``"t5_bias"``, ...), ``"compose"`` (operands in ``parts``),
            or ``"score_mod"`` for a wrapped user callable (``source`` is that callable).
        params: the factory's arguments by name (tensors as given).
        check: ``check(B, H, Sq, Sk, layout, seqlens)`` raising :class:`AttentionInputError` (naming
            ``score_mod``) when the mod's tensors do not fit a call; None when any call fits.
    """

    def __init__(
        self,
        fn: Callable,
        name: str,
        *,
        kind: str = "score_mod",
        params: dict | None = None,
        parts: tuple = (),
        source=None,
        check: Callable | None = None,
    ):
        self._fn = fn
        self.name = name
        self.kind = kind
        self.params = {} if params is None else params
        self.parts = tuple(parts)
        self.source = self if source is None else source
        self._check = check

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self._fn(score, b, h, q_idx, kv_idx, 0)

    def bind(self, q_len=None, kv_len=None) -> Callable:
        """A plain ``score_mod(score, b, h, q_idx, kv_idx)`` for the given lengths (ints or (B,) tensors)."""
        off = lengths_offset(q_len, kv_len)
        fn = self._fn
        return lambda s, b, h, q, kv: fn(s, b, h, q, kv, offset_for(b, off))

    def check(self, B: int, H: int, Sq: int, Sk: int, layout: str = "bhsd", seqlens=None) -> None:
        """Raise :class:`AttentionInputError` (naming ``score_mod``) if the mod's tensors do not fit a call
        of batch B (sequences N for thd), H query heads and lengths Sq, Sk; shapes only, no device reads."""
        if self._check is not None:
            self._check(B, H, Sq, Sk, layout, seqlens)
        for p in self.parts:
            p.check(B, H, Sq, Sk, layout, seqlens)

    def __repr__(self) -> str:
        return f"ScoreMod({self.name})"


def _table_arg(factory: str, name: str, t, dims: tuple[int, ...], shape_txt: str):
    if not isinstance(t, torch.Tensor) or t.dim() not in dims or not t.is_floating_point():
        got = f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)
        raise AttentionInputError(name, f"{factory}: a floating-point tensor {shape_txt}", got)
    return t


def _heads_check(factory: str, name: str, t: torch.Tensor, per_batch: bool):
    """check(): a per-head tensor (H, ...) or, with ``per_batch``, (B, H) must match the call's heads."""

    def check(B, H, Sq, Sk, layout, seqlens):
        heads = t.shape[1] if per_batch else t.shape[0]
        rows = t.shape[0] if per_batch else B
        if heads != H or rows != B:
            want = f"({B}, {H})" if per_batch else f"{H} heads in its first dim (Hq, the query heads)"
            raise AttentionInputError(
                "score_mod", f"{factory}: `{name}` with {want}", f"shape {tuple(t.shape)}"
            )

    return check


def softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma-2 style logit soft-capping); ``cap`` a float > 0."""
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0 or not math.isfinite(cap):
        raise AttentionInputError("cap", "softcap: a finite float > 0", repr(cap))
    return ScoreMod(
        lambda s, b, h, q, kv, off: cap * torch.tanh(s / cap),
        f"softcap({cap})",
        kind="softcap",
        params={"cap": cap},
    )


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi: ``score - slopes[h] * |i + (Sk - Sq) - j|``; ``slopes`` float (Hq,) or (B, Hq)."""
    _table_arg("alibi", "slopes", slopes, (1, 2), "(H,) or (B, H)")

    def fn(s, b, h, q, kv, off):
        slope = slopes[h] if slopes.dim() == 1 else slopes[b, h]
        return s - slope * (q + off - kv).abs()

    return ScoreMod(
        fn,
        "alibi",
        kind="alibi",
        params={"slopes": slopes},
        check=_heads_check("alibi", "slopes", slopes, per_batch=slopes.dim() == 2),
    )


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """Learnable relative-position bias: ``score + table[..., clamp(i + Sk - Sq - j) + R // 2]``.

    Args:
        table: (R,) shared by all heads or (Hq, R) per head, R odd; distance ``d = i + (Sk - Sq) - j`` is
            clamped to ``[-(R // 2), R // 2]``. Gradients flow into ``table`` when it requires grad.
    """
    _table_arg("relative_bias", "table", table, (1, 2), "(R,) or (H, R) with R odd")
    if table.shape[-1] % 2 != 1:
        raise AttentionInputError("table", "relative_bias: an odd last dim R", f"shape {tuple(table.shape)}")
    R = table.shape[-1]
    half = R // 2

    def fn(s, b, h, q, kv, off):
        idx = (q + off - kv).clamp(-half, half) + half
        return s + (table[idx] if table.dim() == 1 else table[h, idx])

    check = _heads_check("relative_bias", "table", table, per_batch=False) if table.dim() == 2 else None
    return ScoreMod(fn, f"relative_bias(R={R})", kind="relative_bias", params={"table": table}, check=check)


def t5_relative_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's ``_relative_position_bucket`` exactly as Hugging Face computes it: int64 buckets in
    ``[0, num_buckets)`` for ``relative_position = key position - query position`` (any int tensor)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets = relative_buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return relative_buckets + torch.where(is_small, relative_position, if_large)


def t5_bias(table: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool = True) -> ScoreMod:
    """T5's bucketed relative-position bias: ``score + table[h, bucket(j - (i + Sk - Sq))]``.

    Args:
        table: float (Hq, num_buckets), learnable (Hugging Face keeps it as ``relative_attention_bias.weight``
            of shape (num_buckets, H): pass ``weight.t()``).
        num_buckets: int; >= 4 when bidirectional (half the buckets per direction), else >= 2.
        max_distance: int > the exact range (``num_buckets // 4`` bidirectional, else ``num_buckets // 2``);
            distances beyond it share the last bucket.
        bidirectional: encoder-style (True) or decoder-style (False: every key after the query is bucket 0).

    The bucket is T5's ``_relative_position_bucket`` (:func:`t5_relative_bucket`) of the key position minus
    the query's bottom-right aligned position; gradients flow into ``table``.
    """
    _table_arg("t5_bias", "table", table, (2,), "(H, num_buckets)")
    if not isinstance(bidirectional, bool):
        raise AttentionInputError("bidirectional", "t5_bias: a bool", repr(bidirectional))
    least = 4 if bidirectional else 2
    if not isinstance(num_buckets, int) or isinstance(num_buckets, bool) or num_buckets < least:
        raise AttentionInputError("num_buckets", f"t5_bias: an int >= {least}", repr(num_buckets))
    if table.shape[1] != num_buckets:
        raise AttentionInputError(
            "table", f"t5_bias: shape (H, num_buckets={num_buckets})", f"shape {tuple(table.shape)}"
        )
    exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if not isinstance(max_distance, int) or isinstance(max_distance, bool) or max_distance <= exact:
        raise AttentionInputError("max_distance", f"t5_bias: an int > {exact}", repr(max_distance))

    def fn(s, b, h, q, kv, off):
        bucket = t5_relative_bucket(kv - (q + off), bidirectional, num_buckets, max_distance)
        return s + table[h, bucket]

    return ScoreMod(
        fn,
        f"t5_bias({num_buckets}, {max_distance}{'' if bidirectional else ', causal'})",
        kind="t5_bias",
        params={
            "table": table,
            "num_buckets": num_buckets,
            "max_distance": max_distance,
            "bidirectional": bidirectional,
        },
        check=_heads_check("t5_bias", "table", table, per_batch=False),
    )


def compose(*mods: Callable) -> ScoreMod:
    """Apply mods left to right: ``compose(f, g)(s) == g(f(s))``."""
    parts = [m if isinstance(m, ScoreMod) else from_score_mod(m) for m in mods]

    def fn(s, b, h, q, kv, off):
        for m in parts:
            s = m._fn(s, b, h, q, kv, off)
        return s

    return ScoreMod(fn, "compose(" + ", ".join(m.name for m in parts) + ")", kind="compose", parts=parts)


def from_score_mod(fn: Callable, name: str | None = None) -> ScoreMod:
    """Wrap a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` (indices as given, no offset)."""
    if isinstance(fn, ScoreMod):
        return fn
    if not callable(fn):
        raise AttentionInputError(
            "fn", "from_score_mod: a callable score_mod(score, b, h, q_idx, kv_idx)", repr(fn)
        )
    check_arity("fn", fn, 5, "score_mod(score, b, h, q_idx, kv_idx) -> score")
    return ScoreMod(
        lambda s, b, h, q, kv, off: fn(s, b, h, q, kv),
        name or getattr(fn, "__name__", "score_mod"),
        source=fn,
    )


__all__ = [
    "ScoreMod",
    "alibi",
    "compose",
    "from_score_mod",
    "relative_bias",
    "softcap",
    "t5_bias",
    "t5_relative_bucket",
]
