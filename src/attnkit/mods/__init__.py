"""Score modifiers with the FlexAttention signature ``score_mod(score, b, h, q_idx, kv_idx) -> score``.

Factories return :class:`ScoreMod` objects. Position-dependent mods are bottom-right aligned like the
rest of attnkit (query row ``i`` stands at key position ``i + Sk - Sq``); calling a mod directly assumes
Sq == Sk, and ``attention`` binds the real lengths.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit._offsets import lengths_offset, offset_for


class ScoreMod:
    """A named score modifier. ``fn(score, b, h, q_idx, kv_idx, off) -> score``; ``off = Sk - Sq``."""

    def __init__(self, fn: Callable, name: str):
        self._fn = fn
        self.name = name

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self._fn(score, b, h, q_idx, kv_idx, 0)

    def bind(self, q_len=None, kv_len=None) -> Callable:
        """A plain ``score_mod(score, b, h, q_idx, kv_idx)`` for the given lengths (ints or (B,) tensors)."""
        off = lengths_offset(q_len, kv_len)
        fn = self._fn
        return lambda s, b, h, q, kv: fn(s, b, h, q, kv, offset_for(b, off))

    def __repr__(self) -> str:
        return f"ScoreMod({self.name})"


def softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma-2 style logit soft-capping)."""
    if not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"softcap: `cap` must be a float > 0, got {cap!r}")
    return ScoreMod(lambda s, b, h, q, kv, off: cap * torch.tanh(s / cap), f"softcap({cap})")


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """ALiBi: ``score - slopes[h] * |i + (Sk - Sq) - j|``; ``slopes`` is (H,) or (B, H)."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() not in (1, 2):
        raise ValueError("alibi: `slopes` must be a tensor of shape (H,) or (B, H)")

    def fn(s, b, h, q, kv, off):
        slope = slopes[h] if slopes.dim() == 1 else slopes[b, h]
        return s - slope * (q + off - kv).abs()

    return ScoreMod(fn, "alibi")


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """Learnable relative-position bias: ``score + table[..., clamp(i + Sk - Sq - j) + R // 2]``.

    Args:
        table: (R,) shared by all heads or (H, R) per head, R odd; distance ``d = i + (Sk - Sq) - j`` is
            clamped to ``[-(R // 2), R // 2]``. Gradients flow into ``table`` when it requires grad.
    """
    if not isinstance(table, torch.Tensor) or table.dim() not in (1, 2) or table.shape[-1] % 2 != 1:
        raise ValueError("relative_bias: `table` must be a tensor (R,) or (H, R) with R odd")
    R = table.shape[-1]
    half = R // 2

    def fn(s, b, h, q, kv, off):
        idx = (q + off - kv).clamp(-half, half) + half
        return s + (table[idx] if table.dim() == 1 else table[h, idx])

    return ScoreMod(fn, f"relative_bias(R={R})")


def compose(*mods: Callable) -> ScoreMod:
    """Apply mods left to right: ``compose(f, g)(s) == g(f(s))``."""
    parts = [m if isinstance(m, ScoreMod) else from_score_mod(m) for m in mods]

    def fn(s, b, h, q, kv, off):
        for m in parts:
            s = m._fn(s, b, h, q, kv, off)
        return s

    return ScoreMod(fn, "compose(" + ", ".join(m.name for m in parts) + ")")


def from_score_mod(fn: Callable, name: str | None = None) -> ScoreMod:
    """Wrap a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` (indices as given, no offset)."""
    if isinstance(fn, ScoreMod):
        return fn
    if not callable(fn):
        raise ValueError(f"from_score_mod: expected a callable, got {type(fn).__name__}")
    return ScoreMod(
        lambda s, b, h, q, kv, off: fn(s, b, h, q, kv), name or getattr(fn, "__name__", "score_mod")
    )


__all__ = ["ScoreMod", "alibi", "compose", "from_score_mod", "relative_bias", "softcap"]
