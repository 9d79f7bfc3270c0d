"""The score pipeline of docs/api.md, written once over broadcastable index tensors.

The reference evaluates it chunk by chunk; backends that need dense masks or biases (SDPA) evaluate it over
the whole (B, H, Sq, Sk) grid; FlexAttention backends call it from their score_mod/mask_mod. Steps:

1. ``s = scale * <q_i, k_j>``                (done by the caller)
2. ``s = softcap * tanh(s / softcap)``
3. ``s += bias[b, h, i, j]``; ``s -= slope[h] * |i + off - j|``   (ALiBi, off = Sk - Sq)
4. ``s = score_mod(s, b, h, i, j)``
5. visible iff causal (``j <= i + off``), window (``i + off - l <= j <= i + off + r``) and mask allow.
"""

from __future__ import annotations

import torch


def index_grid(b, h, rows, cols, device):
    """Broadcastable index tensors (Bn,1,1,1), (1,Hn,1,1), (1,1,R,1), (1,1,1,C) from ranges or ints."""

    def as_idx(x, shape):
        t = torch.as_tensor(x, device=device, dtype=torch.long)
        return t.reshape(shape) if t.dim() else t.reshape([1] * 4)

    return (
        as_idx(b, (-1, 1, 1, 1)),
        as_idx(h, (1, -1, 1, 1)),
        as_idx(rows, (1, 1, -1, 1)),
        as_idx(cols, (1, 1, 1, -1)),
    )


def modify_scores(s, *, softcap, bias, slopes, score_mod, b, h, q, kv, off):
    """Steps 2-4 on scores ``s`` (broadcastable against the index tensors).

    ``bias`` is the slice of the additive bias that lines up with ``s`` (or None); ``slopes`` the ALiBi
    slopes shaped to broadcast over heads (or None); ``score_mod`` a plain callable already bound to the
    sequence lengths (or None).
    """
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if slopes is not None:
        s = s - slopes.to(s.dtype) * (q + off - kv).abs().to(s.dtype)
    if score_mod is not None:
        out = score_mod(s, b, h, q, kv)
        s = out if isinstance(out, torch.Tensor) else torch.full_like(s, float(out))
    return s


def visibility(*, causal, window, mask_mod, b, h, q, kv, off):
    """Step 5: a boolean tensor broadcastable to the grid, or None when every key is visible."""
    vis = None

    def conj(a, c):
        return c if a is None else a & c

    pos = q + off
    if causal:
        vis = conj(vis, kv <= pos)
    if window is not None:
        left, right = window
        if left >= 0:
            vis = conj(vis, kv >= pos - left)
        if right >= 0:
            vis = conj(vis, kv <= pos + right)
    if mask_mod is not None:
        m = mask_mod(b, h, q, kv)
        m = torch.as_tensor(m, device=q.device)
        vis = conj(vis, m.to(torch.bool))
    return vis


def slopes_for(alibi_slopes, b, h0, h1):
    """ALiBi slopes for batch (or sequence) ``b`` and heads ``h0:h1``, shaped (1, Hn, 1, 1)."""
    if alibi_slopes is None:
        return None
    row = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
    return row[h0:h1].view(1, -1, 1, 1)
