"""Masks given by data tensors of their own: ``shared_prefix`` (preference pairs) and ``flashmask``."""

from __future__ import annotations

import torch

from attnkit.errors import AttentionInputError
from attnkit.masks._args import batch_check, host_values, int_arg, int_tensor_arg, mask_error
from attnkit.masks._mask import Mask


def _equal_lengths(factory: str, Sq: int, Sk: int, layout: str, seqlens) -> None:
    """Both data masks here describe one packed sequence of queries and keys: Sq == Sk (per sequence)."""
    if layout != "thd" and Sq != Sk:
        mask_error(f"{factory}: Sq == Sk (queries and keys are the same positions)", f"Sq={Sq}, Sk={Sk}")
    if layout == "thd" and seqlens is not None and list(seqlens[0]) != list(seqlens[1]):
        n = next(i for i, (a, c) in enumerate(zip(*seqlens)) if a != c)
        mask_error(
            f"{factory}: equal query and key lengths in every sequence",
            f"sequence {n}: {seqlens[0][n]} queries, {seqlens[1][n]} keys",
        )


def _host_lengths(prefix_len, response_lens) -> dict:
    """The two length arguments as Python values where they are on the host (else None each)."""
    return {
        "prefix_len": host_values(prefix_len) if isinstance(prefix_len, torch.Tensor) else prefix_len,
        "response_lens": host_values(response_lens)
        if isinstance(response_lens, torch.Tensor)
        else list(response_lens),
    }


def shared_prefix(prefix_len, response_lens) -> Mask:
    """Preference pairs packed as ``[prompt | response 1 | response 2 | ...]`` sharing one prompt (Sq == Sk).

    Positions ``[0, P)`` are the prompt (``P = prefix_len``), response r the next ``response_lens[r]``
    positions. A prompt position attends causally within the prompt; a response position attends the whole
    prompt and, causally, its own response, never another response; positions past the last response
    attend nothing (their rows are fully masked: out = 0, lse = -inf).

    Args:
        prefix_len: int >= 0, or an int tensor (B,): the prompt length of each batch row (sequence for thd).
        response_lens: a list of R ints >= 0 (the same for every row), or an int tensor (B, R).

    ``shared_prefix(2, [2, 1])`` with Sq = Sk = 6 (█ = attend)::

        █ · · · · ·
        █ █ · · · ·
        █ █ █ · · ·
        █ █ █ █ · ·
        █ █ · · █ ·
        · · · · · ·
    """
    if isinstance(prefix_len, torch.Tensor):
        int_tensor_arg("shared_prefix", "prefix_len", prefix_len, (1,), "(B,)")
    else:
        int_arg("shared_prefix", "prefix_len", prefix_len, 0)
    if isinstance(response_lens, torch.Tensor):
        int_tensor_arg("shared_prefix", "response_lens", response_lens, (2,), "(B, R)")
        if isinstance(prefix_len, torch.Tensor) and prefix_len.shape[0] != response_lens.shape[0]:
            raise AttentionInputError(
                "response_lens",
                f"shared_prefix: a first dim of {prefix_len.shape[0]} (the rows of prefix_len)",
                f"shape {tuple(response_lens.shape)}",
            )
        ends_list = None
    elif isinstance(response_lens, (list, tuple)):
        for r in response_lens:
            int_arg("shared_prefix", "response_lens", r, 0)
        ends_list = [sum(response_lens[: r + 1]) for r in range(len(response_lens))]
    else:
        raise AttentionInputError(
            "response_lens", "shared_prefix: a list of ints or an int tensor (B, R)", repr(response_lens)
        )
    for name, vals in _host_lengths(prefix_len, response_lens).items():
        flat = [
            x
            for r in (vals if isinstance(vals, list) else [vals])
            for x in (r if isinstance(r, list) else [r])
        ]
        if vals is not None and any(x < 0 for x in flat):
            raise AttentionInputError(name, "shared_prefix: lengths >= 0", repr(vals))
    R = len(response_lens) if ends_list is not None else response_lens.shape[1]
    # the responses' end offsets, (B, R) cumulative sums, computed once here: the predicate below is then
    # pointwise (loads and comparisons only), which FlexAttention can compile
    ends_t = response_lens.cumsum(-1) if ends_list is None else None

    def fn(b, h, q, kv, off):
        P = prefix_len[b] if isinstance(prefix_len, torch.Tensor) else prefix_len
        ends = ends_list if ends_t is None else [ends_t[b, r] for r in range(R)]

        def segment(x):  # index of the response holding position x (R past the last; 0 in the prompt)
            return sum(((x >= P + e).long() for e in ends), torch.zeros_like(x))

        qs, ks = segment(torch.as_tensor(q)), segment(torch.as_tensor(kv))
        return (kv <= q) & ((q < P) | ((qs < R) & ((kv < P) | (ks == qs))))

    def totals():  # P + sum(response_lens) per row (one number for all rows), or None if not on the host
        host = _host_lengths(prefix_len, response_lens)
        P, L = host["prefix_len"], host["response_lens"]
        if P is None or L is None:
            return None
        sums = [sum(r) for r in L] if isinstance(response_lens, torch.Tensor) else [sum(L)]
        Ps = P if isinstance(P, list) else [P]
        rows = max(len(sums), len(Ps))
        return [Ps[min(n, len(Ps) - 1)] + sums[min(n, len(sums) - 1)] for n in range(rows)]

    def check(B, H, Sq, Sk, layout, seqlens):
        _equal_lengths("shared_prefix", Sq, Sk, layout, seqlens)
        batch_check("shared_prefix", "prefix_len", prefix_len, B, layout)
        batch_check("shared_prefix", "response_lens", response_lens, B, layout)
        tot = totals()
        if tot is None or (layout == "thd" and seqlens is None):
            return
        room = list(seqlens[1]) if layout == "thd" else [Sk] * B
        if len(tot) == 1:
            tot = tot * len(room)
        for n, (t, S) in enumerate(zip(tot, room)):
            if t > S:
                where = f"sequence {n} has {S} keys" if layout == "thd" else f"Sk = {S}"
                mask_error(
                    "shared_prefix: prefix_len + sum(response_lens) that fits the keys",
                    f"{t} positions in row {n} ({where})",
                )

    tot = totals()
    return Mask(
        fn,
        f"shared_prefix({prefix_len if isinstance(prefix_len, int) else 'tensor'}, R={R})",
        kind="shared_prefix",
        params={"prefix_len": prefix_len, "response_lens": response_lens},
        check=check,
        size=max(tot) + 1 if tot else None,
    )


def flashmask(startend_row_indices: torch.Tensor, causal: bool) -> Mask:
    """FlashMask's column-interval form (Sq == Sk): for each key column j, the query rows it is hidden from.

    Args:
        startend_row_indices: int32 (B or 1, H or 1, Sk, C), query heads; for column j with values
            ``a, b, c, d`` the masked rows are
            causal, C=1: ``i >= a``; causal, C=2: ``a <= i < b``;
            not causal, C=2: ``i >= a`` or ``i < b``; not causal, C=4: ``a <= i < b`` or ``c <= i < d``.
        causal: bool; True also applies ``j <= i``.

    ``flashmask(t, causal=True)`` with C=2 and columns ``(a, b) = (3, 5), (6, 6), (2, 4), (6, 6), (6, 6),
    (6, 6)`` (Sq = Sk = 6, █ = attend)::

        █ · · · · ·
        █ █ · · · ·
        █ █ · · · ·
        · █ · █ · ·
        · █ █ █ █ ·
        █ █ █ █ █ █
    """
    T = startend_row_indices
    if not isinstance(T, torch.Tensor) or T.dtype != torch.int32 or T.dim() != 4:
        got = f"tensor of shape {tuple(T.shape)}, dtype {T.dtype}" if isinstance(T, torch.Tensor) else repr(T)
        raise AttentionInputError(
            "startend_row_indices",
            "flashmask: an int32 tensor (B or 1, H or 1, Sk, C)",
            got,
            "pass startend_row_indices.to(torch.int32)"
            if isinstance(T, torch.Tensor) and T.dim() == 4
            else None,
        )
    if not isinstance(causal, bool):
        raise AttentionInputError("causal", "flashmask: a bool", repr(causal))
    C = T.shape[-1]
    allowed = (1, 2) if causal else (2, 4)
    if C not in allowed:
        raise AttentionInputError(
            "startend_row_indices",
            f"flashmask(causal={causal}): a last dim C in {allowed}",
            f"shape {tuple(T.shape)}",
        )

    def fn(b, h, q, kv, off):
        col = T[b if T.shape[0] > 1 else b * 0, h if T.shape[1] > 1 else h * 0, kv]  # (..., C)

        def c(n):
            return col[..., n]

        if causal and C == 1:
            hidden = q >= c(0)
        elif C == 2 and causal:
            hidden = (q >= c(0)) & (q < c(1))
        elif C == 2:
            hidden = (q >= c(0)) | (q < c(1))
        else:
            hidden = ((q >= c(0)) & (q < c(1))) | ((q >= c(2)) & (q < c(3)))
        return (~hidden & (kv <= q)) if causal else ~hidden

    def check(B, H, Sq, Sk, layout, seqlens):
        _equal_lengths("flashmask", Sq, Sk, layout, seqlens)
        thd = layout == "thd"
        want = f"({B} or 1, {H} or 1, {'>= ' if thd else ''}{Sk}, {C})"
        if (
            T.shape[0] not in (1, B)
            or T.shape[1] not in (1, H)
            or (T.shape[2] < Sk if thd else T.shape[2] != Sk)
        ):
            mask_error(
                f"flashmask: `startend_row_indices` of shape (B or 1, Hq or 1, Sk, C) = {want}",
                f"shape {tuple(T.shape)}",
            )

    return Mask(
        fn,
        f"flashmask(C={C}, causal={causal})",
        kind="flashmask",
        params={"startend_row_indices": T, "causal": causal},
        check=check,
        size=T.shape[2],
    )
