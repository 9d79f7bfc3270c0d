"""The Mask object and its factories."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attnkit._offsets import lengths_offset, offset_for
from attnkit._probe import check_arity
from attnkit.errors import AttentionInputError
from attnkit.masks._args import batch_check, int_arg, int_tensor_arg, mask_error, window_ok

# fn(b, h, q_idx, kv_idx, off) -> bool tensor; `off` = Sk - Sq (int, or tensor indexed by b).
MaskFn = Callable[..., torch.Tensor]
# check(B, H, Sq, Sk, layout, seqlens) -> None, raising AttentionInputError("mask", ...) (see Mask.check).
CheckFn = Callable[..., None]


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
        parts: the operands of a composition.
        check: ``check(B, H, Sq, Sk, layout, seqlens)`` raising :class:`AttentionInputError` when the mask's
            data does not fit a call (see :meth:`check`); None when any call fits.
        size: the natural length to draw the mask at (its data's length), or None.
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
        check: CheckFn | None = None,
        size: int | None = None,
    ):
        self._fn = fn
        self.name = name
        self.native = native
        self.source = self if source is None else source  # the user's object this mask wraps, if any
        self.kind = kind
        self.params = {} if params is None else params
        self.parts = tuple(parts)
        self._check = check
        self.size = size if size is not None else next((p.size for p in self.parts if p.size), None)

    def kind_of_data(self) -> str | None:
        """The one factory kind under this mask's compositions besides causal and full (``document`` for
        ``document(ids) & causal()``), or None when there are several or none: what the backends' measured
        rates for masks are keyed by."""
        kinds, todo = set(), [self]
        while todo:
            m = todo.pop()
            if m.kind in ("and", "or", "not"):
                todo.extend(m.parts)
            elif m.kind not in ("causal", "full"):
                kinds.add(m.kind)
        return kinds.pop() if len(kinds) == 1 else None

    def check(self, B: int, H: int, Sq: int, Sk: int, layout: str = "bhsd", seqlens=None) -> None:
        """Raise :class:`AttentionInputError` (naming ``mask``) if the mask's data does not fit the call.

        Args:
            B: batch size (number of sequences N for ``thd``); H: query heads; Sq, Sk: query and key
                lengths (for ``thd`` the longest sequence's).
            layout: the call's layout; for ``thd`` per-sequence data must cover the longest sequence.
            seqlens: for ``thd`` where known on the host, ``(lengths_q, lengths_k)`` lists of N ints.

        Only shapes are compared, plus values held on the host (Python ints, CPU tensors): a device
        tensor is never read. ``attention`` calls this during validation; compositions check every part.
        """
        if self._check is not None:
            self._check(B, H, Sq, Sk, layout, seqlens)
        for p in self.parts:
            p.check(B, H, Sq, Sk, layout, seqlens)

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
        """Boolean tensor (B, H, Sq, Sk), True where a query may attend (bottom-right aligned); on
        ``device``, by default the device of the mask's data (doc ids, lengths, ...), else the CPU."""
        if device is None:
            device = self._data_device()
        b = torch.arange(B, device=device).view(B, 1, 1, 1)
        h = torch.arange(H, device=device).view(1, H, 1, 1)
        q = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
        kv = torch.arange(Sk, device=device).view(1, 1, 1, Sk)
        out = torch.as_tensor(self._fn(b, h, q, kv, Sk - Sq), device=device)
        return out.to(torch.bool).expand(B, H, Sq, Sk).contiguous()

    def _data_device(self):
        for v in self.params.values():
            if isinstance(v, torch.Tensor):
                return v.device
        return next((d for d in (p._data_device() for p in self.parts) if d is not None), None)

    def draw(
        self, Sq: int | None = None, Sk: int | None = None, b: int = 0, h: int = 0, path: str | None = None
    ) -> str:
        """Text picture of the mask for one (batch, head): rows are queries, columns keys (█ = attend).

        Args:
            Sq, Sk: query and key lengths; ``Sq`` defaults to the length of the mask's data (doc ids,
                FlashMask columns, ...) or 16, ``Sk`` to ``Sq``.
            b, h: the batch (sequence) and head to draw.
            path: also write the picture as a PNG there (white = attend; no extra dependency).
        Returns:
            the picture as text, a title line then one line per query row.
        """
        Sq = (self.size or 16) if Sq is None else Sq
        Sk = Sq if Sk is None else Sk
        dense = self.to_dense(b + 1, h + 1, Sq, Sk)[b, h]
        if path is not None:
            from attnkit.masks._png import write_png

            write_png(path, dense)
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
    int_arg("sliding_window", "left", left, -1)
    int_arg("sliding_window", "right", right, -1)
    return Mask(
        lambda b, h, q, kv, off: window_ok(q + off, kv, left, right),
        f"sliding_window({left}, {right})",
        {"causal": False, "window": (left, right)},
        kind="sliding_window",
        params={"left": left, "right": right},
    )


def dilated_sliding_window(left: int, dilation: int, right: int = 0) -> Mask:
    """The sliding window, keeping every ``dilation``-th key: ``p - left <= j <= p + right`` and
    ``(p - j) % dilation == 0``, where ``p = i + (Sk - Sq)`` (-1 leaves a side unbounded).

    Args:
        left, right: window sides, ints >= -1.
        dilation: int >= 1 (1 is the plain sliding window).

    ``dilated_sliding_window(4, 2)`` with Sq = Sk = 6 (█ = attend)::

        █ · · · · ·
        · █ · · · ·
        █ · █ · · ·
        · █ · █ · ·
        █ · █ · █ ·
        · █ · █ · █
    """
    int_arg("dilated_sliding_window", "left", left, -1)
    int_arg("dilated_sliding_window", "dilation", dilation, 1)
    int_arg("dilated_sliding_window", "right", right, -1)

    def fn(b, h, q, kv, off):
        pos = q + off
        return window_ok(pos, kv, left, right) & ((pos - kv) % dilation == 0)

    return Mask(
        fn,
        f"dilated_sliding_window({left}, {dilation}, {right})",
        {"causal": False, "window": (left, right)} if dilation == 1 else None,
        kind="dilated_sliding_window",
        params={"left": left, "dilation": dilation, "right": right},
    )


def global_sliding(num_global: int, left: int, right: int = 0) -> Mask:
    """Global tokens plus a sliding window (Longformer / BigBird style): key j is visible to query i iff
    ``p - left <= j <= p + right``, or ``j < num_global`` (every query sees the global tokens), or
    ``p < num_global`` (a global token sees every key), where ``p = i + (Sk - Sq)``.

    Args:
        num_global: int >= 0, the number of leading global positions.
        left, right: window sides, ints >= -1 (-1 = unbounded).

    ``global_sliding(1, 1)`` with Sq = Sk = 5 (█ = attend)::

        █ █ █ █ █
        █ █ · · ·
        █ █ █ · ·
        █ · █ █ ·
        █ · · █ █
    """
    int_arg("global_sliding", "num_global", num_global, 0)
    int_arg("global_sliding", "left", left, -1)
    int_arg("global_sliding", "right", right, -1)

    def fn(b, h, q, kv, off):
        pos = q + off
        return window_ok(pos, kv, left, right) | (kv < num_global) | (pos < num_global)

    return Mask(
        fn,
        f"global_sliding({num_global}, {left}, {right})",
        kind="global_sliding",
        params={"num_global": num_global, "left": left, "right": right},
    )


def document(doc_ids: torch.Tensor, kv_doc_ids: torch.Tensor | None = None) -> Mask:
    """Same-document attention for packed sequences: key j visible to query i iff
    ``doc_ids[i] == kv_doc_ids[j]`` (per batch row for 2-D ids).

    Args:
        doc_ids: int tensor (S,) or (B, S): document id of each query position (and of each key position
            when ``kv_doc_ids`` is not given). For ``layout="thd"`` row n belongs to sequence n and S
            must cover the longest sequence; otherwise S must equal Sq (and Sk without ``kv_doc_ids``).
        kv_doc_ids: optional int tensor (Sk,) or (B, Sk), of the rank of ``doc_ids``, for keys.

    ``document(torch.tensor([0, 0, 1, 1, 1]))`` (█ = attend)::

        █ █ · · ·
        █ █ · · ·
        · · █ █ █
        · · █ █ █
        · · █ █ █
    """
    int_tensor_arg("document", "doc_ids", doc_ids, (1, 2), "(S,) or (B, S)")
    if kv_doc_ids is not None:
        int_tensor_arg("document", "kv_doc_ids", kv_doc_ids, (doc_ids.dim(),), "of the rank of doc_ids")
        if doc_ids.dim() == 2 and kv_doc_ids.shape[0] != doc_ids.shape[0]:
            raise AttentionInputError(
                "kv_doc_ids",
                f"document: a first dim of {doc_ids.shape[0]} (as doc_ids)",
                tuple(kv_doc_ids.shape),
            )
    kv_ids = doc_ids if kv_doc_ids is None else kv_doc_ids

    def fn(b, h, q, kv, off):
        if doc_ids.dim() == 1:
            return doc_ids[q] == kv_ids[kv]
        return doc_ids[b, q] == kv_ids[b, kv]

    def check(B, H, Sq, Sk, layout, seqlens):
        thd = layout == "thd"
        kv_name = "doc_ids" if kv_doc_ids is None else "kv_doc_ids"
        for name, t, S, what in (("doc_ids", doc_ids, Sq, "Sq"), (kv_name, kv_ids, Sk, "Sk")):
            if t.dim() == 2:
                batch_check("document", name, t, B, layout)
            n = t.shape[-1]
            if n < S if thd else n != S:
                need = f"at least {S} positions (the longest sequence's {what})" if thd else f"{S} ({what})"
                hint = None
                if kv_doc_ids is None and not thd and Sq != Sk:
                    hint = "for Sq != Sk pass kv_doc_ids for the keys"
                mask_error(f"document: `{name}` with {need} ids per row", f"shape {tuple(t.shape)}", hint)

    return Mask(
        fn,
        "document",
        kind="document",
        params={"doc_ids": doc_ids, "kv_doc_ids": kv_doc_ids},
        check=check,
        size=doc_ids.shape[-1],
    )


def prefix_lm(prefix_len) -> Mask:
    """Bidirectional over the first ``prefix_len`` keys, causal after: ``j < prefix_len or j <= p``
    (``p = i + (Sk - Sq)``).

    Args:
        prefix_len: int >= 0, or an int tensor (B,) with one length per batch row (per sequence for thd).

    ``prefix_lm(2)`` with Sq = Sk = 4 (█ = attend)::

        █ █ · ·
        █ █ · ·
        █ █ █ ·
        █ █ █ █
    """
    if isinstance(prefix_len, torch.Tensor):
        int_tensor_arg("prefix_lm", "prefix_len", prefix_len, (1,), "(B,)")
    else:
        int_arg("prefix_lm", "prefix_len", prefix_len, 0)

    def fn(b, h, q, kv, off):
        p = prefix_len[b] if isinstance(prefix_len, torch.Tensor) else prefix_len
        return (kv < p) | (kv <= q + off)

    return Mask(
        fn,
        f"prefix_lm({prefix_len if isinstance(prefix_len, int) else 'tensor'})",
        kind="prefix_lm",
        params={"prefix_len": prefix_len},
        check=lambda B, H, Sq, Sk, layout, seqlens: batch_check(
            "prefix_lm", "prefix_len", prefix_len, B, layout
        ),
    )


def chunked(chunk_size: int) -> Mask:
    """Keys in the same chunk of ``chunk_size`` positions as the query (compose with ``causal()``
    for Llama-4 style chunked causal attention)."""
    int_arg("chunked", "chunk_size", chunk_size, 1)
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
        size=n + height * width,
    )


def from_mask_mod(fn: Callable, name: str | None = None) -> Mask:
    """Wrap a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (indices as given, no offset)."""
    if isinstance(fn, Mask):
        return fn
    if not callable(fn):
        raise AttentionInputError("fn", "from_mask_mod: a callable mask_mod(b, h, q_idx, kv_idx)", repr(fn))
    check_arity("fn", fn, 4, "mask_mod(b, h, q_idx, kv_idx) -> bool")
    return Mask(
        lambda b, h, q, kv, off: fn(b, h, q, kv), name or getattr(fn, "__name__", "mask_mod"), source=fn
    )
