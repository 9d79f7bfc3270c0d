"""The Mask object and its factories."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit._offsets import lengths_offset, offset_for

# fn(b, h, q_idx, kv_idx, off) -> bool tensor; `off` = Sk - Sq (int, or tensor indexed by b).
MaskFn = Callable[..., torch.Tensor]


def _merge_windows(a, b):
    """Intersection of two (left, right) windows; -1 means unbounded."""

    def tighter(x, y):
        if x < 0:
            return y
        if y < 0:
            return x
        return min(x, y)

    return (tighter(a[0], b[0]), tighter(a[1], b[1]))


class Mask:
    """A named, composable mask predicate.

    Args:
        fn: ``fn(b, h, q_idx, kv_idx, off) -> bool tensor`` where the index arguments are broadcastable
            integer tensors and ``off = Sk - Sq`` aligns queries to the bottom right.
        name: a short description, shown by ``repr`` and ``attnkit.explain``.
        native: when the mask is exactly expressible by ``attention``'s own flags, a dict with keys
            ``causal`` (bool) and ``window`` ((left, right) or None); backends then serve it natively.
        kind: the structure, for lowerings that carry a mask to a kernel as data: the factory's name
            (``"document"``, ``"prefix_lm"``, ...), ``"and"`` / ``"or"`` / ``"not"`` for compositions (their
            operands in ``parts``), or ``"mask_mod"`` for a wrapped callable.
        params: the factory's arguments by name (tensors as given): the mask's data.
    """

    def __init__(
        self,
        fn: MaskFn,
        name: str,
        native: dict | None = None,
        source=None,
        *,
        kind: str = "mask_mod",
        params: dict | None = None,
        parts: tuple = (),
    ):
        self._fn = fn
        self.name = name
        self.native = native
        self.source = self if source is None else source  # the user's object this mask wraps, if any
        self.kind = kind
        self.params = {} if params is None else params
        self.parts = tuple(parts)

    # -- evaluation ---------------------------------------------------------------------------------
    def mask_mod(self, b, h, q_idx, kv_idx):
        """FlexAttention-style predicate, assuming Sq == Sk (use :meth:`bind` for other lengths)."""
        return self._fn(b, h, q_idx, kv_idx, 0)

    def __call__(self, b, h, q_idx, kv_idx):
        return self.mask_mod(b, h, q_idx, kv_idx)

    def bind(self, q_len=None, kv_len=None) -> Callable:
        """A ``mask_mod(b, h, q_idx, kv_idx)`` for sequences of ``q_len`` queries and ``kv_len`` keys.

        ``q_len``/``kv_len`` are ints, or int tensors of shape (B,) indexed by the batch (sequence) index.
        """
        off = lengths_offset(q_len, kv_len)
        fn = self._fn
        return lambda b, h, q_idx, kv_idx: fn(b, h, q_idx, kv_idx, offset_for(b, off))

    def to_dense(self, B: int, H: int, Sq: int, Sk: int, device=None) -> torch.Tensor:
        """Boolean tensor (B, H, Sq, Sk), True where a query may attend (bottom-right aligned)."""
        b = torch.arange(B, device=device).view(B, 1, 1, 1)
        h = torch.arange(H, device=device).view(1, H, 1, 1)
        q = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
        kv = torch.arange(Sk, device=device).view(1, 1, 1, Sk)
        out = torch.as_tensor(self._fn(b, h, q, kv, Sk - Sq), device=device)
        return out.to(torch.bool).expand(B, H, Sq, Sk).contiguous()

    def draw(self, Sq: int = 16, Sk: int | None = None, b: int = 0, h: int = 0) -> str:
        """ASCII picture of the mask for one (batch, head): rows are queries, columns keys."""
        Sk = Sq if Sk is None else Sk
        dense = self.to_dense(b + 1, h + 1, Sq, Sk)[b, h]
        rows = ["".join("█" if x else "·" for x in row.tolist()) for row in dense]
        return f"{self.name}  (Sq={Sq}, Sk={Sk}; █ = attend)\n" + "\n".join(rows)

    # -- composition ---------------------------------------------------------------------------------
    def __and__(self, other: Mask | Callable) -> Mask:
        other = _as_mask(other)
        f, g = self._fn, other._fn
        native = None
        if self.native is not None and other.native is not None:
            wa, wb = self.native.get("window"), other.native.get("window")
            window = _merge_windows(wa, wb) if wa is not None and wb is not None else (wa or wb)
            native = {
                "causal": self.native.get("causal", False) or other.native.get("causal", False),
                "window": window,
            }
        return Mask(
            lambda b, h, q, kv, off: f(b, h, q, kv, off) & g(b, h, q, kv, off),
            f"({self.name} & {other.name})",
            native,
            kind="and",
            parts=(self, other),
        )

    def __or__(self, other: Mask | Callable) -> Mask:
        other = _as_mask(other)
        f, g = self._fn, other._fn
        return Mask(
            lambda b, h, q, kv, off: f(b, h, q, kv, off) | g(b, h, q, kv, off),
            f"({self.name} | {other.name})",
            kind="or",
            parts=(self, other),
        )

    def __invert__(self) -> Mask:
        f = self._fn
        return Mask(
            lambda b, h, q, kv, off: ~_as_bool(f(b, h, q, kv, off)),
            f"~{self.name}",
            kind="not",
            parts=(self,),
        )

    __rand__ = __and__
    __ror__ = __or__

    def __repr__(self) -> str:
        return f"Mask({self.name})"


def _as_bool(x):
    return x if isinstance(x, torch.Tensor) and x.dtype == torch.bool else torch.as_tensor(x).bool()


def _as_mask(m) -> Mask:
    if isinstance(m, Mask):
        return m
    if callable(m):
        return from_mask_mod(m)
    raise TypeError(f"cannot combine a Mask with {type(m).__name__}; expected a Mask or a mask_mod callable")


# -- factories ----------------------------------------------------------------------------------------
def full() -> Mask:
    """Every key visible."""
    return Mask(
        lambda b, h, q, kv, off: torch.ones_like(q + kv, dtype=torch.bool),
        "full",
        {"causal": False, "window": None},
        kind="full",
    )


def causal() -> Mask:
    """Causal, bottom-right aligned: key j visible to query i iff ``j <= i + (Sk - Sq)``.

    Same as ``attention(causal=True)``. With Sq=2, Sk=5 (█ = attend)::

        █ █ █ █ ·
        █ █ █ █ █
    """
    return Mask(
        lambda b, h, q, kv, off: kv <= q + off, "causal", {"causal": True, "window": None}, kind="causal"
    )


def sliding_window(left: int, right: int = 0) -> Mask:
    """Keys within ``left`` positions before and ``right`` after the (bottom-right aligned) query.

    ``-1`` leaves a side unbounded. ``sliding_window(w)`` alone does not imply causality for
    ``right > 0``; ``sliding_window(w, 0)`` is the usual causal sliding window.
    """
    for name, val in (("left", left), ("right", right)):
        if not isinstance(val, int) or isinstance(val, bool) or val < -1:
            raise ValueError(f"sliding_window: `{name}` must be an int >= -1, got {val!r}")

    def fn(b, h, q, kv, off):
        pos = q + off
        ok = torch.ones_like(pos + kv, dtype=torch.bool)
        if left >= 0:
            ok = ok & (kv >= pos - left)
        if right >= 0:
            ok = ok & (kv <= pos + right)
        return ok

    return Mask(
        fn,
        f"sliding_window({left}, {right})",
        {"causal": False, "window": (left, right)},
        kind="sliding_window",
        params={"left": left, "right": right},
    )


def document(doc_ids: torch.Tensor, kv_doc_ids: torch.Tensor | None = None) -> Mask:
    """Same-document attention for packed sequences.

    Args:
        doc_ids: int tensor (S,) or (B, S): document id of each query position (and key position when
            ``kv_doc_ids`` is not given).
        kv_doc_ids: optional int tensor (Sk,) or (B, Sk) for keys, when Sq != Sk.
    """
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() not in (1, 2):
        raise ValueError("document: `doc_ids` must be an int tensor of shape (S,) or (B, S)")
    kv_ids = doc_ids if kv_doc_ids is None else kv_doc_ids

    def fn(b, h, q, kv, off):
        if doc_ids.dim() == 1:
            return doc_ids[q] == kv_ids[kv]
        return doc_ids[b, q] == kv_ids[b, kv]

    return Mask(fn, "document", kind="document", params={"doc_ids": doc_ids, "kv_doc_ids": kv_doc_ids})


def prefix_lm(prefix_len) -> Mask:
    """Bidirectional over the first ``prefix_len`` keys, causal after (int or (B,) int tensor)."""

    def fn(b, h, q, kv, off):
        p = prefix_len[b] if isinstance(prefix_len, torch.Tensor) else prefix_len
        return (kv < p) | (kv <= q + off)

    return Mask(
        fn,
        f"prefix_lm({prefix_len if isinstance(prefix_len, int) else 'tensor'})",
        kind="prefix_lm",
        params={"prefix_len": prefix_len},
    )


def chunked(chunk_size: int) -> Mask:
    """Keys in the same chunk of ``chunk_size`` positions as the query (compose with ``causal()``
    for Llama-4 style chunked causal attention)."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunked: `chunk_size` must be a positive int, got {chunk_size!r}")
    return Mask(
        lambda b, h, q, kv, off: (q + off) // chunk_size == kv // chunk_size,
        f"chunked({chunk_size})",
        kind="chunked",
        params={"chunk_size": chunk_size},
    )


def neighborhood_2d(height: int, width: int, kernel: int, num_prefix_tokens: int = 0) -> Mask:
    """2-D neighborhood attention over a ``height x width`` token grid laid out row-major.

    A token sees the tokens within ``kernel // 2`` rows and columns of it. The first
    ``num_prefix_tokens`` positions (e.g. a ViT class token) see and are seen by every token.
    """
    r = kernel // 2
    n = num_prefix_tokens

    def fn(b, h, q, kv, off):
        qi, ki = q - n, kv - n
        near = ((qi // width - ki // width).abs() <= r) & ((qi % width - ki % width).abs() <= r)
        return near | (q < n) | (kv < n)

    return Mask(
        fn,
        f"neighborhood_2d({height}x{width}, k={kernel})",
        kind="neighborhood_2d",
        params={"height": height, "width": width, "kernel": kernel, "num_prefix_tokens": num_prefix_tokens},
    )


def from_mask_mod(fn: Callable, name: str | None = None) -> Mask:
    """Wrap a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (indices as given, no offset)."""
    if isinstance(fn, Mask):
        return fn
    if not callable(fn):
        raise ValueError(f"from_mask_mod: expected a callable, got {type(fn).__name__}")
    return Mask(
        lambda b, h, q, kv, off: fn(b, h, q, kv), name or getattr(fn, "__name__", "mask_mod"), source=fn
    )
